"""Observability for a run: the metrics stream (JSONL, TensorBoard, W&B), progress, sample logs,
throughput and memory, and the SIGTERM/SIGINT stop request."""
from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch


class MetricsLog:
    """One JSON object per step in ``metrics.jsonl`` (and TensorBoard when installed)."""

    def __init__(self, out_dir: Path, start_step: int = 0, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # on resume, drop lines of steps that will be redone
            keep = [l for l in self.path.read_text().splitlines()
                    if l.strip() and _step_of(l) < start_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step)
            except Exception:  # tensorboard is optional
                self.tb = None
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(f"train.wandb_project={wandb_project!r} needs the wandb "
                                 f"package: pip install wandb (or unset wandb_project)") from None
            self.wandb = wandb.init(project=wandb_project, config=config, resume="allow",
                                    dir=str(out_dir))

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class MediaLog:
    """Pictures and videos of a run (the diffusion evaluation's grids) to TensorBoard and W&B,
    beside :class:`MetricsLog`, which the runner owns and the evaluator cannot reach.

    TensorBoard: its own writer in ``<out>/tb`` (event files ending ``.media``, so one
    TensorBoard run shows scalars and pictures); videos are not sent there (``add_video`` needs
    moviepy): log a frame strip as an image instead. W&B (``wandb_project`` set): the run
    :class:`MetricsLog` opened (``wandb.run``); once it has finished (the evaluation after the
    last step) that run is resumed by its id, logged to and finished again.
    """

    def __init__(self, out_dir: Path, tensorboard: bool = True,
                 wandb_project: Optional[str] = None):
        self.out, self.tensorboard, self.project = Path(out_dir), tensorboard, wandb_project
        self.tb, self.run_id = None, None

    def log(self, step: int, images: Dict[str, str], videos: Dict[str, str]) -> None:
        """``images`` / ``videos``: ``{tag: file path}`` (PNG; MP4 or GIF)."""
        if self.tensorboard and self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tb"), filename_suffix=".media")
            except Exception:  # tensorboard is optional
                self.tensorboard = False
        if self.tb is not None:
            import numpy as np
            from PIL import Image
            for tag, path in images.items():
                self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step,
                                  dataformats="HWC")
            self.tb.flush()
        if self.project:
            self._wandb(step, images, videos)

    def _wandb(self, step: int, images: Dict[str, str], videos: Dict[str, str]) -> None:
        import wandb
        run, resumed = wandb.run, False
        if run is None and self.run_id is None:
            return  # no run to log to (the metrics log opens it)
        if run is None:
            run, resumed = wandb.init(project=self.project, id=self.run_id, resume="must",
                                      dir=str(self.out)), True
        self.run_id = run.id
        run.log({**{k: wandb.Image(v) for k, v in images.items()},
                 **{k: wandb.Video(v) for k, v in videos.items()}}, step=step)
        if resumed:
            run.finish()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


class StopRequest:
    """SIGTERM/SIGINT -> finish the step, checkpoint, exit; a second SIGINT raises at once."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc="train", unit="step",
                    dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


def throughput(m: Dict[str, float], rollout, d) -> Dict[str, float]:
    """Tokens (or trained steps) per second, model evaluations per second when the policy
    counts them (``rollout.nfe``), and peak memory of this process."""
    out = {"tokens_per_sec": m.get("tokens", 0.0) / max(m["step_time"], 1e-9)}
    total = float(d.all_reduce_sum(torch.tensor(float(rollout.nfe))))  # every rank calls it
    if total > 0:
        out.update({"nfe": total, "nfe_per_sec": total / max(m["step_time"], 1e-9)})
    if torch.cuda.is_available():
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return out


def log_samples(path: Path, step: int, rollout, rewards) -> None:
    """Append this step's (prompt, completion, rewards) rows; non-text samples are omitted."""
    with path.open("a") as f:
        for i, (prompt, sample) in enumerate(zip(rollout.prompts, rollout.samples)):
            row = {"step": step, "group": int(rollout.group_ids[i]) if i < len(
                rollout.group_ids) else None,
                   "prompt": prompt if isinstance(prompt, str) else repr(prompt)[:2000],
                   "sample": sample if isinstance(sample, (str, int, float, list)) else None,
                   "rewards": {n: float(rewards.values[i, k]) for k, n in
                               enumerate(rewards.names)} if i < len(rewards.values) else None}
            f.write(json.dumps(row) + "\n")


