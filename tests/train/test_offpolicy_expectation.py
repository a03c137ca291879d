"""A deliberate rollout/training mismatch: the sampler draws from μ ≠ π_θ, reports log μ as
``Rollout.rollout_logp``. Through the loop's ``update`` (float64, many samples), the corrected
gradient equals the exact on-policy gradient E_{y~π}[−A(y)·Σ_t ∇log π(y_t)]/T (enumerated over
every sequence) within a few standard errors; the uncorrected one is biased.

The policy is a product of categoricals, one per position (logits θ [T, V]); the reward depends
on the whole sequence, so token-level weights (each token's own π/μ) do not correct it when
T > 1: only sequence weights do, as TIS/MIS write-ups say (tokens: low variance, biased).
Also: micro-batch / T-chunk invariance of the corrected update, and ``Rollout.rollout_logp``
through ``select`` and ``concat_rollouts``.
"""
import itertools

import pytest
import torch

from mmrl.algo.losses import PolicyLoss
from mmrl.train.loop import LoopSettings, update
from mmrl.train.policy import Capabilities, GroupPolicy, check_policy
from mmrl.train.rollout import Rollout

F64 = torch.float64
V = 3
BATCH, BATCHES = 4000, 20  # 80k samples per estimate


def reward(y: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B]``: position 0 is 1, and (T > 1) position 1 repeats position 0."""
    r = (y[:, 0] == 1).to(F64)
    if y.shape[1] > 1:
        r = r + 0.7 * (y[:, 1] == y[:, 0]).to(F64) - 0.4 * (y[:, -1] == 2).to(F64)
    return r


class Categorical(GroupPolicy):
    """π_θ(y) = Π_t softmax(θ_t)[y_t]; rollouts come from μ (``behaviour`` logits)."""

    capabilities = Capabilities(rollout_logp=True)

    def __init__(self, theta: torch.Tensor, behaviour: torch.Tensor):
        self.theta = torch.nn.Parameter(theta.clone())
        self.behaviour = torch.log_softmax(behaviour, -1)  # [T, V] log μ

    def parameters(self):
        return [self.theta]

    def state_dict(self):
        return {"theta": self.theta.detach()}

    def load_state_dict(self, state):
        self.theta.data.copy_(state["theta"])

    def rollout(self, prompts, metadata, group_size, generator) -> Rollout:
        B, T = len(prompts) * group_size, self.theta.shape[0]
        y = torch.multinomial(self.behaviour.exp(), B, replacement=True, generator=generator).T
        lp = self.behaviour.gather(-1, y.T).T  # [B, T] log μ of what was sampled
        return Rollout([None] * B, ["p"] * B, [{}] * B, torch.zeros(B, dtype=torch.long),
                       torch.ones(B, T, dtype=torch.bool), {"y": y}, rollout_logp=lp)

    def logp(self, rollout, rows, t0, t1):
        y = rollout.data["y"][rows, t0:t1]  # [b, t]
        return torch.log_softmax(self.theta[t0:t1], -1).gather(-1, y.T).T


def exact_gradient(theta: torch.Tensor, baseline: float) -> torch.Tensor:
    """∇θ of E_{y~π}[−sg(A(y))·Σ_t log π(y_t)]/T, enumerating all V^T sequences."""
    T = theta.shape[0]
    ys = torch.tensor(list(itertools.product(range(V), repeat=T)))  # [V^T, T]
    th = theta.clone().requires_grad_()
    logp = torch.log_softmax(th, -1).gather(-1, ys.T).T  # [V^T, T]
    prob = logp.sum(-1).exp().detach()
    loss = (prob * -(reward(ys) - baseline) * logp.sum(-1)).sum() / T
    return torch.autograd.grad(loss, th)[0]


def estimate(policy, loss_fn, baseline: float, seed: int):
    """(mean, standard error) of the loop's gradient over BATCHES independent batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # keeps θ, leaves .grad
    grads = []
    for _ in range(BATCHES):
        with torch.no_grad():
            ro = policy.rollout(["p"], [{}], BATCH, gen)
        adv = reward(ro.data["y"]) - baseline
        update(policy, opt, loss_fn, ro, adv, LoopSettings(group_size=BATCH, max_grad_norm=0.0),
               gen)
        grads.append(policy.theta.grad.detach().clone())
    g = torch.stack(grads)  # [K, T, V]
    return g.mean(0), g.std(0) / BATCHES ** 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny updates: one intra-op thread (a second one only adds synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def setup(T: int):
    g = torch.Generator().manual_seed(T)
    theta = torch.randn(T, V, generator=g, dtype=F64)
    behaviour = theta + torch.tensor([[0.9, -0.6, 0.0]] * T, dtype=F64)  # a deliberate mismatch
    return Categorical(theta, behaviour), exact_gradient(theta, 0.5)


def z_scores(policy, exact, seed, **algo):
    loss_fn = PolicyLoss("dapo", **algo)  # token_mean: Σ ℓ / (B·T) at equal lengths
    check_policy(policy, loss_fn.spec)
    mean, se = estimate(policy, loss_fn, 0.5, seed)
    assert float(se.max()) < 0.01  # many samples: a tight estimate
    return ((mean - exact).abs() / se).max()


@pytest.mark.parametrize("T, algo", [
    (2, dict(rollout_is="sequence_truncate", rollout_is_max=None)),  # plain sequence IS
    (2, dict(rollout_is="sequence_mask", rollout_is_max=50.0)),  # no weight reaches 50
    (1, dict(rollout_is="token_truncate", rollout_is_max=None)),  # one token = the sequence
    (1, dict(rollout_is="token_mask", rollout_is_min=0.01, rollout_is_max=50.0)),
])
def test_the_corrected_gradient_is_the_on_policy_gradient_in_expectation(T, algo):
    policy, exact = setup(T)
    w = (torch.log_softmax(policy.theta.detach(), -1) - policy.behaviour).exp()
    assert float(w.prod(0).max()) < 50 and float(w.min()) > 0.01  # bounds are not reached
    assert z_scores(policy, exact, seed=10 + T, **algo) < 4.0


@pytest.mark.parametrize("T, algo", [
    (2, dict()),  # no correction: E_μ, not E_π
    (1, dict()),
    (2, dict(rollout_is="token_truncate", rollout_is_max=None)),  # a sequence reward
])
def test_without_a_sequence_correction_the_gradient_is_biased(T, algo):
    policy, exact = setup(T)
    assert z_scores(policy, exact, seed=20 + T, **algo) > 10.0


def test_a_policy_that_does_not_report_rollout_logp_is_refused_before_the_run():
    class Silent(Categorical):
        capabilities = Capabilities()

    policy, _ = setup(1)
    silent = Silent(policy.theta.detach(), policy.behaviour)
    with pytest.raises(TypeError, match=r"algo.rollout_is='sequence_mask' weights by the "
                                        r"sampler's log-probs, and Silent does not report them"):
        check_policy(silent, PolicyLoss("grpo", rollout_is="sequence_mask").spec)
    check_policy(silent, PolicyLoss("grpo", off_policy_mask=0.5).spec)  # needs none


@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_the_loops_corrected_gradient_does_not_depend_on_micro_batches_or_t_chunks(
        mode, aggregation):
    """The loop passes each micro-batch's rows and steps of ``rollout_logp``; sequence modes
    (and the off-policy mask) turn T chunking off, so every split gives the full-batch gradient."""
    T = 4
    policy, _ = setup(T)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ro = policy.rollout(["p"], [{}], 10, gen)
    ro.mask = torch.arange(T)[None] < torch.tensor([4, 1, 3, 4, 2, 4, 0, 3, 4, 1])[:, None]
    adv = torch.linspace(-1.0, 1.2, 10, dtype=F64)
    loss_fn = PolicyLoss("grpo", rollout_is=mode, rollout_is_min=0.5, rollout_is_max=1.5,
                         aggregation=aggregation,
                         off_policy_mask=0.2 if mode.startswith("sequence") else None)
    assert loss_fn.spec.sequence_level == mode.startswith("sequence")  # token: chunks of T
    logp = policy.logp(ro, torch.arange(10), 0, T)
    loss, stats = loss_fn(logp, logp.detach(), adv, ro.mask, rollout_logp=ro.rollout_logp)
    assert 0 < float(stats["rollout_clipfrac"]) < 1
    assert float(stats.get("off_policy_masked", 1.0)) > 0
    want, = torch.autograd.grad(loss, policy.theta)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    for micro, t_chunk in [(0, 0), (4, 3), (1, 1)]:
        update(policy, opt, loss_fn, ro, adv, LoopSettings(
            group_size=10, micro_batch_size=micro, t_chunk=t_chunk, max_grad_norm=0.0), gen)
        torch.testing.assert_close(policy.theta.grad, want, rtol=1e-12, atol=1e-14)


def test_select_and_concat_carry_rollout_logp():
    from mmrl.train.rollout import concat_rollouts
    policy, _ = setup(2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a, b = policy.rollout(["p"], [{}], 3, gen), policy.rollout(["p"], [{}], 2, gen)
    b.mask, b.rollout_logp = b.mask[:, :1], b.rollout_logp[:, :1]  # a shorter T: padded
    picked = a.select(torch.tensor([2, 0]))
    assert torch.equal(picked.rollout_logp, a.rollout_logp[[2, 0]])
    assert torch.equal(a.select(torch.tensor([True, False, True])).rollout_logp,
                       a.rollout_logp[[0, 2]])
    both = concat_rollouts([a, b])
    assert torch.equal(both.rollout_logp[:3], a.rollout_logp)
    padded = torch.cat([b.rollout_logp, torch.zeros(2, 1, dtype=F64)], 1)  # [2, 1] -> [2, 2]
    assert torch.equal(both.rollout_logp[3:], padded)
    b.rollout_logp = None  # rows the correction could not weight: none for the whole
    assert concat_rollouts([a, b]).rollout_logp is None
