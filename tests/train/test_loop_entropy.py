"""The loop with the entropy bonus, the top-entropy mask and empty_rows=skip: the update does not
depend on micro-batching (rows and T chunks), the mask is scored once at the update's start over
the whole mini-batch, skipped empty rows equal dropped rows, and check_policy names what is
missing."""

import pytest
import torch

from mmrl.algo.entropy import logp_and_entropy, top_entropy_mask
from mmrl.algo.losses import PolicyLoss
from mmrl.train.loop import LoopSettings, Rollout, update
from mmrl.train.policy import Capabilities, check_policy

B, T, V, D = 8, 6, 5, 4


class EntropyPolicy:
    """logits[b, t] = feats[b, t] @ W: logp of the sampled token and the entropy, exact."""

    capabilities = Capabilities(entropy=True)

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64))
        self.W0 = self.W.detach().clone() + 0.3
        self.scored = 0  # no-grad scoring calls (the start-of-update pass)

    def parameters(self):
        return [self.W]

    def state_dict(self):
        return {"W": self.W}

    def load_state_dict(self, sd):
        self.W.data.copy_(sd["W"])

    def rollout(self, prompts, metadata, group_size, generator):
        n = len(prompts) * group_size
        feats = torch.randn(n, T, D, generator=generator, dtype=torch.float64)
        tokens = torch.randint(0, V, (n, T), generator=generator)
        lens = torch.tensor([6, 3, 0, 5, 1, 0, 4, 2])[:n]  # two empty rows
        mask = torch.arange(T)[None] < lens[:, None]
        rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
        return Rollout(list(range(n)), rep(prompts), rep(metadata),
                       torch.arange(len(prompts)).repeat_interleave(group_size), mask,
                       {"feats": feats, "tokens": tokens})

    def _logits(self, W, r, rows, t0, t1):
        return r.data["feats"][rows, t0:t1] @ W  # [b, t, V]

    def logp_and_entropy(self, r, rows, t0, t1):
        if not torch.is_grad_enabled():
            self.scored += 1
        return logp_and_entropy(self._logits(self.W, r, rows, t0, t1),
                                r.data["tokens"][rows, t0:t1], chunk_size=2)

    def logp(self, r, rows, t0, t1):
        return self.logp_and_entropy(r, rows, t0, t1)[0]

    def ref_logp(self, r, rows, t0, t1):
        return torch.log_softmax(self._logits(self.W0, r, rows, t0, t1), -1).gather(
            -1, r.data["tokens"][rows, t0:t1, None])[..., 0]


def _setup(seed=0):
    pol = EntropyPolicy(seed)
    r = pol.rollout(["p0", "p1"], [{}, {}], 4, torch.Generator().manual_seed(seed + 7))
    adv = torch.randn(len(r), generator=torch.Generator().manual_seed(seed + 8),
                      dtype=torch.float64)
    return pol, r, adv


def _delta(preset, settings, over, pol_rollout=None):
    pol, r, adv = pol_rollout or _setup()
    before = pol.W.detach().clone()
    stats = update(pol, torch.optim.SGD(pol.parameters(), lr=1.0), PolicyLoss(preset, **over),
                   r, adv, settings, torch.Generator().manual_seed(1))
    return pol.W.detach() - before, stats


CASES = [
    ("grpo", dict(entropy_coef=0.1, top_entropy_quantile=0.3)),
    ("grpo", dict(entropy_coef=0.1, top_entropy_quantile=0.5, empty_rows="skip", beta=0.05,
                  kl_cap=0.2, kl_bias_correction=True)),
    ("dapo", dict(entropy_coef=0.2, top_entropy_quantile=0.2, beta=0.05, kl_bias_correction=True)),
    ("dr_grpo", dict(max_len=T, entropy_coef=0.1, empty_rows="skip")),
    ("sapo", dict(top_entropy_quantile=0.4)),
    ("gspo", dict(entropy_coef=0.1, empty_rows="skip", beta=0.05, kl_bias_correction=True)),
    ("gspo_token", dict(entropy_coef=0.1, top_entropy_quantile=0.5)),
]