def report_step(bar, step: int, m: Dict[str, float], t) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{m.get('reward_mean', float('nan')):.3f}")
    if step % t.log_every == 0 or step == t.steps - 1:
        line = step_line(step, m)
        (bar.write(line) if bar is not None else print(line, flush=True))


def step_line(step: int, m: Dict[str, float]) -> str:
    """The progress line of a step's metrics (an RL, preference or SFT step)."""
    nan = float("nan")
    if m.get("sft_step"):  # an SFT step (mmrl.train.sft_stage)
        return (f"step {step:4d}  sft  targets {int(m.get('sft_targets', 0))}  "
                f"loss {m.get('loss', nan):.4f}  grad {m.get('grad_norm', nan):.3f}"
                if m.get("sft_tokens") else f"step {step:4d}  sft  no usable target: nothing "
                f"learned")
    if m.get("pref_step"):  # a preference step (mmrl.train.pref_stage)
        return (f"step {step:4d}  pref  pairs {int(m.get('pairs', 0))}  "
                f"loss {m.get('loss', nan):+.4f}  grad {m.get('grad_norm', nan):.3f}  "
                f"acc {m.get('pref_reward_accuracy', nan):.2f}"
                if m.get("pairs") else f"step {step:4d}  pref  no pair (every group tied "
                f"or no usable record): nothing learned")
    if not math.isfinite(m.get("reward_mean", nan)):  # nothing was scored
        return (f"step {step:4d}  no valid sample: nothing learned  "
                f"dropped {int(m.get('dropped_samples', 0))}")
    return (f"step {step:4d}  reward {m.get('reward_mean', nan):.3f}  "
            f"loss {m.get('loss', nan):+.4f}  grad {m.get('grad_norm', nan):.3f}  "
            f"zero_std {m.get('zero_std_frac', nan):.2f}  "
            f"dropped {int(m.get('dropped_samples', 0))}")


def step_rewards(history: List[Dict[str, float]], out: Path) -> List[float]:
    """Mean reward of each step that had samples: this session's ``history``, or (a resumed run
    that had nothing left to do) the ones ``out/metrics.jsonl`` recorded, so a run's summary
    never reports nan."""
    rewards = [h["reward_mean"] for h in history if "reward_mean" in h]
    path = Path(out) / "metrics.jsonl"
    if not rewards and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rewards = [row["reward_mean"] for row in rows if "reward_mean" in row]
    return rewards


def drop_cause(reward_error: Optional[str], nonfinite: str, dropped: float,
               skipped: Dict[str, int]) -> str:
    """Why a step had no valid sample, and what to do about it (for the stop message)."""
    if reward_error:
        return (f"every sample was dropped because {reward_error}. Fix the reward (call "
                f"mmrl.train.reward_fn.evaluate_reward(fn, samples, prompts, metadata) on a few "
                f"samples to see the error; a TimeoutError: raise train.reward_timeout)")
    if nonfinite:
        return (f"the reward returned NaN/inf for every sample ({nonfinite}). Make it return "
                f"finite numbers")
    if dropped == 0:
        why = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "reasons not given"
        return (f"the policy returned no samples: every prompt's input was skipped ({why}; "
                f"e.g. unreadable videos or images). Check the dataset")
    return f"all {int(dropped)} sample(s) were dropped. Check the reward and the inputs"
