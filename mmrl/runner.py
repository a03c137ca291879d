"""Drive the shared loop for a whole run: seeding, prompt order, metrics, progress, final weights."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from mmrl.loop import LoopSettings, train_step
from mmrl.losses import PolicyLoss


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator the loop uses for sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class MetricsLog:
    """Append one JSON object per step to ``metrics.jsonl`` (and TensorBoard when installed)."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def run_training(config, policy, reward_fn, prompts: Sequence[Any],
                 metadata: Optional[Sequence[Dict[str, Any]]] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Train ``policy`` for ``config.train.steps`` iterations; returns a summary dict.

    Writes ``config.yaml``, ``metrics.jsonl`` and ``final.pt`` (the policy's trainable weights)
    under ``config.train.output_dir``.
    """
    t = config.train
    if not prompts:
        raise ValueError("no prompts to train on; check the job's prompt source")
    metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from mmrl.schema import save_config
    save_config(config, out / "config.yaml")
    gen = seed_everything(t.seed)
    loss_fn = PolicyLoss(config.algo.preset, **config.algo.overrides())
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    settings = LoopSettings(t.group_size, t.inner_epochs, t.num_mini_batches,
                            t.micro_batch_size, t.t_chunk, t.max_grad_norm)
    log, bar = MetricsLog(out), _progress(t.steps, t.progress)
    history: List[Dict[str, float]] = []
    bad_in_row = 0
    start = time.time()
    try:
        for step in range(t.steps):
            idx = torch.randint(0, len(prompts), (t.prompts_per_step,), generator=gen).tolist()
            tic = time.time()
            res = train_step(policy, opt, loss_fn, reward_fn, [prompts[i] for i in idx],
                             [metadata[i] for i in idx], settings, gen,
                             multi_reward=config.algo.multi_reward,
                             reward_weights=config.algo.reward_weights)
            m = {k: v for k, v in res.items() if isinstance(v, float)}
            m["step_time"] = time.time() - tic
            log.write(step, m)
            history.append(m)
            bad_in_row = bad_in_row + 1 if m.get("skipped_updates", 0) > 0 else 0
            if bad_in_row >= t.max_bad_steps:
                raise RuntimeError(f"{bad_in_row} consecutive steps had a non-finite loss or "
                                   f"gradient (last step {step}); lower train.lr or check the "
                                   f"reward. Metrics so far: {log.path}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{m.get('reward_mean', float('nan')):.3f}")
            if step % t.log_every == 0 or step == t.steps - 1:
                line = (f"step {step:4d}  reward {m.get('reward_mean', float('nan')):.3f}  "
                        f"loss {m.get('loss', float('nan')):+.4f}  "
                        f"grad {m.get('grad_norm', float('nan')):.3f}  "
                        f"zero_std {m.get('zero_std_frac', float('nan')):.2f}  "
                        f"dropped {int(m.get('dropped_samples', 0))}")
                (bar.write(line) if bar is not None else print(line, flush=True))
    finally:
        log.close()
        if bar is not None:
            bar.close()
    model = getattr(policy, "model", None)
    if isinstance(model, torch.nn.Module):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   out / "final.pt")
    rewards = [h.get("reward_mean", float("nan")) for h in history]
    k = max(1, min(5, len(rewards) // 4))
    return {"steps": len(history), "seconds": time.time() - start,
            "reward_first": float(np.mean(rewards[:k])), "reward_last": float(np.mean(rewards[-k:])),
            "output_dir": str(out), "history": history}
