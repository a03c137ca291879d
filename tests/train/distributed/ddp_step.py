"""Run by tests/test_distributed.py, under torchrun (2 ranks) or alone (1 process).

One GRPO train_step of a deterministic linear policy on a fixed global batch of 3 prompts x 4
samples (12 samples: with 2 ranks, prompt 1's group spans both ranks). Saves this rank's weights
and metrics to OUT/rank{r}.pt. An optional 4th argument (JSON) lists several runs instead.
"""
import json
import sys

import torch

from mmrl.train.distributed import init_distributed, maybe_destroy, shard_samples
from mmrl.train.loop import LoopSettings, Rollout, train_step
from mmrl.algo.entropy import logp_and_entropy
from mmrl.algo.losses import PolicyLoss
from mmrl.train.policy import Capabilities

T, V, D = 5, 6, 4


class DeterministicPolicy:
    """Sample (prompt p, member j) is fixed by (p, j): the same on any number of ranks; its
    greedy completion is member 100."""

    capabilities = Capabilities(greedy=True, entropy=True)

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g))

    def parameters(self):
        return [self.W]

    def rollout(self, prompts, metadata, group_size, generator):
        feats, toks, lens, gids, samples = [], [], [], [], []
        for k, (p, m, n) in enumerate(zip(prompts, metadata, group_size)):
            for j in range(m["first_member"], m["first_member"] + n):
                g = torch.Generator().manual_seed(1000 * p + j)
                feats.append(torch.randn(T, D, generator=g))
                toks.append(torch.randint(0, V, (T,), generator=g))
                lens.append(int(torch.randint(1, T + 1, (1,), generator=g)))
                gids.append(k)
                samples.append((p, j))
        mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
        rep = [metadata[k] for k in gids]
        return Rollout(samples, [prompts[k] for k in gids], rep, torch.tensor(gids), mask,
                       {"feats": torch.stack(feats), "tokens": torch.stack(toks)})

    def greedy_rollout(self, prompts, metadata, generator):
        meta = [{"first_member": 100} for _ in prompts]
        return self.rollout(prompts, meta, [1] * len(prompts), generator)

    def logp(self, r, rows, t0, t1):
        return self.logp_and_entropy(r, rows, t0, t1)[0]

    def logp_and_entropy(self, r, rows, t0, t1):
        return logp_and_entropy(r.data["feats"][rows, t0:t1] @ self.W,
                                r.data["tokens"][rows, t0:t1])


def reward(samples, prompts, metadata):
    return [float((p * 7 + j * 3) % 5) for p, j in samples]


def main(out, preset, micro, runs="[]"):
    """One step of ``preset``, saved as OUT/rank{r}.pt; with ``runs`` (JSON: a list of
    ``[preset, micro, {algo overrides}]``), one fresh step per entry instead, saved as
    OUT/rank{r}-{i}.pt."""
    d = init_distributed()
    entries = json.loads(runs)
    if not entries:
        _step(d, f"{out}/rank{d.rank}.pt", preset, micro, {})
    for i, (name, mb, over) in enumerate(entries):
        _step(d, f"{out}/rank{d.rank}-{i}.pt", name, mb, over)
    maybe_destroy(d)


def _step(d, path, preset, micro, over):
    prompts, counts = [10, 11, 12], [4, 4, 4]
    local = shard_samples(counts, d)
    starts = [sum(counts[:k]) for k in range(3)]
    lo = sum(counts) * d.rank // d.world
    mine = [(k, c) for k, c in enumerate(local) if c > 0]
    meta = [{"first_member": max(0, lo - starts[k])} for k, _ in mine]
    pol = DeterministicPolicy()
    opt = torch.optim.SGD(pol.parameters(), lr=1.0)
    over = {"max_len": T, **over} if preset == "dr_grpo" else over
    res = train_step(pol, opt, PolicyLoss(preset, **over), reward, [prompts[k] for k, _ in mine],
                     meta, LoopSettings(group_size=4, micro_batch_size=micro, max_grad_norm=0),
                     torch.Generator().manual_seed(0), group_sizes=[c for _, c in mine],
                     group_ids=[k for k, _ in mine], dist=d)
    metrics = {k: v for k, v in res.items() if isinstance(v, float)}
    torch.save({"W": pol.W.detach(), "metrics": metrics}, path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
