"""HF-format export of the video policy: what a user loads with from_pretrained equals the live
policy (full, LoRA adapter, LoRA merged), and exporting changes nothing in the live policy."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from mmrl.video.export import MANIFEST, export_qwen_vl, merged_state_dict

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import VIDEO, make_policy, rollout  # noqa: E402

TOL = 1e-5


def _train_like(policy, seed=1):
    """Perturb the trainable weights as training would (LoRA B starts at zero: make it not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if p.requires_grad and (not policy.is_peft or "lora_B" in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _ids(policy):
    return policy.tok("a red square moves left", return_tensors="pt")["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _load(path, base_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if base_dir is None:
        model = AutoModelForImageTextToText.from_pretrained(path)
    else:
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir),
                                          path)
    return model, AutoProcessor.from_pretrained(path)


def _logp_parity(live, loaded_model, processor, vt_batch):
    """Response log-probs over a video rollout under the live and the loaded model."""
    from mmrl.video.policy import QwenVLPolicy
    ro = rollout(live, vt_batch, group=2)
    other = QwenVLPolicy(loaded_model, processor, max_new_tokens=4, video=VIDEO)
    rows, T = torch.arange(len(ro.samples)), ro.mask.shape[1]
    with torch.no_grad():
        return live.logp(ro, rows, 0, T), other.logp(ro, rows, 0, T)


@pytest.mark.parametrize("finetune,merge", [("full", False), ("lora", False), ("lora", True)])
def test_export_loads_to_the_same_model(tiny_vl_dir, vt_batch, tmp_path, finetune, merge):
    policy = make_policy(tiny_vl_dir, finetune=finetune)
    _train_like(policy)
    ids = _ids(policy)
    before = _logits(policy.model, ids)
    out = export_qwen_vl(policy, str(tmp_path / "export"), merge_lora=merge)

    assert out == str(tmp_path / "export")
    files = set(os.listdir(out))
    adapter = finetune == "lora" and not merge
    if adapter:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert "config.json" not in files
    else:
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
        assert "adapter_config.json" not in files
    assert "preprocessor_config.json" in files or "processor_config.json" in files
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert manifest["finetune"] == finetune and manifest["merged"] is merge
    assert manifest["layout"] == ("peft_adapter" if adapter else "full_model")
    assert manifest["base_model"] == tiny_vl_dir
    assert ("PeftModel" in manifest["load"]) is adapter

    model, processor = _load(out, tiny_vl_dir if adapter else None)
    if not adapter:  # a plain transformers model: no peft layers left after merging
        assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model, ids), before, atol=TOL, rtol=0)
    assert processor.tokenizer("a red square")["input_ids"] == \
        policy.tok("a red square")["input_ids"]
    live, loaded = _logp_parity(policy, model, processor, vt_batch)
    torch.testing.assert_close(loaded, live, atol=TOL, rtol=0)


def test_lora_export_leaves_the_live_policy_training_as_before(tiny_vl_dir, tmp_path):
    exported, control = make_policy(tiny_vl_dir, "lora"), make_policy(tiny_vl_dir, "lora")
    for p in (exported, control):
        _train_like(p)
    ids = _ids(exported)
    state = {k: v.clone() for k, v in exported.model.state_dict().items()}
    export_qwen_vl(exported, str(tmp_path / "a"), merge_lora=True)
    export_qwen_vl(exported, str(tmp_path / "b"))

    after = exported.model.state_dict()
    assert after.keys() == state.keys()  # adapter still there, nothing merged or unloaded
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert not any(getattr(m, "merged", False) for m in exported.model.modules())
    with exported.model.disable_adapter():  # LoRA still switchable: the reference differs
        ref = _logits(exported.model, ids)
    assert (ref - _logits(exported.model, ids)).abs().max() > 1e-3
    # one SGD step on both: the exported policy trains exactly like the untouched one
    for p in (exported, control):
        opt = torch.optim.SGD([q for q in p.model.parameters() if q.requires_grad], lr=0.1)
        p.model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        opt.step()
    for (k, a), b in zip(exported.model.state_dict().items(), control.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(exported.model.state_dict()[next(k for k in state if "lora_B" in k)],
                           state[next(k for k in state if "lora_B" in k)])


def test_merged_state_dict_is_w_plus_scaled_ba(tiny_vl_dir):
    policy = make_policy(tiny_vl_dir, "lora")  # rank 4, alpha 8: scaling 2
    _train_like(policy)
    layer = policy.base.model.language_model.layers[0].self_attn.q_proj
    merged = merged_state_dict(policy.base)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    expected = (layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight
                @ layer.lora_A["default"].weight)
    torch.testing.assert_close(merged[key], expected.detach(), atol=1e-6, rtol=0)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    policy.model.merge_adapter()  # W now holds BA already: it must not be added a second time
    torch.testing.assert_close(merged_state_dict(policy.base)[key], expected.detach(), atol=1e-6,
                               rtol=0)
    assert merged.keys() == make_policy(tiny_vl_dir, "full").model.state_dict().keys()


def test_reexport_replaces_the_earlier_export(tiny_vl_dir, tmp_path):
    target = str(tmp_path / "out")
    policy = make_policy(tiny_vl_dir, "lora")
    export_qwen_vl(policy, target, merge_lora=True)
    assert os.path.isfile(os.path.join(target, "config.json"))
    _train_like(policy, seed=2)
    export_qwen_vl(policy, target)  # adapter layout now: the merged model's files are gone
    files = set(os.listdir(target))
    assert "adapter_config.json" in files and "config.json" not in files
    assert json.load(open(os.path.join(target, MANIFEST)))["merged"] is False
    assert [f for f in os.listdir(tmp_path) if f != "out"] == []  # no temporary folders left
    model, _ = _load(target, tiny_vl_dir)
    torch.testing.assert_close(_logits(model, _ids(policy)), _logits(policy.model, _ids(policy)),
                               atol=TOL, rtol=0)


def test_bad_targets_and_arguments_raise_clear_errors(tiny_vl_dir, tmp_path):
    policy = make_policy(tiny_vl_dir, "full")
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        export_qwen_vl(policy, str(a_file))
    assert a_file.read_text() == "x"
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_qwen_vl(policy, str(other))
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_qwen_vl(policy, str(tmp_path / "new"), merge_lora=True)
    assert not (tmp_path / "new").exists()


def test_a_failed_write_keeps_the_earlier_export(tiny_vl_dir, tmp_path, monkeypatch):
    target = str(tmp_path / "out")
    policy = make_policy(tiny_vl_dir, "full")
    export_qwen_vl(policy, target)
    files = sorted(os.listdir(target))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(policy.processor, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_qwen_vl(policy, target)
    assert sorted(os.listdir(target)) == files
    assert os.listdir(tmp_path) == ["out"]
