"""Run by tests/train/test_preference_step.py, under torchrun (2 ranks) or alone (1 process),
and imported by it for the helpers.

A deterministic linear pair policy (pair k's two samples are fixed by k, on any number of
ranks) and a stand-in for the DPO loss with the contract of
:class:`mmrl.algo.preference.PreferenceLoss` (sigmoid DPO, implicit rewards β·Σ_t(logp − ref),
Σ_pairs / num_pairs): preference_step's micro-batching and rank sums are tested on it alone.
Each entry of RUNS is one fresh step on pairs 0..n-1 (rank r takes every world-th pair), saved
as OUT/rank{r}-{i}.pt.
"""
import json
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from mmrl.train.distributed import init_distributed, maybe_destroy
from mmrl.train.loop import LoopSettings
from mmrl.train.policy import Capabilities
from mmrl.train.preference import PrefScores, preference_step
from mmrl.train.rollout import Rollout

T, V, D = 5, 6, 4


class LinearPairPolicy:
    """``logp = log_softmax(feats @ W)[token]``; the reference is a fixed perturbed copy."""

    capabilities = Capabilities(preference=True)

    def __init__(self, poison: bool = False):
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g))
        self.W_ref = self.W.detach() + 0.3 * torch.randn(D, V, generator=g)
        self.poison = poison  # pair_scores gives NaN (a diverged model)

    def parameters(self):
        return [self.W]

    def rollout(self, *a):
        raise NotImplementedError

    def logp(self, r, rows, t0, t1):
        return self._logp(self.W, r, rows)[:, t0:t1]

    def state_dict(self):
        return {"W": self.W}

    def load_state_dict(self, sd):
        self.W.data.copy_(sd["W"])

    def pair_rollout(self, records):
        feats, toks, lens = [], [], []
        for side in (0, 1):
            for rec in records:
                g = torch.Generator().manual_seed(1000 * rec["pair"] + side)
                feats.append(torch.randn(T, D, generator=g))
                toks.append(torch.randint(0, V, (T,), generator=g))
                lens.append(int(torch.randint(1, T + 1, (1,), generator=g)))
        P = len(records)
        mask = torch.arange(T)[None] < torch.tensor(lens, dtype=torch.long).reshape(-1, 1)
        r = Rollout([None] * 2 * P, [None] * 2 * P, [{} for _ in range(2 * P)],
                    torch.arange(2 * P) % max(P, 1), mask.reshape(2 * P, T),
                    {"feats": torch.stack(feats).reshape(2 * P, T, D) if P else
                     torch.zeros(0, T, D),
                     "tokens": torch.stack(toks).reshape(2 * P, T) if P else
                     torch.zeros(0, T, dtype=torch.long)})
        return r, torch.arange(P), torch.arange(P, 2 * P)

    def _logp(self, W, r, rows):
        logits = r.data["feats"][rows] @ W  # [p, T, V]
        out = torch.log_softmax(logits, -1).gather(-1, r.data["tokens"][rows][..., None])[..., 0]
        return out * float("nan") if self.poison else out

    def pair_scores(self, r, chosen_rows, rejected_rows, generator, with_ref):
        ref = (lambda rows: self._logp(self.W_ref, r, rows).detach()) if with_ref else \
            (lambda rows: None)
        return PrefScores(self._logp(self.W, r, chosen_rows), self._logp(self.W, r, rejected_rows),
                          r.mask[chosen_rows], r.mask[rejected_rows], ref(chosen_rows),
                          ref(rejected_rows))


class StandInDPO:
    """Sigmoid DPO with the PreferenceLoss contract (a test stand-in, not mmrl's loss)."""

    def __init__(self, beta: float = 0.5):
        self.spec = SimpleNamespace(needs_ref=True, beta=beta)

    def __call__(self, chosen_logp, rejected_logp, chosen_mask, rejected_mask, *,
                 chosen_ref=None, rejected_ref=None, num_pairs=None, **_):
        rc = self.spec.beta * ((chosen_logp - chosen_ref) * chosen_mask).sum(-1)
        rr = self.spec.beta * ((rejected_logp - rejected_ref) * rejected_mask).sum(-1)
        margin = rc - rr
        n = len(margin) if num_pairs is None else num_pairs
        loss = -F.logsigmoid(margin).sum() / n  # the stats too: Σ_pairs / num_pairs
        return loss, {"loss": loss.detach(), "reward_chosen": rc.detach().sum() / n,
                      "reward_rejected": rr.detach().sum() / n,
                      "reward_margin": margin.detach().sum() / n,
                      "reward_accuracy": (margin > 0).float().sum() / n}


def step(d, n_pairs: int, micro: int, max_grad_norm: float = 1.0, poison: bool = False):
    """One preference step on pairs 0..n_pairs-1 (this rank's share) -> (W, metrics)."""
    pol = LinearPairPolicy(poison)
    mine = [{"pair": k} for k in range(n_pairs)][d.rank::d.world]
    rollout, chosen, rejected = pol.pair_rollout(mine)
    opt = torch.optim.SGD([pol.W], lr=0.5)
    m = preference_step(pol, opt, StandInDPO(), rollout, chosen, rejected,
                        LoopSettings(micro_batch_size=micro, max_grad_norm=max_grad_norm),
                        torch.Generator().manual_seed(0), d)
    return pol.W.detach().clone(), m


def main(out, runs):
    d = init_distributed()
    for i, (n_pairs, micro) in enumerate(json.loads(runs)):
        W, m = step(d, n_pairs, micro)
        torch.save({"W": W, "metrics": m}, f"{out}/rank{d.rank}-{i}.pt")
    maybe_destroy(d)


if __name__ == "__main__":
    main(*sys.argv[1:])
