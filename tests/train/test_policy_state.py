"""The policy contract at run time: check_policy's messages when a Run is built, and the policy's
extra (non-weight) state through checkpoints: saved under state["policy_extra"], restored on
resume, and older checkpoints with ``mmrl_*`` entries among the weights still resume."""
import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyPolicy, digit_reward, make_prompts
from mmrl.train import checkpoint as ckpt
from mmrl.train.policy import Capabilities, GroupPolicy, check_policy
from mmrl.train.runner import Run, run_training
from mmrl.train.state import check_extra_state, legacy_extra_state, load_policy_state

TOY = {"digits": 5, "length": 3, "num_prompts": 24, "d_model": 16, "layers": 1, "heads": 2}


def _cfg(out, algo=None, **train):
    return config_from_dict({"job": "toy", "algo": algo or {}, "toy": TOY, "train": {
        "steps": 4, "prompts_per_step": 4, "group_size": 4, "progress": False,
        "output_dir": str(out), "log_every": 100, "seed": 3, **train}})


def _data(cfg):
    prompts = make_prompts(cfg.task, cfg.train.seed)
    return prompts, [{"target": p[::-1]} for p in prompts]


class Counting(ToyPolicy):
    """Counts its rollouts and keeps the count as extra state (like a flow policy's window)."""

    capabilities = Capabilities(token_weights=True, extra_state=True)

    def __init__(self, c, seed=0):
        super().__init__(c, seed)
        self.rollouts = 0

    def rollout(self, *args):
        self.rollouts += 1
        return super().rollout(*args)

    def extra_state(self):
        return {"rollouts": self.rollouts}

    def load_extra_state(self, extra):
        self.rollouts = extra["rollouts"]


class OlderConvention(Counting):
    """Keeps the count among its weights as ``mmrl_rollouts`` and declares no extra state."""

    capabilities = Capabilities(token_weights=True)

    def state_dict(self):
        return {**super().state_dict(), "mmrl_rollouts": torch.tensor(self.rollouts)}

    def load_state_dict(self, state):
        state = dict(state)
        self.rollouts = int(state.pop("mmrl_rollouts"))
        super().load_state_dict(state)


def _train(out, policy_cls, steps):
    cfg = _cfg(out, steps=steps, save_every=1)
    policy = policy_cls(cfg.task, seed=3)
    run_training(cfg, policy, digit_reward, *_data(cfg))
    return policy, torch.load(out / "final.pt")


def _to_legacy(folder):
    """Rewrite a checkpoint the way older versions wrote it: the extra state as ``mmrl_*``
    tensors among the weights, no ``policy_extra``."""
    data = ckpt.load_checkpoint(folder)
    extra = data["state"].pop("policy_extra")
    weights = {**data["weights"], **{f"mmrl_{k}": torch.tensor(v) for k, v in extra.items()}}
    ckpt.save_checkpoint(folder.parent, int(data["state"]["step"]), weights, data["optimizer"],
                         data["state"], run_id=ckpt.manifest(folder)["run_id"])


@pytest.mark.parametrize("legacy", [False, True])
def test_extra_state_is_checkpointed_and_resumes_exactly(tmp_path, legacy):
    full, a = _train(tmp_path / "a", Counting, 4)
    assert full.rollouts == 4 and not any(k.startswith("mmrl_") for k in a)
    half, _ = _train(tmp_path / "b", Counting, 2)
    folder = ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.load_checkpoint(folder)["state"]["policy_extra"] == {"rollouts": 2}
    if legacy:
        _to_legacy(folder)
        assert "policy_extra" not in ckpt.load_checkpoint(folder)["state"]
    resumed, b = _train(tmp_path / "b", Counting, 4)
    assert resumed.rollouts == 4  # 2 restored + 2 run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_older_convention_keeps_its_entries_in_the_weights(tmp_path):
    """A policy that declares no extra state and keeps ``mmrl_*`` entries in its own
    state_dict round-trips them through state_dict / load_state_dict."""
    full, a = _train(tmp_path / "a", OlderConvention, 3)
    _train(tmp_path / "b", OlderConvention, 2)
    resumed, b = _train(tmp_path / "b", OlderConvention, 3)
    assert int(a["mmrl_rollouts"]) == int(b["mmrl_rollouts"]) == resumed.rollouts == 3
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_entries_lose_their_prefix_and_become_python_numbers(tmp_path):
    cfg = _cfg(tmp_path)
    pol = Counting(cfg.task)
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)
    weights = {**pol.state_dict(), "mmrl_rollouts": torch.tensor(7)}
    assert legacy_extra_state({"mmrl_rollouts": torch.tensor(7), "mmrl_lr": torch.tensor(0.5)}) \
        == {"rollouts": 7, "lr": 0.5}
    load_policy_state(pol, pol.capabilities, opt, weights, opt.state_dict())
    assert pol.rollouts == 7 and type(pol.rollouts) is int
    # a checkpoint's policy_extra wins over stray legacy entries
    load_policy_state(pol, pol.capabilities, opt, weights, opt.state_dict(), {"rollouts": 9})
    assert pol.rollouts == 9


