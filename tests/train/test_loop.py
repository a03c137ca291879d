"""The shared loop: split invariance, on-policy ratio 1, off-policy old_logp, NaN handling."""

import pytest
import torch

from mmrl.algo.advantages import group_advantages
from mmrl.train.loop import LoopSettings, Rollout, concat_rollouts, train_step, update
from mmrl.algo.losses import PolicyLoss
from mmrl.algo.presets import PRESETS
from tests.reference import objectives_ref as obj_ref
from mmrl.train.policy import Capabilities

B, T, V, D = 8, 6, 5, 4


class LinearPolicy:
    """logp[b, t] = log_softmax(feats[b, t] @ W)[token[b, t]]: tiny, exact, differentiable."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g) * 0.5)
        self.W0 = self.W.detach().clone() + 0.1
        self.g = g

    def parameters(self):
        return [self.W]

    def rollout(self, prompts, metadata, group_size, generator):
        n = len(prompts) * group_size
        feats = torch.randn(n, T, D, generator=generator)
        tokens = torch.randint(0, V, (n, T), generator=generator)
        lens = torch.randint(1, T + 1, (n,), generator=generator)
        mask = torch.arange(T)[None] < lens[:, None]
        samples = [int(t) for t in tokens[:, 0]]
        rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
        return Rollout(samples, rep(prompts), rep(metadata),
                       torch.arange(len(prompts)).repeat_interleave(group_size), mask,
                       {"feats": feats, "tokens": tokens})

    def _lp(self, W, r, rows, t0, t1):
        logits = r.data["feats"][rows, t0:t1] @ W
        return torch.log_softmax(logits, -1).gather(-1, r.data["tokens"][rows, t0:t1, None])[..., 0]

    def logp(self, r, rows, t0, t1):
        return self._lp(self.W, r, rows, t0, t1)

    def ref_logp(self, r, rows, t0, t1):
        return self._lp(self.W0, r, rows, t0, t1)

    def token_weights(self, r):
        return 1.0 + torch.rand(r.mask.shape, generator=torch.Generator().manual_seed(3))


def _rollout(seed=0):
    pol = LinearPolicy(seed)
    g = torch.Generator().manual_seed(seed + 7)
    r = pol.rollout(["p0", "p1"], [{}, {}], 4, g)
    adv = torch.randn(len(r), generator=g)
    adv = adv - adv.view(2, 4).mean(1).repeat_interleave(4)
    return pol, r, adv


def _delta(preset, settings, seed=0, **over):
    pol, r, adv = _rollout(seed)
    loss_fn = PolicyLoss(preset, **over)
    opt = torch.optim.SGD(pol.parameters(), lr=1.0)
    before = pol.W.detach().clone()
    tw = pol.token_weights(r) if loss_fn.spec.needs_token_weights else None
    stats = update(pol, opt, loss_fn, r, adv, settings, torch.Generator().manual_seed(1), tw)
    return pol.W.detach() - before, stats


def _presets_for_split():
    # clip_cov / kl_cov select tokens over the call's tokens (verl's micro-batch semantics, see
    # tests/algo/test_objectives_new.py::test_cov_selection_is_per_call): not split-invariant.
    # GRPO-Guard reads a Gaussian denoising step's terms, which this token policy does not have
    # (tests/diffusion/job/test_job_guard.py splits it through the diffusion job).
    return [p for p in sorted(PRESETS) if PRESETS[p].objective not in obj_ref.CALL_DEPENDENT
            and not PRESETS[p].needs_step_terms]


@pytest.mark.parametrize("preset", _presets_for_split())
def test_gradient_invariant_to_micro_batching_and_t_chunks(preset):
    over = {"max_len": T} if PRESETS[preset].aggregation == "fixed_norm" else {}
    if PRESETS[preset].needs_ref or True:
        over["beta"] = 0.04  # exercise the KL path too
    full, _ = _delta(preset, LoopSettings(group_size=4, max_grad_norm=0), **over)
    split_rows, _ = _delta(preset, LoopSettings(group_size=4, micro_batch_size=4 if
                                                PRESETS[preset].needs_groups else 3,
                                                max_grad_norm=0), **over)
    torch.testing.assert_close(split_rows, full, rtol=1e-5, atol=1e-6)
    if not PRESETS[preset].sequence_level:
        split_t, _ = _delta(preset, LoopSettings(group_size=4, micro_batch_size=3, t_chunk=2,
                                                 max_grad_norm=0), **over)
        torch.testing.assert_close(split_t, full, rtol=1e-5, atol=1e-6)
    assert full.abs().sum() > 0


@pytest.mark.parametrize("preset", ["grpo", "dapo"])
def test_rows_kept_but_not_counted_equal_rows_dropped(preset):
    """``Rollout.row_keep`` (FSDP keeps rows whose reward failed, masked out): the update equals
    the one on the rollout without those rows, for per-sequence and per-token normalizers."""
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    W = {}
    for how in ("dropped", "kept", "kept_uncounted"):
        pol, r, adv = _rollout()
        if how == "dropped":
            r, adv = r.select(keep), adv[keep]
        else:
            r.mask, adv = r.mask & keep[:, None], torch.where(keep, adv, 0.0)
            r.row_keep = keep if how == "kept" else None
        update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss(preset), r, adv,
               LoopSettings(group_size=4, max_grad_norm=0), torch.Generator().manual_seed(1))
        W[how] = pol.W.detach()
    torch.testing.assert_close(W["kept"], W["dropped"], rtol=1e-6, atol=1e-7)
    if preset == "grpo":  # per-sequence mean: 8 sequences counted instead of 6 is wrong
        assert not torch.allclose(W["kept_uncounted"], W["dropped"], rtol=1e-4, atol=1e-6)


def test_row_keep_follows_select_and_concat():
    _, r, _ = _rollout()
    r.row_keep = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    part = r.select(torch.tensor([1, 2, 5]))
    assert part.row_keep.tolist() == [False, True, False]
    _, plain, _ = _rollout(1)
    joined = concat_rollouts([part, plain.select(torch.tensor([0, 1]))])
    assert joined.row_keep.tolist() == [False, True, False, True, True]  # no row_keep: all kept
    assert concat_rollouts([plain, plain]).row_keep is None


def test_on_policy_ratio_is_exactly_one():
    _, stats = _delta("grpo", LoopSettings(group_size=4, micro_batch_size=3, t_chunk=2))
    assert float(stats["ratio_mean"]) == 1.0
    assert float(stats["clipfrac_low"]) == 0.0 and float(stats["clipfrac_high"]) == 0.0


def test_off_policy_epochs_use_recomputed_old_logp():
    # epoch 1 starts at ratio 1 (old_logp recomputed by the same forward), epoch 2 moves away
    _, stats = _delta("grpo", LoopSettings(group_size=4, inner_epochs=2, num_mini_batches=2))
    assert float(stats["ratio_max"]) > 1.0 or float(stats["ratio_min"]) < 1.0
    assert float(stats["ratio_min"]) <= float(stats["ratio_mean"]) <= float(stats["ratio_max"])


class DigitPolicy(LinearPolicy):
    pass


def test_train_step_drops_nan_rewards_and_counts_them():
    pol = LinearPolicy()
    loss_fn = PolicyLoss("grpo")
    opt = torch.optim.SGD(pol.parameters(), lr=0.1)

    def reward(samples, prompts, metadata):
        return [float("nan") if i == 0 else float(s) for i, s in enumerate(samples)]
    res = train_step(pol, opt, loss_fn, reward, ["a", "b"], [{}, {}],
                     LoopSettings(group_size=4), torch.Generator().manual_seed(0))
    assert res["dropped_samples"] == 1.0 and res["samples"] == 7.0
    assert res["skipped_updates"] == 0.0
    assert all(isinstance(v, float) for k, v in res.items() if k not in ("rollout", "rewards", "reward_error"))
    # the same step by hand on the 7 valid samples only: the same weights, the same reward mean
    ref, gen = LinearPolicy(), torch.Generator().manual_seed(0)
    r = ref.rollout(["a", "b"], [{}, {}], 4, gen)
    values = torch.tensor(reward(r.samples, None, None))
    keep = torch.isfinite(values)
    adv = group_advantages(values[keep], r.group_ids[keep], loss_fn.spec.advantage)
    update(ref, torch.optim.SGD(ref.parameters(), lr=0.1), loss_fn, r.select(keep), adv,
           LoopSettings(group_size=4), gen)
    assert torch.equal(pol.W.detach(), ref.W.detach())
    assert res["reward_mean"] == pytest.approx(float(values[keep].mean()), abs=1e-6)


def test_non_finite_gradient_skips_the_update():
    pol, r, adv = _rollout()
    adv = adv.clone()
    adv[0] = float("inf")
    before = pol.W.detach().clone()
    stats = update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss("grpo"), r, adv,
                   LoopSettings(group_size=4), torch.Generator().manual_seed(0))
    assert float(stats["skipped_updates"]) == 1.0
    torch.testing.assert_close(pol.W.detach(), before)


class TwoRowsPerSample(LinearPolicy):
    """Trains two rows per rewarded sample (like tree edges): uses the advantages hook."""

    capabilities = Capabilities(row_advantages=True)

    def rollout(self, prompts, metadata, group_size, generator):
        r = super().rollout(prompts, metadata, group_size, generator)
        rows = torch.arange(len(r.samples)).repeat_interleave(2)
        return Rollout(r.samples, r.prompts, r.metadata, r.group_ids[rows], r.mask[rows],
                       {k: v[rows] for k, v in r.data.items()})

    def advantages(self, rollout, rewards):
        from mmrl.algo.advantages import group_advantages
        total = rewards.values[:, 0]
        ok = torch.isfinite(total)
        adv = torch.zeros(len(total))
        gids = rollout.group_ids[::2]
        adv[ok] = group_advantages(total[ok], gids[ok])
        return adv.repeat_interleave(2)


def test_advantages_hook_trains_rows_that_are_not_reward_rows():
    pol = TwoRowsPerSample()
    before = pol.W.detach().clone()

    def reward(samples, prompts, metadata):
        return [float("nan") if i == 1 else float(s) for i, s in enumerate(samples)]
    res = train_step(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss("grpo"), reward,
                     ["a", "b"], [{}, {}], LoopSettings(group_size=4),
                     torch.Generator().manual_seed(0))
    assert len(res["rollout"]) == 16 and len(res["rollout"].samples) == 8
    assert res["dropped_samples"] == 1.0 and res["samples"] == 7.0
    # the same update by hand: all 16 rows, each with its sample's advantage (0 for the NaN one)
    ref, gen = TwoRowsPerSample(), torch.Generator().manual_seed(0)
    r = ref.rollout(["a", "b"], [{}, {}], 4, gen)
    values = torch.tensor(reward(r.samples, None, None))
    ok = torch.isfinite(values)
    adv = torch.zeros(8)
    adv[ok] = group_advantages(values[ok], r.group_ids[::2][ok])
    update(ref, torch.optim.SGD(ref.parameters(), lr=1.0), PolicyLoss("grpo"), r,
           adv.repeat_interleave(2), LoopSettings(group_size=4), gen)
    assert float(adv[1]) == 0.0 and not torch.equal(ref.W.detach(), before)
    assert torch.equal(pol.W.detach(), ref.W.detach())


def test_advantages_hook_with_wrong_shape_is_a_clear_error():
    pol = TwoRowsPerSample()
    pol.advantages = lambda rollout, rewards: torch.zeros(3)
    with pytest.raises(ValueError, match="one per training row"):
        train_step(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss("grpo"),
                   lambda s, p, m: [1.0] * len(s), ["a"], [{}], LoopSettings(group_size=2),
                   torch.Generator().manual_seed(0))


def test_a_rollouts_fixed_mini_batches_are_stepped_in_label_order():
    """``Rollout.mini_batch`` (G²RPO's step per SDE step): mini-batch j is the rows labelled j,
    in order; the update equals plain SGD steps on those rows one after another (each with the
    old log-probs of the start, as the loop scores them once)."""
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    pol, r, adv = _rollout()
    r.mini_batch = labels
    assert r.select(torch.tensor([5, 1])).mini_batch.tolist() == [1, 0]
    assert concat_rollouts([r, r]).mini_batch.tolist() == labels.tolist() * 2
    s = LoopSettings(group_size=4, num_mini_batches=2, max_grad_norm=0)
    update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss("grpo"), r, adv, s,
           torch.Generator().manual_seed(1))
    by_hand, r0, _ = _rollout()
    old = by_hand.logp(r0, torch.arange(B), 0, T).detach()
    for j in (0, 1):  # the clipped objective's gradient, one row set after the other
        rows = (labels == j).nonzero().flatten()
        ratio = torch.exp(by_hand.logp(r0, rows, 0, T) - old[rows])
        m = r0.mask[rows].float()
        a = adv[rows, None]
        per_tok = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)  # grpo: ε = 0.2
        loss = ((per_tok * m).sum(1) / m.sum(1)).mean()  # sequence mean of token means
        by_hand.W.grad = None
        loss.backward()
        with torch.no_grad():
            by_hand.W -= by_hand.W.grad
    torch.testing.assert_close(pol.W.detach(), by_hand.W.detach(), rtol=1e-5, atol=1e-6)
    r.mini_batch = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2])
    with pytest.raises(ValueError, match="fixes mini-batches \\[0, 2\\] but "
                                         "train.num_mini_batches=2"):
        update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss("grpo"), r, adv, s,
               torch.Generator().manual_seed(1))
