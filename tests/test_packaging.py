"""Install layout: mmrl.video/diffusion/rewards map to top-level folders in editable AND wheel
installs; no bare top-level `video`/`diffusion`/`rewards` package is ever installed; the core
imports without transformers/diffusers/open_clip."""
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mmrl": "mmrl", "video": "mmrl.video", "diffusion": "mmrl.diffusion",
           "rewards": "mmrl.rewards"}


def _packages():
    """Every package of the distribution: each folder holding an ``__init__.py``."""
    return sorted(".".join([name, *init.parent.relative_to(ROOT / top).parts])
                  for top, name in FOLDERS.items() for init in (ROOT / top).rglob("__init__.py"))


PACKAGES = _packages()


def test_every_package_folder_is_listed_in_pyproject():
    """A new folder (a model family's) that pyproject does not list would be missing from the
    wheel while the editable install still finds it."""
    import tomllib
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(listed["packages"]) == PACKAGES


def _run(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_editable_install_maps_the_user_layout(tmp_path):
    out = _run(f"""
        import importlib
        for name in {PACKAGES!r}:
            m = importlib.import_module(name)
            print(name, m.__file__)
        """, cwd=tmp_path)  # outside the repo: the installed mapping must do the work
    assert out.returncode == 0, out.stderr
    files = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert Path(files["mmrl.video"]) == ROOT / "video" / "__init__.py"
    assert Path(files["mmrl.diffusion"]) == ROOT / "diffusion" / "__init__.py"
    assert Path(files["mmrl.rewards"]) == ROOT / "rewards" / "__init__.py"


@pytest.mark.slow
def test_wheel_install_imports_all_four_and_no_bare_top_level(tmp_path):
    wheel_dir, src = tmp_path / "wheel", tmp_path / "src"
    # build from a clean copy: an in-tree build/ folder could carry stale modules into the wheel
    import shutil
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
        ".peers", ".peers-hpsv3"))  # the peers' installs: large, never packaged
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(wheel_dir), str(src)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("mmrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mmrl"}, f"wheel installs top-level {sorted(tops)}; only mmrl is allowed"
    for pkg in ("video", "diffusion", "rewards"):
        assert f"mmrl/{pkg}/__init__.py" in names
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                           "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    # -S-free isolation: put the wheel's copy first and run with -I (ignores the editable finder
    # is not possible), so instead check every module comes from the target directory.
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = f"""
        import sys
        sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()
                         and '__editable__' not in type(f).__module__]
        import importlib
        for name in {PACKAGES!r}:
            m = importlib.import_module(name)
            assert m.__file__.startswith({str(target)!r}), (name, m.__file__)
        print("ok")
        """
    out = _run(code, cwd=tmp_path, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    BLOCKED = ("transformers", "diffusers", "open_clip", "decord", "qwen_vl_utils", "peft",
               "accelerate", "cv2", "av")
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked for this test")
        return None
sys.meta_path.insert(0, Block())
"""


def test_core_imports_without_domain_stacks(tmp_path):
    code = BLOCKER + textwrap.dedent("""
        import torch
        import mmrl
        from mmrl import group_advantages, policy_loss, kl_penalty, tw_token_weights
        from mmrl import soft_overlong_penalty, PRESETS
        import mmrl.train.loop, mmrl.config.core, mmrl.config.schema, mmrl.demo.toy, mmrl.train.runner, mmrl.cli.app
        mmrl.cli.app.build_parser()
        r = torch.tensor([1., 0., 0., 1.]); g = torch.tensor([0, 0, 0, 0])
        a = group_advantages(r, g)
        loss, _ = policy_loss(torch.zeros(4, 3), torch.zeros(4, 3), a, torch.ones(4, 3, dtype=torch.bool))
        bad = [m for m in sys.modules if m.split('.')[0] in
               ('transformers', 'diffusers', 'open_clip')]
        assert not bad, bad
        print('ok', round(float(a[0]), 4))
    """)
    out = _run(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok 0.8659"


# ---------------------------------------------------------------------------- public names
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _documented_imports():
    """``(file, statement)`` for every mmrl import in the python code blocks of README/docs."""
    import re
    out = []
    for doc in DOCS:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            statement = ""
            for line in block.splitlines():  # a parenthesized import spans lines
                if statement or re.match(r"\s*(from mmrl[\w.]* import |import mmrl)", line):
                    statement += " " + line.strip()
                    if statement.count("(") == statement.count(")"):
                        out.append((doc.name, statement.strip()))
                        statement = ""
    return out


def _documented_dotted_names():
    """``(file, name)`` for every dotted mmrl name the README/docs write in backticks, e.g.
    `mmrl.train.loop` or `mmrl.rewards.load`, and ``mmrl.X`` used in their python blocks."""
    import re
    out = set()
    for doc in DOCS:
        text = doc.read_text()
        out |= {(doc.name, n.rstrip(".")) for n in re.findall(r"`(mmrl(?:\.\w+)+)", text)}
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            out |= {(doc.name, n) for n in re.findall(r"\b(mmrl(?:\.\w+)+)", block)}
    return sorted(out)


def test_every_documented_name_imports_from_where_the_docs_say(tmp_path):
    imports, names = _documented_imports(), _documented_dotted_names()
    assert len(imports) >= 15 and len(names) >= 20  # the scan found the docs' examples
    code = f"""
        import importlib
        bad = []
        for where, line in {imports!r}:
            try:
                exec(line, {{}})
            except Exception as err:
                bad.append(f"{{where}}: {{line}}: {{type(err).__name__}}: {{err}}")
        for where, dotted in {names!r}:
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError as err:
                bad.append(f"{{where}}: {{dotted}}: {{err}}")
        print("BAD", bad)
        """
    out = _run(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "BAD []", out.stdout[-3000:]


def test_old_module_paths_import_the_moved_module_with_a_deprecation_warning(tmp_path):
    from mmrl._moved import MOVED
    code = f"""
        import importlib, warnings
        rows = []
        for old, new in {sorted(MOVED.items())!r}:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module(old)
            said = [str(w.message) for w in caught if w.category is DeprecationWarning]
            rows.append((old, module is importlib.import_module(new),
                         said == [f"{{old}} moved to {{new}}; import it from there"]))
        print(rows)
        import mmrl.losses, mmrl.algo.losses
        print(mmrl.losses is mmrl.algo.losses, mmrl.losses.__name__)
        """
    out = _run(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows_line, last = out.stdout.strip().splitlines()[-2:]
    assert last == "True mmrl.algo.losses"
    assert rows_line == repr([(old, True, True) for old in sorted(MOVED)])
