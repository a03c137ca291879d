"""``python -m mmrl.cli ...`` (e.g. under torchrun) runs the ``mmrl`` command."""
import sys

from mmrl.cli.app import main

sys.exit(main())
