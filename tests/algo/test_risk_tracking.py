"""RiskPO's tracked quantiles (``algo.riskpo_quantile_mode`` / ``riskpo_quantile_lr``): two steps
worked by hand, the advantage each mode gives at the second step, and exact resume in the toy
job (the tracker is the loss's ``adv_state``, saved in the checkpoint)."""
import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import resolve_algo
from mmrl.algo.risk import ALPHAS, QuantileTracker
from mmrl.config.schema import config_from_dict
from mmrl.train import checkpoint as ckpt

LO, HI = ALPHAS.index(0.2), ALPHAS.index(0.8)
S1, S2 = [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 4.0]


def test_two_steps_of_tracking_by_hand():
    t = QuantileTracker(lr=0.1)
    t.update(torch.tensor(S1))  # first step: the batch quantiles (linear interpolation)
    assert t.q[LO].item() == pytest.approx(0.6) and t.q[HI].item() == pytest.approx(2.4)
    assert t.q[ALPHAS.index(0.5)].item() == pytest.approx(1.5)
    t.update(torch.tensor(S2))  # mean(S2 < 0.6) = mean(S2 < 2.4) = mean(S2 < 1.5) = 3/4
    assert t.q[LO].item() == pytest.approx(0.6 + 0.1 * (0.2 - 0.75))  # 0.545
    assert t.q[HI].item() == pytest.approx(2.4 + 0.1 * (0.8 - 0.75))  # 2.405
    assert t.q[ALPHAS.index(0.5)].item() == pytest.approx(1.475)
    assert t.at(0.22).item() == t.q[LO].item()  # the nearest level, as the release's argmin


def _adv(rewards, state):
    """One bundle of one group of four: each row is a paper, S = its reward."""
    return group_advantages(torch.tensor(rewards, dtype=torch.float64),
                            torch.zeros(4, dtype=torch.long), "mixed_var", eps=1e-9,
                            hparams={"riskpo_bundle": 1}, state=state)


@pytest.mark.parametrize("mode, a0", [
    # mix: q_lo = (0.6 + 0)/2 = 0.3, q_hi = (2.4 + 1.6)/2 = 2; for S = 0: A_R = (0.3 − 2)/0.6,
    # A_C = −0.3/0.2, A = (1.5·A_C + A_R)/2.5 / std (std of (0, 0, 0, 4) = 2)
    ("mix", (1.5 * -1.5 + -1.7 / 0.6) / 2.5 / 2),
    # tracked: q_lo = 0.6, q_hi = 2.4: A_R = −1.8/0.6 = −3, A_C = −0.6/0.2 = −3 -> −3 / 2
    ("tracked", -1.5),
])
def test_second_step_uses_the_first_steps_quantiles(mode, a0):
    t = QuantileTracker(lr=0.1, mode=mode)
    first = _adv(S1, t)  # no q̂ yet: the batch quantiles, as without a tracker
    torch.testing.assert_close(first, _adv(S1, None))
    second = _adv(S2, t)
    torch.testing.assert_close(second, torch.tensor([a0, a0, a0, 0.0], dtype=torch.float64))
    # batch quantiles 0 and 1.6: S = 0 gives A_R = −1.6/0.6, A_C = 0 -> −(1.6/0.6)/2.5/2
    torch.testing.assert_close(_adv(S2, None)[0], torch.tensor(-(1.6 / 0.6) / 2.5 / 2,
                                                                 dtype=torch.float64))
    assert t.q[LO].item() == pytest.approx(0.545)  # updated after its use


def test_config_options_build_the_losss_state():
    assert PolicyLoss("riskpo").adv_state.mode == "mix"  # the release scripts' default
    t = PolicyLoss("riskpo", riskpo_quantile_mode="tracked", riskpo_quantile_lr=0.5).adv_state
    assert (t.mode, t.lr) == ("tracked", 0.5)
    assert PolicyLoss("riskpo", riskpo_quantile_mode="batch").adv_state is None
    assert PolicyLoss("grpo").adv_state is None
    with pytest.raises(ValueError, match="riskpo_quantile_mode"):
        resolve_algo("riskpo", riskpo_quantile_mode="median")


def test_toy_job_resume_restores_the_tracked_quantiles_bit_for_bit(tmp_path):
    from mmrl.demo.toy import run

    def go(out, steps):
        return run(config_from_dict({
            "job": "toy", "algo": {"preset": "riskpo", "riskpo_bundle": 2},
            "train": {"steps": steps, "prompts_per_step": 2, "group_size": 3, "seed": 3,
                      "progress": False, "output_dir": str(out), "log_every": 100,
                      "save_every": 1},
            "toy": {"digits": 5, "length": 2, "num_prompts": 8, "d_model": 8, "layers": 1,
                    "heads": 1}}))

    go(tmp_path / "a", 2)
    go(tmp_path / "b", 1)
    go(tmp_path / "b", 2)  # resumes at step 1

    def saved(out, step):
        folder = out / "checkpoints" / f"step-{step:08d}"
        return ckpt.load_checkpoint(folder)["state"]["advantage_state"]
    first, last = saved(tmp_path / "a", 1), saved(tmp_path / "a", 2)
    assert first["q"] is not None and first["q"] != last["q"]  # tracked, and it moved
    assert saved(tmp_path / "b", 2) == last  # exact floats after the resume
    a, b = torch.load(tmp_path / "a" / "final.pt"), torch.load(tmp_path / "b" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