def test_extra_state_must_be_python_scalars():
    assert check_extra_state({"n": 1, "w": 0.5, "on": True, "tag": None}, "P") == \
        {"n": 1, "w": 0.5, "on": True, "tag": None}
    with pytest.raises(TypeError, match=r"P.extra_state\(\)\['n'\] is a Tensor; expected str "
                                        r"keys and bool/int/float/str/None values"):
        check_extra_state({"n": torch.tensor(1)}, "P")
    with pytest.raises(TypeError, match=r"P.extra_state\(\) returned a list; expected a dict"):
        check_extra_state([1], "P")


# ---------------------------------------------------------------------- check_policy
class Bare:
    """Has everything but state_dict / load_state_dict."""

    def rollout(self, *a):
        raise NotImplementedError

    def logp(self, *a):
        raise NotImplementedError

    def parameters(self):
        return iter([torch.nn.Parameter(torch.zeros(1))])


class DeclaresTokenWeights(GroupPolicy):
    capabilities = Capabilities(token_weights=True, extra_state=True)
    model = torch.nn.Linear(1, 1)

    def rollout(self, *a):
        raise NotImplementedError

    def logp(self, *a):
        raise NotImplementedError


def test_check_policy_names_missing_methods():
    with pytest.raises(TypeError, match=r"policy Bare lacks state_dict, load_state_dict \(see "
                                        r"mmrl.train.policy: required methods"):
        check_policy(Bare())
    with pytest.raises(TypeError, match=r"policy DeclaresTokenWeights lacks token_weights, "
                                        r"extra_state, load_extra_state .*declared capabilities "
                                        r"\['token_weights', 'extra_state'\]"):
        check_policy(DeclaresTokenWeights())


def test_capabilities_must_be_declared_with_the_dataclass():
    class Dicty(DeclaresTokenWeights):
        capabilities = {"token_weights": True}
    with pytest.raises(TypeError, match=r"Dicty.capabilities is a dict; expected "
                                        r"mmrl.train.policy.Capabilities\(...\)"):
        check_policy(Dicty())


def test_check_policy_names_what_the_algorithm_needs():
    class Plain(DeclaresTokenWeights):
        capabilities = Capabilities()
    with pytest.raises(TypeError, match=r"algo.token_weighting=tw needs token weights from the "
                                        r"policy, and Plain does not declare "
                                        r"Capabilities\(token_weights=True\)"):
        check_policy(Plain(), PolicyLoss("tw_grpo").spec)

    class NoRef(Plain):
        ref_logp = None
    with pytest.raises(TypeError, match=r"algo.beta > 0 needs NoRef.ref_logp \(or own_kl\); "
                                        r"set algo.beta=0"):
        check_policy(NoRef(), PolicyLoss("grpo", beta=0.04).spec)
    assert check_policy(Plain(), PolicyLoss("grpo", beta=0.04).spec) == Capabilities()


def test_a_run_checks_its_policy_when_built(tmp_path):
    cfg = _cfg(tmp_path, algo={"preset": "tw_grpo"})

    class NoWeights(ToyPolicy):
        capabilities = Capabilities()
    with pytest.raises(TypeError, match="NoWeights does not declare"):
        Run(cfg, NoWeights(cfg.task), digit_reward, *_data(cfg))
    with pytest.raises(TypeError, match="policy Bare lacks state_dict"):
        Run(_cfg(tmp_path), Bare(), digit_reward, *_data(cfg))
