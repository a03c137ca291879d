"""The video package's import shape: the job's config section, the CLI and the family registry
load without torch; every public name (old module paths included) still imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "numpy", "transformers", "peft", "PIL")


def _loaded_after(code: str) -> list:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}; import sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    return eval(out[-1])  # noqa: S307 (our own print of a list of names)


def test_config_cli_and_registry_import_without_torch():
    assert _loaded_after("import mmrl.video, mmrl.video.config, mmrl.video.cli, "
                         "mmrl.video.models") == []


def test_the_video_job_registers_and_validates_without_loading_its_run():
    code = ("from mmrl.video.config import VideoConfig; c = VideoConfig(); "
            "from mmrl.config.jobs import get_job; job = get_job('video'); "
            "assert job.algo_defaults(c) == {'max_len': 768}; "
            "assert c.problems() == []; "
            "assert 'unknown vl reward' in VideoConfig(rewards={'x': 1}).problems()[0]; "
            "assert repr(job.run) == \"Target('mmrl.video.job:run')\"")
    assert _loaded_after(code) == []


def test_every_public_name_and_old_module_path_still_imports():
    import mmrl.video as video
    from mmrl.video.export import MANIFEST, export_qwen_vl, export_vlm  # noqa: F401
    from mmrl.video.mrope import check_model_type, mrope_position_ids  # noqa: F401
    from mmrl.video.policy import QwenVLPolicy, VLMPolicy, load_qwen_vl, load_vlm
    from mmrl.video.qwen_inputs import build_qwen_video_inputs, qwen25_position_ids  # noqa
    from mmrl.video.tiny import TINY_MODELS, build_default_tiny, build_tiny_qwen3_vl  # noqa
    from mmrl.video.train import VideoConfig, build_policy, run  # noqa: F401
    assert QwenVLPolicy is VLMPolicy and load_qwen_vl is load_vlm
    for name in video.__all__:
        assert getattr(video, name) is not None, name
    assert {"tiny", "tiny_qwen2", "tiny_qwen3"} <= set(TINY_MODELS)  # + other families' names


def test_an_unknown_model_type_or_tiny_name_lists_the_supported_ones():
    from mmrl.video.models import adapter_for, default_tiny_dir, supported_model_types
    assert supported_model_types()[:3] == ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
    with pytest.raises(NotImplementedError, match=r"model_type='llava' is not supported.*"
                                                  r"\(supported: qwen2_vl, qwen2_5_vl, qwen3_vl"):
        adapter_for("llava")
    with pytest.raises(ValueError, match="unknown tiny model 'tiny_x' .known: tiny, tiny_qwen2"):
        default_tiny_dir("out", "tiny_x")
    assert default_tiny_dir("out", "tiny_qwen3") == "out/tiny_qwen3_vl"


@pytest.mark.parametrize("path", ["video/job.py", "video/policy.py", "video/models/base.py",
                                  "video/config.py"])
def test_the_generic_code_names_no_model_family(path):
    """Family specifics live in video/models/<family>/: outside strings and comments, the job,
    the policy and the adapter interface name no family (the old aliases aside)."""
    import io
    import os
    import tokenize
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, path)) as f:
        tokens = list(tokenize.generate_tokens(io.StringIO(f.read()).readline))
    names = {t.string for t in tokens if t.type == tokenize.NAME}
    families = ("qwen", "llava", "internvl", "gemma", "mrope", "deepstack")
    assert {n for n in names if any(f in n.lower() for f in families)} <= {"QwenVLPolicy",
                                                                            "load_qwen_vl"}


def test_an_unsupported_checkpoint_is_a_user_error_found_by_preflight(tmp_path):
    """A local model folder of another family (e.g. a Llama) is reported by `mmrl config
    validate` and `mmrl train` before loading anything, as one message with the supported types
    (exit 2, no traceback)."""
    from mmrl.cli.app import main
    from mmrl.config.core import UserError
    from mmrl.video.models import UnsupportedModelError, family_for
    with pytest.raises(UnsupportedModelError) as err:
        family_for("llama")
    assert isinstance(err.value, UserError) and isinstance(err.value, NotImplementedError)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    cfg = str(Path(__file__).resolve().parents[2] / "configs/demo/video_tiny.yaml")
    proc = subprocess.run([sys.executable, "-c", "import sys; from mmrl.cli.app import main; "
                           f"sys.exit(main(['train', {cfg!r}, 'video.model={tmp_path}/llama', "
                           f"'train.output_dir={tmp_path}/out']))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model_type='llama' is not supported" in proc.stderr
    assert "qwen2_5_vl" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["config", "validate", cfg, "--set", f"video.model={tmp_path}/llama"]) == 2
