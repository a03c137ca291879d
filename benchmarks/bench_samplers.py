"""Sampler costs side by side in one process: tree vs independent, singular vs full, SDE vs Euler.

Velocity network: a small random SD3 transformer (diffusers ``SD3Transformer2DModel`` built from
config, no weights downloaded), so NFE translate into real transformer forward passes.

    .venv/bin/python benchmarks/bench_samplers.py            # CPU, about a minute
    .venv/bin/python benchmarks/bench_samplers.py --device cuda --latent 64 --layers 4

Prints one line per comparison with the ratio (candidate / baseline) of NFE and wall time.
Goal (issue 5): tree NFE <= 0.5x independent trajectories for a group of 16 leaves.
"""
from __future__ import annotations

import argparse
import time

import torch

from mmrl.diffusion import (euler_step, flow_sigmas, sample_sde, sample_singular, sample_tree,
                            sde_step)


def make_velocity(args):
    """A random tiny SD3 transformer as ``velocity_fn(x, sigma, cond)``; cond = (emb, pooled)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=args.latent, patch_size=2, in_channels=args.channels, num_layers=args.layers,
        attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
        joint_attention_dim=64, pooled_projection_dim=64, out_channels=args.channels)
    model = model.to(args.device).eval()

    @torch.no_grad()
    def velocity(x, sigma, cond):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond[0],
                     pooled_projections=cond[1]).sample

    return velocity


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_pair(fn_a, fn_b, device, repeats):
    """Run a and b alternately ``repeats`` times; (out_a, out_b, best_a, best_b) in seconds.

    Alternating keeps both measurements under the same load on a shared machine; the best run
    of each is kept.
    """
    best, out = [float("inf")] * 2, [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((fn_a, fn_b)):
            _sync(device)
            start = time.perf_counter()
            out[k] = fn()
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - start)
    return out[0], out[1], best[0], best[1]


def line(name, cand, base, t_cand, t_base):
    print(f"{name:<44} NFE {cand:>5} vs {base:>5} = {cand / base:5.2f}x   "
          f"wall {t_cand:7.3f}s vs {t_base:7.3f}s = {t_cand / t_base:5.2f}x")


def bench_tree(args, velocity, cond1, sigmas):
    leaves = 16
    noise = torch.randn(1, args.channels, args.latent, args.latent, device=args.device)
    cond16 = tuple(c.expand(leaves, *c.shape[1:]) for c in cond1)
    splits = [int(s) for s in args.tree_splits.split(",")]
    tree, indep, t_tree, t_ind = timed_pair(
        lambda: sample_tree(velocity, noise, sigmas, cond1, split_steps=splits, branching=2),
        lambda: sample_sde(velocity, noise.expand(leaves, *noise.shape[1:]), sigmas, cond16),
        args.device, args.repeats)
    assert tree.final.shape[0] == leaves, "tree_splits must give 16 leaves with branching 2"
    line(f"tree (splits {splits}, b=2) vs 16 independent", tree.nfe, indep.nfe, t_tree, t_ind)
    noise16 = noise.expand(leaves, *noise.shape[1:])
    sde, ode, t_sde, t_ode = timed_pair(
        lambda: sample_sde(velocity, noise16, sigmas, cond16),
        lambda: sample_sde(velocity, noise16, sigmas, cond16, sde_steps=[]),
        args.device, args.repeats)
    line("full SDE sampler vs ODE sampler (16 rows)", sde.nfe, ode.nfe, t_sde, t_ode)
    return tree.nfe / indep.nfe


def bench_singular(args, velocity, cond1, sigmas):
    n, ks, grans = args.group, [int(k) for k in args.singular_steps.split(",")], [1, 2]
    noise = torch.randn(1, args.channels, args.latent, args.latent, device=args.device)
    condn = tuple(c.expand(n, *c.shape[1:]) for c in cond1)
    sing, full, t_sing, t_full = timed_pair(
        lambda: sample_singular(velocity, noise, sigmas, cond1, group_size=n, steps=ks,
                                granularities=grans),
        lambda: sample_sde(velocity, noise.expand(n, *noise.shape[1:]), sigmas, condn),
        args.device, args.repeats)
    line(f"singular (k={ks}, g={grans}, N={n}) vs full SDE", sing.nfe, full.nfe, t_sing, t_full)
    per_img = (sing.nfe / sing.final.shape[0]) / (full.nfe / full.final.shape[0])
    print(f"{'  per image':<44} {sing.final.shape[0]} vs {full.final.shape[0]} images; "
          f"NFE per image {per_img:4.2f}x")
    per_tr = (sing.nfe / sing.num_transitions) / (full.nfe / full.num_transitions)
    print(f"{'  per trained transition':<44} {sing.num_transitions} vs {full.num_transitions} "
          f"transitions; NFE per transition {per_tr:4.2f}x")


def bench_step(args, sigmas):
    shape = (args.step_batch, 16, 64, 64)  # SD3 latents of 512x512 images
    g = torch.Generator(device=args.device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=args.device)
    v = torch.randn(shape, generator=g, device=args.device)
    sig = sigmas.to(args.device)
    reps = 20

    def run(fn):
        return lambda: [fn(i % (sig.shape[0] - 2)) for i in range(reps)]

    _, _, t_sde, t_euler = timed_pair(run(lambda i: sde_step(x, v, sig, i, generator=g)),
                                      run(lambda i: euler_step(x, v, sig, i)), args.device,
                                      args.repeats)
    prev = sde_step(x, v, sig, 3, generator=g).prev_sample
    _, _, t_score, t_noise = timed_pair(
        run(lambda i: sde_step(x, v, sig, i, prev_sample=prev)),
        run(lambda i: torch.randn(shape, generator=g, device=args.device)), args.device,
        args.repeats)
    print(f"{'sde_step (sample) vs Euler step':<44} per step {1e3 * t_sde / reps:7.2f} ms vs "
          f"{1e3 * t_euler / reps:7.2f} ms = {t_sde / t_euler:5.2f}x  (latent {list(shape)})")
    print(f"{'sde_step (re-score) vs Euler step':<44} per step {1e3 * t_score / reps:7.2f} ms vs "
          f"{1e3 * t_euler / reps:7.2f} ms = {t_score / t_euler:5.2f}x")
    print(f"{'  of which drawing the Gaussian noise':<44} per step {1e3 * t_noise / reps:7.2f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="denoising steps T (flow_grpo: 10)")
    p.add_argument("--latent", type=int, default=32, help="latent side length")
    p.add_argument("--channels", type=int, default=16, help="latent channels (SD3: 16)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--group", type=int, default=16, help="group size N for singular vs full")
    p.add_argument("--tree-splits", default="2,4,6,8", help="binary split steps (16 leaves)")
    p.add_argument("--singular-steps", default="0,1,2,3", help="G2RPO SDE steps k")
    p.add_argument("--step-batch", type=int, default=8, help="batch for the step benchmark")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (best kept)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default because OpenMP threads on a shared, busy "
                        "machine make every elementwise op ~100x slower and the timings noise")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sigmas = flow_sigmas(args.steps, 3.0).to(args.device)
    velocity = make_velocity(args)
    cond1 = (torch.randn(1, 8, 64, device=args.device), torch.randn(1, 64, device=args.device))
    velocity(torch.randn(2, args.channels, args.latent, args.latent, device=args.device),
             sigmas[:2], tuple(c.expand(2, *c.shape[1:]) for c in cond1))  # warm-up
    print(f"device {args.device}, T={args.steps}, latent {args.channels}x{args.latent}x"
          f"{args.latent}, SD3 transformer with {args.layers} blocks, torch threads "
          f"{torch.get_num_threads()}")
    ratio = bench_tree(args, velocity, cond1, sigmas)
    bench_singular(args, velocity, cond1, sigmas)
    bench_step(args, sigmas)
    print(f"goal tree NFE <= 0.5x independent: {'met' if ratio <= 0.5 else 'NOT met'} "
          f"({ratio:.2f}x)")


if __name__ == "__main__":
    main()
