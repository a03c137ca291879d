"""Guidance for groups that never succeed, measured on the hard toy task.

``python benchmarks/bench_guidance.py [--steps 40] [--seeds 0 1 2] [--out docs/guidance.json]
[--plot docs/guidance.png]`` (about 10 minutes on one CPU thread)

The task: reverse 6 digits (0..4), exact-match reward (1 for the whole answer right, else 0),
groups of 8. A policy trained from scratch never succeeds there (every group all-fail, so
every method is idle: nothing to measure), so each seed starts from a weak *base model*: the
toy transformer fitted by teacher forcing for a few steps on the task with random answer
prefixes in its hint segment (so it can read a hint, as an instruction-tuned LM can) and the
plain task (so it is weakly able without one). Its plain exact accuracy is a few per cent:
most groups of 8 are all-fail. From it, GRPO trains ``--steps`` steps with each ``toy.guidance``
(``none`` = plain GRPO), same seeds, same prompts.

Measured per method (mean ± std over seeds):
- ``zero_adv``: the fraction of the trained groups with zero advantage (all rewards equal), over
  the steps (the runner's ``zero_std_frac``), after guidance re-rolled what it re-rolled;
- ``plain_acc``: exact accuracy on the plain prompts after training (8 samples per prompt, no
  hint): the reward the policy earns where hints are no longer present;
- ``rollouts``: samples drawn per step, guidance's extra ones included (the cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmrl.config.schema import config_from_dict
from mmrl.demo.config import TASKS
from mmrl.demo.toy import ToyConfig, ToyPolicy, ToyPrompt, exact_reward, make_prompts, \
    toy_guidance, toy_record
from mmrl.train.runner import run_training

METHODS = ["none", "none_g16", "ghpo", "keye", "scaf", "guide", "guide_w1", "guide_shaped",
           "expo", "xrpo_seed", "xrpo_seed_dataset"]
"""``none_g16``: plain GRPO with groups of 16, the control that spends extra samples without
hints (guidance draws up to about twice the plain 64 samples a step). ``guide``: Guide with the
truncated token rollout correction; ``guide_w1``: with its weights clamped to 1 ± 0.001, the
ablation of its importance weights; ``guide_shaped``: with the authors' correction
(``off_policy_shaping: percentile``, γ = the row's 0.9-quantile of r, plain rows uncorrected).
``xrpo_seed``: XRPO seeding from the records solved so far; ``xrpo_seed_dataset``: from every
record drawn so far (``guidance_exemplar_pool: dataset``)."""
TOY = dict(digits=5, length=6, num_prompts=64, d_model=32, layers=2, heads=4, reward="exact",
           hint_slot=True)


def base_model(c: ToyConfig, seed: int, steps: int) -> dict:
    """A weak base model that can read a hint: teacher forcing on fresh prompts, four in five
    with a random answer prefix (k digits) in the hint segment and the k prompt digits that
    prefix reverses replaced by random ones, so only the hint tells those answer digits (the
    model learns to copy a hint, as an instruction-tuned LM follows one)."""
    if c.task != "reverse":
        raise ValueError(f"the base model's hints are built for task reverse, got {c.task!r}")
    pol = ToyPolicy(c, seed=seed)
    opt = torch.optim.Adam(pol.model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        digits = torch.randint(0, c.digits, (64, c.length), generator=g).tolist()
        prompts, answers = [], []
        for d in digits:
            k = int(torch.randint(1, c.length, (1,), generator=g)) if torch.rand(
                1, generator=g) < 0.8 else 0
            answer = TASKS[c.task](d)
            noise = torch.randint(0, c.digits, (k,), generator=g).tolist()
            shown = d[:c.length - k] + noise  # reverse: answer[:k] comes from d[-k:]
            prompts.append(ToyPrompt(tuple(shown), tuple(answer[:k])))
            answers.append(answer + [pol.eos])
        answers = torch.tensor(answers)
        ids = torch.cat([pol.prompt_ids(prompts), torch.full((64, 1), pol.sep), answers], 1)
        logits = pol.model(ids[:, :-1])[:, -pol.T:]  # [64, T, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in pol.model.state_dict().items()}


@torch.no_grad()
def plain_accuracy(pol: ToyPolicy, prompts, metadata, seed: int, n: int = 8) -> float:
    r = pol.rollout(prompts, metadata, n, torch.Generator().manual_seed(seed))
    return float(exact_reward(r.samples, r.prompts, r.metadata).mean())


def run_one(method: str, seed: int, state: dict, steps: int, out: str) -> dict:
    group = 16 if method == "none_g16" else 8
    guidance = {"none_g16": "none", "guide_w1": "guide", "guide_shaped": "guide",
                "xrpo_seed_dataset": "xrpo_seed"}.get(method, method)
    toy = dict(TOY, guidance=guidance)
    if method == "xrpo_seed_dataset":
        toy["guidance_exemplar_pool"] = "dataset"
    algo = {"preset": "grpo", "beta": 0.0}
    if method == "guide":
        algo.update(rollout_is="token_truncate", rollout_is_max=3.0)
    if method == "guide_w1":
        algo.update(rollout_is="token_truncate", rollout_is_min=0.999, rollout_is_max=1.001)
    if method == "guide_shaped":
        algo.update(off_policy_shaping="percentile", off_policy_gamma=0.9)
    config = config_from_dict({
        "job": "toy", "algo": algo, "toy": toy,
        "train": {"steps": steps, "prompts_per_step": 8, "group_size": group, "lr": 1e-3,
                  "seed": seed, "device": "cpu", "progress": False, "log_every": 10 ** 6,
                  "output_dir": out, "save_every": 0}})
    c = config.task
    pol = ToyPolicy(c, seed=seed)
    pol.model.load_state_dict(state)
    prompts = make_prompts(c, 0)  # the same prompt set for every seed and method
    metadata = [toy_record(c, p) for p in prompts]
    before = plain_accuracy(pol, prompts, metadata, 7)
    t0 = time.perf_counter()
    hist = run_training(config, pol, exact_reward, prompts, metadata,
                        augmenters=toy_guidance(c, pol))["history"]
    seconds = time.perf_counter() - t0
    extra = sum(h.get("guided_rollouts", 0.0) for h in hist) / len(hist)
    return {"method": method, "seed": seed, "plain_acc_before": before,
            "plain_acc": plain_accuracy(pol, prompts, metadata, 7),
            "zero_adv": statistics.mean(h["zero_std_frac"] for h in hist),
            "zero_adv_last10": statistics.mean(h["zero_std_frac"] for h in hist[-10:]),
            "rollouts": 8 * group + extra, "seconds": seconds,
            "rescued": sum(h.get("guided_rescued", 0.0) for h in hist),
            "guided": sum(h.get("guided_groups", 0.0) for h in hist),
            "zero_adv_steps": [h["zero_std_frac"] for h in hist]}


def _ms(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--base-steps", type=int, default=55)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--plot", default=None, help="write the PNG here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            state = base_model(ToyConfig(**TOY), seed, a.base_steps)
            for m in a.methods:
                rows.append(run_one(m, seed, state, a.steps, f"{tmp}/{m}-{seed}"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| method | zero-adv groups (all steps) | zero-adv (last 10) | plain exact acc "
          f"before -> after {a.steps} steps | samples/step | groups rescued / all-fail |")
    print("|---|---|---|---|---|---|")
    for m in a.methods:
        r = [x for x in rows if x["method"] == m]
        z, z10 = _ms([x["zero_adv"] for x in r]), _ms([x["zero_adv_last10"] for x in r])
        b, acc = _ms([x["plain_acc_before"] for x in r]), _ms([x["plain_acc"] for x in r])
        print(f"| {m} | {z[0]:.3f} ± {z[1]:.3f} | {z10[0]:.3f} ± {z10[1]:.3f} | "
              f"{b[0]:.3f} -> {acc[0]:.3f} ± {acc[1]:.3f} | "
              f"{statistics.mean(x['rollouts'] for x in r):.0f} | "
              f"{sum(x['rescued'] for x in r):.0f} / {sum(x['guided'] for x in r):.0f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows) + "\n")
    if a.plot:
        plot(rows, a.methods, a.plot)
    return 0


def plot(rows, methods, path: str) -> None:
    """Zero-advantage fraction per step (mean over seeds, 5-step moving average) and the plain
    exact accuracy after training per method (mean ± std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        r = [x["zero_adv_steps"] for x in rows if x["method"] == m]
        mean = torch.tensor(r, dtype=torch.float64).mean(0)
        smooth = torch.nn.functional.avg_pool1d(mean[None, None], 5, 1, 2,
                                                count_include_pad=False)[0, 0]
        if not r:
            continue
        ax.plot(smooth.numpy(), label=m, lw=2 if m.startswith("none") else 1.2,
                ls="--" if m.startswith("none") else "-")
        acc = [x["plain_acc"] for x in rows if x["method"] == m]
        bx.bar(m, statistics.mean(acc), yerr=statistics.stdev(acc) if len(acc) > 1 else 0,
               capsize=3)
    before = statistics.mean(x["plain_acc_before"] for x in rows)
    bx.axhline(before, color="k", lw=1, ls=":", label="base model")
    ax.set(xlabel="step", ylabel="zero-advantage groups (fraction)", ylim=(0, 1),
           title="groups with no advantage (mean of seeds)")
    bx.set(ylabel="plain exact accuracy after training", title="reward without hints")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    bx.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
