"""Config: YAML + overrides -> typed sections; every problem reported at once; docs complete."""
from dataclasses import fields
from pathlib import Path

import pytest

from mmrl.config.core import ConfigError, apply_overrides, field_docs, parse_value
from mmrl.config.schema import AlgoConfig, TrainConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_parse_value_reads_scientific_notation_and_yaml_scalars():
    assert parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("3.0e-3") == pytest.approx(3e-3)
    assert parse_value("null") is None and parse_value("true") is True
    assert parse_value("12") == 12 and parse_value("dapo") == "dapo"
    assert parse_value("[1, 2]") == [1, 2]


def test_overrides_apply_dotted_keys():
    data = {"train": {"lr": 1.0}}
    assert apply_overrides(data, ["train.lr=1e-4", "algo.preset=dapo", "toy.length=3"]) == []
    assert data == {"train": {"lr": 1e-4}, "algo": {"preset": "dapo"}, "toy": {"length": 3}}
    assert "expected key=value" in apply_overrides({}, ["train.lr"])[0]


def test_load_with_overrides_types_and_defaults():
    run = load_config(ROOT / "configs/demo/toy.yaml", ["train.steps=3", "algo.preset=dapo",
                                                       "algo.eps_high=0.3"])
    assert run.job == "toy" and run.train.steps == 3
    assert isinstance(run.train.lr, float)
    spec = run.algo.resolve()
    assert spec.eps_high == pytest.approx(0.3) and spec.eps_low == pytest.approx(0.2)
    assert spec.aggregation == "token_mean"


def test_every_problem_is_reported_at_once():
    data = {"job": "toy",
            "algo": {"preset": "grpoo", "eps_hgh": 0.3},
            "train": {"lr": "fast", "steps": 0, "group_size": 2.5},
            "toy": {"task": "revers", "d_model": 30, "heads": 4},
            "extra": 1}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "bad.yaml")
    text = "\n".join(info.value.problems)
    for needle in ["algo.preset: got 'grpoo'", "did you mean 'grpo'",
                   "algo.eps_hgh: unknown key", "did you mean 'eps_high'",
                   "train.lr: got 'fast'", "expected float",
                   "train.steps: got 0; expected a value >= 1",
                   "train.group_size: got 2.5", "expected int",
                   "toy.task: got 'revers'", "did you mean 'reverse'",
                   "extra: unknown section"]:
        assert needle in text, f"missing {needle!r} in:\n{text}"
    assert len(info.value.problems) == 7  # one line per problem, no cascades
    assert str(info.value).startswith("bad.yaml: ")


def test_cross_field_and_algorithm_combinations_are_reported():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "algo": {"preset": "gspo",
                                                  "aggregation": "token_mean"}})
    assert any("aggregation" in p and "token_mean" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "toy": {"d_model": 30, "heads": 4}})
    assert any("toy.d_model" in p and "multiple of heads" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"job": "toy", "algo": {"preset": "gspo"}, "train": {"t_chunk": 2}})
    assert any("t_chunk" in p and "sequence-level" in p for p in info.value.problems)


def test_unknown_job_and_missing_file():
    with pytest.raises(ConfigError, match="unknown job 'toyy'.*did you mean 'toy'"):
        config_from_dict({"job": "toyy"})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(ROOT / "configs/nope.yaml")


@pytest.mark.parametrize("cls", [AlgoConfig, TrainConfig])
def test_every_field_is_documented(cls):
    rows = field_docs(cls)
    assert len(rows) == len(fields(cls))
    for key, tp, default, doc, source in rows:
        assert doc and len(doc) > 10, f"{cls.__name__}.{key} has no documentation"
        assert tp


def test_job_sections_are_documented():
    from mmrl.config.jobs import get_job, job_names
    for name in job_names():
        try:
            section = get_job(name).section
        except ValueError:
            continue  # a job whose extra is not installed here
        for key, tp, default, doc, source in field_docs(section):
            assert doc, f"{name}.{key} has no documentation"


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_validates(path):
    run = load_config(path)
    run.algo.resolve()


