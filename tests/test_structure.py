"""The shape of the code base, checked from its source (STYLE.md "The house"):

(a) no import cycles among mmrl modules, lazy (function-level) imports included;
(b) the core's layers import only downward;
(c) no function in the core over 60 lines;
(d) test folders mirror the packages;
(e) ``import mmrl``, the config schema, ``mmrl --help`` and ``mmrl config validate`` load no torch
    (what makes the command answer at once; no wall-clock time is asserted).

Imports are read with ``ast``: every ``import`` / ``from ... import`` statement anywhere in a
module (inside functions too), relative ones resolved; those under ``if TYPE_CHECKING:`` never run
and are left out. A name imported from a package counts as an import of its submodule when one
of that name exists. Modules imported by name at run time (``importlib.import_module`` of the
plugin table in mmrl.cli.app and of JOB_MODULES in mmrl.config.jobs) are plugins, not edges.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# package -> its folder: the user's layout (pyproject's package-dir)
PACKAGE_DIRS = {"mmrl": ROOT / "mmrl", "mmrl.video": ROOT / "video",
                "mmrl.diffusion": ROOT / "diffusion", "mmrl.rewards": ROOT / "rewards"}
DOMAINS = ("mmrl.video", "mmrl.diffusion", "mmrl.rewards")

# The core's layers, lowest first: a module may import its own layer and the ones below.
LAYERS = [
    ("mmrl", "mmrl.registry", "mmrl._lazy", "mmrl._moved", "mmrl.fields"),
    ("mmrl.algo",),
    ("mmrl.budget",),
    ("mmrl.config",),
    ("mmrl.train",),
    ("mmrl.demo",),
    ("mmrl.cli",),
]
MAX_FUNCTION_LINES = 60


@lru_cache(maxsize=None)
def modules() -> Dict[str, Path]:
    """``{module name: file}`` for every module of mmrl and its domain packages."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if package == "mmrl" and rel.parts[0] in ("video", "diffusion", "rewards"):
                continue  # not there; the domain folders sit at the top
            parts = list(rel.parts[:-1]) + ([] if rel.name == "__init__" else [rel.name])
            out[".".join([package] + parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement that can run (everything but ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def _resolve(name: str, package: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def import_graph() -> Dict[str, Set[str]]:
    """``{module: the mmrl modules it imports}`` (see the module docstring for what counts)."""
    known = modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(name, package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            for target in targets:
                while target and target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]  # import a.b.c of a name: module a.b
                if target in known and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: Dict[str, Set[str]], component: List[str]) -> List[str]:
    """One cycle through the component's first module: ``[a, b, ..., a]``."""
    start, inside = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & inside):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mmrl.algo.presets" in graph["mmrl.algo.losses"]  # inside PolicyLoss.__init__
    assert "mmrl.config.core" in graph["mmrl.config.schema"]
    assert "mmrl.train.reward_fn" in graph["mmrl.rewards.scorers"]
    assert len(graph) > 60
    one = ast.parse("from .data import x\nfrom .. import io\nfrom . import tiny").body
    assert _resolve("mmrl.video.augment", "mmrl.video", one[0]) == "mmrl.video.data"
    assert _resolve("mmrl.video.models.qwen", "mmrl.video.models", one[1]) == "mmrl.video"
    assert _resolve("mmrl.video", "mmrl.video", one[2]) == "mmrl.video"


def test_no_import_cycles():
    graph = import_graph()
    cycles = [" -> ".join(a_cycle(graph, c)) for c in strongly_connected(graph)]
    assert cycles == [], "import cycles (break each one):\n  " + "\n  ".join(cycles)


def _layer(module: str):
    for i, names in enumerate(LAYERS):
        if any(module == n or (n != "mmrl" and module.startswith(n + ".")) for n in names):
            return i
    return None


def test_every_core_module_has_a_layer():
    core = [m for m in modules() if not m.startswith(DOMAINS)]
    assert [m for m in core if _layer(m) is None] == []


def test_core_layers_import_only_downward():
    bad = []
    for module, targets in import_graph().items():
        layer = _layer(module)
        if module.startswith(DOMAINS) or layer is None:
            continue
        for target in sorted(targets):
            if target.startswith(DOMAINS):
                bad.append(f"{module} imports the domain package module {target}")
            elif _layer(target) > layer:
                bad.append(f"{module} (layer {LAYERS[layer][0]}) imports {target} (layer "
                           f"{LAYERS[_layer(target)][0]}, above it)")
    assert bad == [], "\n".join(bad)


def test_no_core_function_is_over_60_lines():
    long = []
    for module, path in modules().items():
        if module.startswith(DOMAINS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    assert long == [], f"core functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _source_for(test_dir: Path) -> List[Path]:
    """Where a test folder's package lives: tests/<x>/... mirrors mmrl/<x>/... or <domain>/..."""
    rel = test_dir.relative_to(ROOT / "tests")
    return [ROOT / "mmrl" / rel, ROOT / rel]


def test_test_folders_mirror_the_packages():
    stray = []
    for folder in sorted(p for p in (ROOT / "tests").rglob("*") if p.is_dir()):
        rel = folder.relative_to(ROOT / "tests")
        if rel.parts[0] in ("reference", "fixtures") or "__pycache__" in rel.parts \
                or rel.parts[-1].startswith("."):
            continue
        if not any(p.is_dir() or p.with_suffix(".py").is_file() for p in _source_for(folder)):
            stray.append(f"tests/{rel} (no mmrl/{rel} nor {rel}, folder or module)")
    assert stray == [], "test folders that mirror no package:\n" + "\n".join(stray)


TORCH_PROBE = ("import sys\n"
               "try:\n"
               "    {code}\n"
               "except SystemExit:\n"
               "    pass\n"
               "print('TORCH', 'torch' in sys.modules)\n")
RUN_CLI = "from mmrl.cli.app import main; main({argv!r})"


@pytest.mark.parametrize("code", [
    "import mmrl",
    "import mmrl.config.schema",
    "import mmrl.algo.presets; mmrl.algo.presets.algo_problems('grpo', eps_low=2.0)",
    RUN_CLI.format(argv=["--help"]),
    RUN_CLI.format(argv=["config", "validate", str(ROOT / "configs/demo/toy.yaml")]),
    RUN_CLI.format(argv=["reward", "--help"]),
    RUN_CLI.format(argv=["sim", "budget", "--help"]),
], ids=["import mmrl", "import schema", "algo_problems", "mmrl --help",
        "mmrl config validate toy", "mmrl reward --help", "mmrl sim budget --help"])
def test_the_light_paths_load_no_torch(code, tmp_path):
    probe = TORCH_PROBE.format(code=code)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "TORCH False", (code, done.stdout[-500:])
    assert "usage: mmrl" in done.stdout or "ok: " in done.stdout or "--help" not in code


def test_validating_against_an_existing_run_folder_and_the_domain_jobs_loads_no_torch(tmp_path):
    """Preflight reads a run folder's checkpoints (mmrl.train.checkpoint_files) and the domain
    jobs' sections (video/config.py, diffusion/config.py) without torch."""
    from mmrl.train import checkpoint as ckpt
    out = tmp_path / "run"
    ckpt.save_checkpoint(out / "checkpoints", 2, {"w": torch.zeros(2)}, {}, {"step": 2})
    for cfg, extra in (("configs/demo/toy.yaml", [f"train.output_dir={out}",
                                                  "train.resume=auto"]),
                       ("configs/demo/video_tiny.yaml", []),
                       ("configs/demo/diffusion_tiny.yaml", [])):
        argv = ["config", "validate", str(ROOT / cfg), *extra]
        probe = TORCH_PROBE.format(code=RUN_CLI.format(argv=argv))
        done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines()[-1] == "TORCH False", (cfg, done.stdout[-800:])
