"""The ``mmrl`` command line (placeholder; filled in by the core issue)."""
import sys


def main(argv=None) -> int:
    print("mmrl: CLI under construction", file=sys.stderr)
    return 0
