"""Run by tests/train/test_distributed.py: one GRPO update of a REAL job's policy (video or
diffusion) on the same global rollout, in 1 process or sharded over torchrun ranks.

    python job_step.py OUT CONFIG key=value ...            # 1 process
    torchrun --nproc_per_node=2 job_step.py OUT CONFIG ...  # 2 ranks
    python job_step.py OUT CONFIG key=value ... --also key=value ...  # then a 2nd run
    python job_step.py OUT CONFIG key=value ... --also CONFIG2 key=value ...  # another job

Each ``--also`` starts another run in the same processes (one torchrun launch for several
cases): of the same job with the common overrides plus its own, or, when its first word is a
config file (``*.yaml``), of that config with its own overrides only; run i > 0 saves
OUT/rank{r}_{i}.pt.

The job builds its policy, reward and prompts as usual; `run_training` is replaced by a function
that rolls out the first prompts_per_step prompts ONCE per process with a fixed generator (every
rank gets the same full rollout), keeps this rank's contiguous shard of rows, and calls the shared
loop's `learn` with the data-parallel context. Saves the trainable weights to OUT/rank{r}.pt
(and, for the video policy, whether it ran the shared-prefix forward).
"""
import dataclasses
import os
import sys

import torch

import mmrl.train.runner
from mmrl.train.distributed import init_distributed, maybe_destroy
from mmrl.train.batch import batch_advantages
from mmrl.train.loop import LoopSettings, collect, learn
from mmrl.train.matching import train_matching
from mmrl.train.policy import capabilities_of
from mmrl.algo.losses import PolicyLoss
from mmrl.config.schema import load_config


def one_update(config, policy, reward_fn, prompts, metadata, **_):
    d = init_distributed()
    t = config.train
    s = dataclasses.replace(LoopSettings.from_train(t), inner_epochs=1, num_mini_batches=1,
                            max_grad_norm=0.0)
    P = t.prompts_per_step
    rollout, rewards, _ = collect(policy, reward_fn, prompts[:P], metadata[:P], s,
                                  torch.Generator().manual_seed(1234))
    total = P * t.group_size  # rows laid out prompt after prompt, as shard_samples cuts them
    lo, hi = total * d.rank // d.world, total * (d.rank + 1) // d.world
    keep = torch.zeros(len(rollout), dtype=torch.bool)
    keep[lo:hi] = True
    rollout, rewards = rollout.select(keep), rewards.select(keep)
    initial = {n: p.detach().clone() for n, p in _named(policy) if p.requires_grad}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr)
    loss_fn = PolicyLoss(config.algo.preset, **config.algo.overrides())
    if capabilities_of(policy).matching:  # DiffusionNFT / AWM: the runner's train_matching
        batch = batch_advantages(policy, loss_fn, rollout, rewards,
                                 reward_weights=config.algo.reward_weights, dist=d)
        res = train_matching(policy, opt, loss_fn, batch, s, torch.Generator().manual_seed(0), d)
    else:
        res = learn(policy, opt, loss_fn, rollout, rewards, s, torch.Generator().manual_seed(0),
                    reward_weights=config.algo.reward_weights, dist=d)
    weights = {n: p.detach().clone() for n, p in _named(policy) if p.requires_grad}
    torch.save({"weights": weights, "initial": initial, "loss": res["loss"],
                "reward_mean": res["reward_mean"],
                # the video policy's forward (None: a policy without the switch)
                "shared_prefix": getattr(policy, "shared_prefix", None)},
               os.path.join(OUT, f"rank{d.rank}{SUFFIX}.pt"))
    return {}


def _named(policy):
    model = getattr(policy, "model", None) or getattr(getattr(policy, "flow", None),
                                                      "transformer", None)
    if isinstance(model, torch.nn.Module):
        return list(model.named_parameters())
    return [(str(i), p) for i, p in enumerate(policy.parameters())]


if __name__ == "__main__":
    OUT, path, args = sys.argv[1], sys.argv[2], " ".join(sys.argv[3:])
    common, *also = [part.split() for part in args.split("--also")]
    os.makedirs(OUT, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    from mmrl.config.jobs import get_job
    mmrl.train.runner.run_training = one_update
    for i, extra in enumerate([[]] + also):
        SUFFIX = f"_{i}" if i else ""
        run_path, overrides = (extra[0], extra[1:]) if extra and extra[0].endswith(".yaml") \
            else (path, common + extra)
        # per-rank output folders: jobs write data/models there (identical, seeded) without races
        config = load_config(run_path,
                             overrides + [f"train.output_dir={OUT}/work{rank}{SUFFIX}"])
        get_job(config.job).run(config)
    maybe_destroy(init_distributed())  # after every run: the process group serves them all