@pytest.mark.parametrize("preset, over", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
@pytest.mark.parametrize("epochs, minis", [(1, 1), (2, 2)])
def test_update_is_invariant_to_micro_batching_and_t_chunks(preset, over, epochs, minis):
    full, stats = _delta(preset, LoopSettings(group_size=4, inner_epochs=epochs,
                                              num_mini_batches=minis, max_grad_norm=0), over)
    assert full.abs().sum() > 0
    sequence_level = PolicyLoss(preset, **over).spec.sequence_level
    for micro, t_chunk in ((3, 0), (2, 4)):
        split, _ = _delta(preset, LoopSettings(group_size=4, inner_epochs=epochs,
                                               num_mini_batches=minis, micro_batch_size=micro,
                                               t_chunk=0 if sequence_level else t_chunk,
                                               max_grad_norm=0), over)
        torch.testing.assert_close(split, full, rtol=1e-9, atol=1e-12)
    if over.get("top_entropy_quantile", 1) < 1:
        assert 0 < float(stats["entropy_kept"]) < 1


def test_bonus_changes_the_update_and_mask_comes_from_the_start_of_the_update():
    plain, _ = _delta("grpo", LoopSettings(group_size=4, max_grad_norm=0), {})
    bonus, stats = _delta("grpo", LoopSettings(group_size=4, max_grad_norm=0),
                          dict(entropy_coef=0.5))
    assert not torch.allclose(plain, bonus) and float(stats["entropy"]) > 0
    # one scoring pass per update (old logp and entropy together), whatever the epochs
    pol, r, adv = _setup()
    keep_seen = []
    loss_fn = PolicyLoss("grpo", top_entropy_quantile=0.25)
    inner = loss_fn.__call__

    def spy(*a, entropy_mask=None, **k):
        rows = [int((adv == x).nonzero()) for x in a[2]]  # advantages are distinct: the rows
        keep_seen.append((rows, entropy_mask.clone()))
        return inner(*a, entropy_mask=entropy_mask, **k)

    with torch.no_grad():
        _, h0 = pol.logp_and_entropy(r, torch.arange(len(r)), 0, T)
    pol.scored = 0
    update(pol, torch.optim.SGD(pol.parameters(), lr=5.0), _Spy(loss_fn, spy), r, adv,
           LoopSettings(group_size=4, inner_epochs=3, max_grad_norm=0),
           torch.Generator().manual_seed(1))
    assert pol.scored == 1  # the start-of-update pass, once for 3 epochs
    want = top_entropy_mask(h0, r.mask, 0.25)
    assert len(keep_seen) == 3 and all(torch.equal(k, want[rows]) for rows, k in keep_seen)
    assert sorted(keep_seen[0][0]) == list(range(B))
    # 21 valid tokens: τ = the 0.75-quantile at sorted position 20·0.75 = 15 -> 15..20 kept
    assert int(r.mask.sum()) == 21 and int(want.sum()) == 6


class _Spy:
    """A PolicyLoss stand-in that records the calls (the loop reads ``spec``, then calls)."""

    def __init__(self, loss_fn, call):
        self.spec, self._call = loss_fn.spec, call

    def __call__(self, *a, **k):
        return self._call(*a, **k)


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_skipped_empty_rows_equal_dropped_rows(preset):
    pol, r, adv = _setup()
    skipped, _ = _delta(preset, LoopSettings(group_size=4, max_grad_norm=0),
                        dict(empty_rows="skip"), (pol, r, adv))
    keep = r.mask.any(-1)
    pol2, _, _ = _setup()
    dropped, _ = _delta(preset, LoopSettings(group_size=4, max_grad_norm=0), {},
                        (pol2, r.select(keep), adv[keep]))
    torch.testing.assert_close(skipped, dropped, rtol=1e-10, atol=1e-12)
    pol3, _, _ = _setup()
    counted, _ = _delta(preset, LoopSettings(group_size=4, max_grad_norm=0), {}, (pol3, r, adv))
    torch.testing.assert_close(counted, dropped * 6 / 8, rtol=1e-10, atol=1e-12)  # 8 rows vs 6


def test_check_policy_names_the_missing_entropy_capability_and_reason():
    class NoEntropy(EntropyPolicy):
        capabilities = Capabilities(why_not={"entropy": "its steps have no vocabulary"})

    spec = PolicyLoss("grpo", entropy_coef=0.01).spec
    assert check_policy(EntropyPolicy(), spec).entropy
    with pytest.raises(TypeError) as err:
        check_policy(NoEntropy(), spec)
    assert str(err.value) == (
        "algo.entropy_coef > 0 / algo.top_entropy_quantile < 1 needs Capabilities(entropy=True), "
        "which NoEntropy does not declare: its steps have no vocabulary; set "
        "algo.entropy_coef=0 and algo.top_entropy_quantile=1")
    assert check_policy(NoEntropy()).declared() == []  # why_not is not a capability

    class Lacks:
        capabilities = Capabilities(entropy=True)

        def __getattr__(self, name):
            if name == "logp_and_entropy":
                raise AttributeError(name)
            return lambda *a, **k: None

    with pytest.raises(TypeError, match="lacks logp_and_entropy"):
        check_policy(Lacks())