def test_generated_reference_is_up_to_date():
    from mmrl.cli.core import config_reference
    doc = ROOT / "docs" / "config.md"
    assert doc.exists(), "run: mmrl config docs > docs/config.md"
    assert doc.read_text().strip() == config_reference().strip(), \
        "docs/config.md is stale; regenerate it with: mmrl config docs > docs/config.md"


def _problems(data=None, path=None, overrides=(), here=False):
    """The problem lines of a config (dict or file), [] when it is valid."""
    from mmrl.cli.preflight import preflight
    try:
        run = load_config(path, overrides) if path else config_from_dict(data)
        return preflight(run) if here else []
    except ConfigError as err:
        return err.problems


def _bomb(levels: int, fan: int = 9) -> str:
    """A "billion laughs" YAML: ``fan ** levels`` leaves from a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * fan) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]"
              for i in range(1, levels + 1)]
    return "\n".join(lines + [f"train: {{lr: *a{levels}}}"]) + "\n"


def test_files_that_are_not_configs_are_one_clear_problem(tmp_path):
    import time

    from mmrl.config.core import MAX_ALIAS_NODES
    cases = {"random.yaml": bytes(range(256)) * 2, "bomb.yaml": _bomb(8).encode(),
             "cycle.yaml": b"a: &a [1, [*a]]\n", "deep.yaml": b"[" * 5000 + b"]" * 5000,
             "list.yaml": b"- 1\n- 2\n", "nul.yaml": b"\x00job: toy\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.yaml").mkdir()
    assert len(cases["bomb.yaml"]) < 500
    tic = time.perf_counter()
    got = {name: _problems(path=tmp_path / name) for name in [*cases, "folder.yaml"]}
    assert time.perf_counter() - tic < 5  # the 8-level bomb used to take 54 s and 2.7 GB
    assert all(len(p) == 1 and len(p[0]) < 400 for p in got.values()), got
    assert "not UTF-8 text (byte 0x80 at offset 128)" in got["random.yaml"][0]
    assert f"aliases expand to more than {MAX_ALIAS_NODES} nodes" in got["bomb.yaml"][0]
    assert "MAX_ALIAS_NODES" in got["bomb.yaml"][0]
    assert "at *a3, line 5, column 10" in got["bomb.yaml"][0]  # 15,670 nodes after a4's first
    assert "(a cycle)" in got["cycle.yaml"][0]
    assert "nested too deeply" in got["deep.yaml"][0]
    assert "top level is list" in got["list.yaml"][0]
    assert "unacceptable character #x0000" in got["nul.yaml"][0]
    assert "is a directory" in got["folder.yaml"][0]
    # the same budget guards overrides; a few aliases stay fine
    flow = "[&a0 [x, x, x, x, x, x, x, x, x]" + "".join(
        f", &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 7)) + "]"
    got = _problems(path=ROOT / "configs/demo/toy.yaml", overrides=[f"train.x={flow}"])
    assert len(got) == 1 and "aliases expand to more than" in got[0] and len(got[0]) < 400
    (tmp_path / "ok.yaml").write_text("job: toy\ntoy: {num_prompts: 8}\n"
                                      "train: {steps: &n 3, log_every: *n, prompts_per_step: *n}\n")
    ok = load_config(tmp_path / "ok.yaml")
    assert ok.train.steps == ok.train.log_every == ok.train.prompts_per_step == 3


def test_values_train_cannot_use_are_refused_by_validation():
    toy = ROOT / "configs/demo/toy.yaml"
    cases = {
        "train.lr=.nan": "train.lr: got nan; expected a finite number",
        "toy.length=[[1]]": "toy.length: got [[1]] (list); expected int",  # no algo cascade
        "train.max_grad_norm=.inf": "train.max_grad_norm: got inf; expected a finite number",
        "train.lr=1e999": "train.lr: got inf; expected a finite number",
        "train.seed=9223372036854775808": "train.seed: got 9223372036854775808; expected a "
                                          "value <= 9223372036854775807",
        "train.seed=-1": "train.seed: got -1; expected a value >= 0",
        "train.device=tpu": "train.device: got 'tpu'; expected auto, cpu, cuda, cuda:N",
        "train.device=meta": "train.device: got 'meta' (torch type 'meta'), which mmrl does not",
        "train.device=cpu:1": "the CPU has no index",
        "job=[1,2]": "job: got [1, 2] (list); expected a job name: diffusion, toy, video",
        "train.group_size=1": "train.group_size: got 1 with advantage 'grpo', which gives a "
                              "group of one sample advantage 0",
        "toy.num_prompts=4": "toy.num_prompts: got 4, fewer than train.prompts_per_step=16",
        "train.lr=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]":
            "train.lr: got [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ...] (list); expected float",
        "train.x=[1": "override 'train.x': value '[1' is not a YAML value (expected ',' or ']'",
    }
    for override, needle in cases.items():
        problems = _problems(path=toy, overrides=[override])
        assert len(problems) == 1 and needle in problems[0], (override, problems)
    # ngrpo's virtual sample makes a group of one meaningful
    assert _problems(path=toy, overrides=["train.group_size=1", "algo.preset=ngrpo"]) == []


def test_binary_reward_and_whole_group_objectives_are_refused_where_they_cannot_train():
    toy = ROOT / "configs/demo/toy.yaml"  # group_size 8
    drpo = ["algo.preset=drpo", "toy.reward=exact"]
    assert _problems(path=toy, overrides=drpo) == []
    assert _problems(path=toy, overrides=drpo + ["train.micro_batch_size=16"]) == []
    cases = {
        "toy.reward=digits": "toy.reward: got 'digits' with algo.objective='drpo', which reads "
                             "binary rewards",
        "train.micro_batch_size=12": "train.micro_batch_size: got 12, which splits groups of "
                                     "group_size=8; objective 'drpo' needs whole groups",
        "train.rollout_allocation=knapsack": "rollout_allocation='knapsack', whose groups vary",
    }
    for override, needle in cases.items():
        extra = ["train.micro_batch_size=8"] if "knapsack" in override else []
        problems = _problems(path=toy, overrides=drpo + extra + [override])
        assert len(problems) == 1 and needle in problems[0], (override, problems)
    # the same flag refuses Reg-GRPO's split groups; other presets split freely
    assert "objective 'reg' needs whole groups" in _problems(
        path=toy, overrides=["algo.preset=reg_grpo", "train.micro_batch_size=3"])[0]
    assert _problems(path=toy, overrides=["train.micro_batch_size=3"]) == []


def test_preflight_checks_files_device_and_checkpoint_on_this_machine(tmp_path, monkeypatch):
    import torch
    monkeypatch.chdir(tmp_path)  # relative paths: never the runs/ a `make demo` left
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    toy = ROOT / "configs/demo/toy.yaml"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "file").write_text("x")
    got = _problems(path=toy, here=True, overrides=[
        "train.device=cuda:1", f"train.resume={tmp_path / 'ckpt'}",
        f"train.output_dir={tmp_path / 'file'}"])
    assert got[0].startswith("train.device: 'cuda:1' but torch sees no cuda device")
    assert got[1].startswith(f"train.resume: {tmp_path / 'ckpt'} has no MANIFEST.json")
    assert got[2].startswith(f"train.output_dir: {tmp_path / 'file'} exists and is a file")
    got = _problems(path=toy, here=True, overrides=["train.resume=sometimes"])
    assert len(got) == 1 and got[0].startswith("train.resume: got 'sometimes', which is not "
                                               "auto, never or an existing folder")
    assert _problems(path=toy, here=True) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _problems(path=toy, here=True, overrides=["train.device=cuda:0"]) == []
    assert _problems(path=toy, here=True, overrides=["train.device=cuda:1"]) == [
        "train.device: 'cuda:1' but this machine has 1 cuda device(s) (indices 0..0); pick one "
        "of those"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process: "cuda" means GPU 1
    assert "has 1 cuda device(s)" in _problems(path=toy, here=True,
                                               overrides=["train.device=cuda"])[0]
    # the shipped configs hold placeholders for another machine: values valid, files missing
    assert _problems(path=ROOT / "configs/diffusion/sd35m_pickscore_flow_grpo.yaml") == []


def test_video_and_diffusion_sections_check_reward_specs_files_and_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: never the runs/ a `make demo` left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    video = ROOT / "configs/demo/video_tiny.yaml"
    bad = _problems(path=video, overrides=["video.rewards={accuracyy: 1}"])
    assert len(bad) == 1 and bad[0].startswith("video.rewards: ") and "accuracy" in bad[0]
    bad = _problems(path=video, overrides=["video.rewards={accuracy: {weight: x}}"])
    assert "video.rewards: vl reward 'accuracy': weight 'x' is not a number" in bad[0]
    bad = _problems(path=video, overrides=["video.rewards={accuracy: .nan}"])
    assert bad == ["video.rewards: accuracy weight=nan; expected a finite number"]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    got = _problems(path=video, here=True, overrides=[
        f"video.data={tmp_path / 'empty.jsonl'}", f"video.model={tmp_path / 'model'}"])
    assert got == [f"video.data: data file '{tmp_path / 'empty.jsonl'}' is empty (0 bytes)",
                   f"video.model: folder '{tmp_path / 'model'}' has no config.json, so it is "
                   f"not a saved model; point it at the folder save_pretrained wrote"]
    got = _problems(path=video, here=True, overrides=["video.data=/no/data.jsonl",
                                                      "video.model=org/not-cached"])
    assert got[0].startswith("video.data: data file '/no/data.jsonl' not found")
    assert got[1].startswith("video.model: 'org/not-cached' is neither a local folder")
    diffusion = ROOT / "configs/demo/diffusion_tiny.yaml"
    bad = _problems(path=diffusion, overrides=["diffusion.reward=pickscor:weight=x"])
    assert "diffusion.reward: unknown scorer 'pickscor'" in bad[0] and "did you mean" in bad[0]
    assert "diffusion.reward: pickscor weight='x'; expected a finite number" in bad[1]
    got = _problems(path=diffusion, here=True, overrides=[
        f"diffusion.model={tmp_path / 'model'}", "diffusion.prompt_file=/no/prompts.txt"])
    assert "has no model_index.json" in got[0]
    assert got[1].startswith("diffusion.prompt_file: prompt file '/no/prompts.txt' not found")


def test_a_key_written_twice_is_refused_but_merge_keys_may_be_overridden(tmp_path):
    """YAML keeps the last of two equal keys silently; a config author reads the first."""
    from mmrl.config.core import load_yaml
    p = tmp_path / "dup.yaml"
    p.write_text("job: toy\ntrain:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(p)
    assert "key 'lr' appears twice in one mapping (line 3 and line 5" in str(err.value)
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        parse_value("{a: 1, a: 2}")
    p.write_text("base: &b {lr: 1, steps: 2}\ntrain:\n  <<: *b\n  lr: 5\n")
    assert load_yaml(p)["train"] == {"lr": 5, "steps": 2}


def test_overwrite_with_resume_auto_is_refused_by_validation():
    from mmrl.config.core import build
    with pytest.raises(ConfigError, match="overwrite=true with resume=auto would delete"):
        build(TrainConfig, {"overwrite": True, "resume": "auto"}, "train")
    assert build(TrainConfig, {"overwrite": True, "resume": "never"}, "train").overwrite is True


def test_the_machine_checks_moved_above_the_config_layer_with_a_clear_message():
    from mmrl.cli.preflight import preflight  # noqa: F401
    with pytest.raises(ImportError, match="moved to mmrl.cli.preflight.preflight"):
        from mmrl.config.schema import preflight  # noqa: F401,F811


def test_selector_choices_without_torch_match_the_registry():
    from mmrl.budget.selection import SELECTORS
    from mmrl.config.schema import BUILTIN_SELECTORS, selector_names
    assert sorted(BUILTIN_SELECTORS) == SELECTORS.names() == selector_names()
    assert _problems(path=ROOT / "configs/demo/toy.yaml", overrides=["train.selector=vad"]) == [
        "train.selector: got 'vad'; expected one of uniform, vade, variance_aware; did you mean "
        "'vade'?"]
