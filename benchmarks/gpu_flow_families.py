"""One GRPO step of a Wan2.1-T2V-1.3B-sized and a Qwen-Image-sized transformer on one GPU:
step time, peak memory and MFU, one JSON line per model (a partial run still reports).

    pip install -e .          # the repository's pinned stack: torch, diffusers 0.42, peft
    python benchmarks/gpu_flow_families.py                       # H200: both models, ~5 min
    python benchmarks/gpu_flow_families.py --models wan --budget-s 240
    python benchmarks/gpu_flow_families.py --tiny                # CPU, same code path, seconds

What runs, per model, the way mmrl's diffusion job runs a step (LoRA, ``sampler: full``):

1. the transformer of the real architecture (diffusers ``WanTransformer3DModel`` /
   ``QwenImageTransformer2DModel``, the published configs below) built with **random weights in
   bf16** directly on the device; LoRA (peft) on the attention projections, rank 32, alpha 64;
2. **random text embeddings** of the real encoders' shape instead of UMT5-XXL / Qwen2.5-VL-7B
   (Wan: ``[512, 4096]``, the UMT5 output padded to 512 as ``WanPipeline`` does; Qwen-Image:
   ``[--text-len, 3584]``) and a negative prompt row for CFG; no VAE (the latents' shape is the
   VAE's: Wan ``[16, (F-1)/4+1, H/8, W/8]``, Qwen-Image packed ``[(H/16)(W/16), 64]``), no
   decode and no reward model (advantages are random): the step is the transformer's work;
3. the rollout: ``mmrl.diffusion.sample_sde`` (SDE on every step but the last, flow_grpo kind,
   noise level 0.7) with log-probs, ``--samples`` samples x ``--num-steps`` denoising steps, CFG
   as one forward on [uncond; cond] rows;
4. the update: for each of the first ``--trained`` steps, ``mmrl.diffusion.rescore`` of the
   samples' transitions (with gradient, CFG included), ``mmrl.algo.PolicyLoss('grpo')`` and
   backward (gradient checkpointing on, as DanceGRPO / Pref-GRPO train Wan), then one AdamW step.

A warm-up (2-step rollout, one trained transition) runs first; the timed step follows. Peak
memory is ``torch.cuda.max_memory_allocated`` over the timed step (CPU: the process's peak RSS).
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (not analytically) on one
velocity call of one sample and on one trained transition (forward + backward, as executed:
the checkpoint's recomputed forward included), after the timed step; the step's FLOPs are
``nfe x F_call + trained transitions x F_train``. ``mfu`` leaves the recomputed forward out
(model FLOPs: F_train - F_call), ``hfu`` keeps it; both over ``--peak-tflops`` (989: H100 / H200
SXM dense BF16, NVIDIA's datasheet). On CPU (``--tiny``) attention runs the math kernel so that
its matmuls are counted; no peak is assumed there (mfu null).

Guards: each phase (build, warm-up, step, flops) has its own ``--phase-timeout-s`` (SIGALRM) and
the whole run ``--budget-s``; a model whose phase times out or fails reports ``status`` and the
phase, and the next model runs. An out-of-memory step retries at the next smaller size
(Wan: fewer frames, Qwen-Image: lower resolution), reported in ``size_tries``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import signal
import sys
import time

import torch

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (the same numbers as Wan2.1's own
# wan/configs/wan_t2v_1_3B.py: dim 1536 = 12 heads x 128, ffn 8960, 30 layers, patch (1, 2, 2)).
WAN_1P3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)
# Qwen/Qwen-Image, transformer/config.json (diffusers' QwenImageTransformer2DModel defaults and
# docs: 60 dual-stream blocks, 24 heads x 128, text dim 3584 = Qwen2.5-VL-7B's hidden size).
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                  guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# --tiny: the same classes with a few thousand parameters per block.
WAN_TINY = dict(WAN_1P3B, num_attention_heads=2, attention_head_dim=12, text_dim=16, freq_dim=16,
                ffn_dim=32, num_layers=2)
QWEN_TINY = dict(QWEN_IMAGE, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
# LoRA rank 32, alpha 64 as flow_grpo's LoRA runs. Wan: the adapter's own targets
# (mmrl.diffusion.models.wan.WAN_LORA_TARGETS, flow_grpo's train_wan2_1.py: to_q / to_k / to_v /
# to_out.0 of self- and cross-attention); Qwen-Image: the image stream's attention projections.
LORA_TARGETS = {"qwen_image": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]}


class PhaseTimeout(Exception):
    """A phase ran past its --phase-timeout-s."""


@contextlib.contextmanager
def phase_guard(seconds: float, name: str, state: dict):
    """Raise :class:`PhaseTimeout` in the main thread after ``seconds`` (SIGALRM); records the
    phase in ``state`` so a failure report names it."""
    state["phase"] = name

    def _raise(signum, frame):
        raise PhaseTimeout(f"phase {name!r} ran past {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------ the two families
class Family:
    """What differs between the families: the model, the latent, the text rows, the call."""

    name = ""

    def __init__(self, args, size):
        self.args, self.size = args, size

    def build(self, device):
        from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel
        cls = WanTransformer3DModel if self.name == "wan" else QwenImageTransformer2DModel
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy
        try:
            with torch.device(device):
                model = cls(**self.config())
        finally:
            torch.set_default_dtype(default)
        # what from_pretrained(torch_dtype=bf16) does: the class's fp32 modules stay fp32 (Wan:
        # rope, time embedder, modulation tables, norms)
        keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
        for name, param in model.named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()
        return model


class Wan(Family):
    name = "wan"

    def config(self):
        return WAN_TINY if self.args.tiny else WAN_1P3B

    def describe(self):
        h, w, f = self.size
        return {"height": h, "width": w, "frames": f}

    def latent(self):  # [C, F', H/8, W/8] with F' = (F-1)/4 + 1 (Wan VAE: 4x time, 8x space)
        h, w, f = self.size
        return (16, (f - 1) // 4 + 1, h // 8, w // 8)

    def tokens(self):
        c, t, h, w = self.latent()
        return t * (h // 2) * (w // 2)

    def text(self, rows, device):  # UMT5 output padded to 512 tokens, as WanPipeline does
        dim = self.config()["text_dim"]
        return torch.randn(rows, 32 if self.args.tiny else 512, dim, device=device)

    def forward(self, model, x, sigma, emb):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb,
                     return_dict=False)[0]

    def smaller(self):  # fewer frames: 33 -> 17 -> 9 -> 5
        h, w, f = self.size
        return None if f <= 5 else (h, w, (f - 1) // 2 + 1)


class QwenImage(Family):
    name = "qwen_image"

    def config(self):
        return QWEN_TINY if self.args.tiny else QWEN_IMAGE

    def describe(self):
        h, w, _ = self.size
        return {"height": h, "width": w}

    def latent(self):  # packed 2x2 patches of the 16-channel, 8x VAE latent: [(H/16)(W/16), 64]
        h, w, _ = self.size
        return ((h // 16) * (w // 16), 64)

    def tokens(self):
        return self.latent()[0]

    def text(self, rows, device):
        dim = self.config()["joint_attention_dim"]
        return torch.randn(rows, self.args.text_len, dim, device=device)

    def forward(self, model, x, sigma, emb):
        h, w, _ = self.size
        # QwenImagePipeline passes timestep = t / 1000 = σ; all text tokens valid (mask None)
        return model(hidden_states=x, timestep=sigma, encoder_hidden_states=emb,
                     encoder_hidden_states_mask=None, img_shapes=[(1, h // 16, w // 16)] * len(x),
                     return_dict=False)[0]

    def smaller(self):  # 1024 -> 768 -> 512
        h, w, f = self.size
        return None if h <= 512 else (h - 256, w - 256 * w // h, f)


FAMILIES = {"wan": Wan, "qwen_image": QwenImage}


def make_velocity(fam: Family, model, guidance: float):
    """``velocity(x, sigma, cond)`` in fp32 with CFG on ``[uncond; cond]`` rows (one forward)."""

    def velocity(x, sigma, cond):
        rows = torch.cat([cond["neg"], cond["emb"]]).to(torch.bfloat16)
        h = torch.cat([x, x]).to(torch.bfloat16)
        s = torch.cat([sigma, sigma]).to(torch.bfloat16)
        v_u, v_c = fam.forward(model, h, s, rows).float().chunk(2)
        return v_u + guidance * (v_c - v_u)

    return velocity


# ------------------------------------------------------------------ one GRPO step
def grpo_step(fam, model, velocity, opt, cond, *, samples, num_steps, trained, device, seed):
    """Rollout with log-probs, then re-score + backward of ``trained`` steps and one AdamW step.
    Returns ``(timings, traj)``."""
    from mmrl.algo import PolicyLoss
    from mmrl.diffusion import flow_sigmas, rescore, sample_sde

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn((samples, *fam.latent()), generator=g, device=device)
    sigmas = flow_sigmas(num_steps, 3.0).to(device)
    sync()
    t0 = time.perf_counter()
    traj = sample_sde(velocity, noise, sigmas, cond, kind="flow_grpo", noise_level=0.7,
                      generator=g)
    sync()
    t1 = time.perf_counter()
    loss_fn = PolicyLoss("grpo", beta=0.0)
    adv = torch.randn(samples, generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones(samples, 1, dtype=torch.bool, device=device)
    for step in range(trained):  # flow_grpo: one step's transitions per forward, grads summed
        index = (traj.step == step).nonzero().flatten()  # [samples], in row order
        out = rescore(traj, velocity, cond, index=index)
        old = traj.logp[index].to(device)[:, None]
        loss, _ = loss_fn(out.logp[:, None], old, adv, mask)
        (loss / trained).backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    return {"rollout_s": t1 - t0, "train_s": t2 - t1, "optimizer_s": t3 - t2,
            "step_s": t3 - t0}, traj


def count_flops(fam, velocity, cond, device):
    """``(F_call, F_train)``: FLOPs of one sample's velocity call (no grad) and of one trained
    transition (forward + backward as executed), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmrl.diffusion.samplers import take_cond

    one = take_cond(cond, torch.tensor([0]))
    x = torch.randn((1, *fam.latent()), device=device)
    sigma = torch.full((1,), 0.5, device=device)
    kernel = contextlib.nullcontext()
    if device.type == "cpu":  # the CPU flash kernel has no formula: count the math kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            velocity(x, sigma, one)
        with FlopCounterMode(display=False) as train:
            velocity(x, sigma, one).square().mean().backward()
    return fwd.get_total_flops(), train.get_total_flops()


def _mem_reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _mem_peak(device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


# ------------------------------------------------------------------ per model, guarded
def _sizes(args):
    if args.tiny:
        return {"wan": (32, 32, 9), "qwen_image": (64, 64, 1)}
    return {"wan": (args.wan_height, args.wan_width, args.wan_frames),
            "qwen_image": (args.qwen_size, args.qwen_size, 1)}


def _lora_targets(name: str) -> list:
    if name == "wan":
        from mmrl.diffusion.models.wan import WAN_LORA_TARGETS
        return list(WAN_LORA_TARGETS)
    return LORA_TARGETS[name]


def _setup(fam, args, device):
    """The bf16 model with LoRA (and checkpointing), its AdamW, and the report's static part."""
    from peft import LoraConfig

    model = fam.build(device)
    total = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                 init_lora_weights="gaussian",
                                 target_modules=_lora_targets(fam.name)))
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-4)
    cfg = fam.config()
    info = {"params": total, "lora_params": sum(p.numel() for p in lora),
            "layers": cfg["num_layers"], "heads": cfg["num_attention_heads"],
            "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"]}
    return model, opt, info


def _measure(fam, model, opt, args, device, limit, state):
    """Warm-up then the timed step; an out-of-memory step retries at ``fam.smaller()``."""
    from mmrl.diffusion.samplers import take_cond

    tries = []
    while True:
        try:
            rows = args.samples
            cond = {"emb": fam.text(rows, device),
                    "neg": fam.text(1, device).expand(rows, -1, -1)}  # one negative prompt
            velocity = make_velocity(fam, model, args.guidance[fam.name])
            with phase_guard(limit(), "warmup", state):
                grpo_step(fam, model, velocity, opt, take_cond(cond, torch.tensor([0])),
                          samples=1, num_steps=2, trained=1, device=device, seed=1)
            _mem_reset(device)
            with phase_guard(limit(), "step", state):
                times, traj = grpo_step(fam, model, velocity, opt, cond, samples=rows,
                                        num_steps=args.num_steps, trained=args.trained,
                                        device=device, seed=2)
            return times, traj, cond, velocity, _mem_peak(device), tries
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            tries.append({**fam.describe(), "result": "out of memory"})
            smaller = fam.smaller()
            if smaller is None:
                raise
            fam.size = smaller
            _mem_reset(device)


def run_model(name, args, device, deadline) -> dict:
    """One model's JSON report (status ok / timeout / error / skipped), printed by the caller."""
    fam = FAMILIES[name](args, _sizes(args)[name])
    report = {"model": name, "status": "ok", "device": str(device), "dtype": "bfloat16",
              "weights": "random", "text": "random embeddings of the encoder's output shape "
              "(no text encoder), no VAE, no reward (random advantages)"}
    state, model = {"phase": "build"}, None

    def limit():
        left = deadline - time.monotonic()
        if left < 5:
            raise PhaseTimeout(f"run budget spent before phase {state['phase']!r}")
        return min(args.phase_timeout_s, left)

    try:
        with phase_guard(limit(), "build", state):
            model, opt, info = _setup(fam, args, device)
        report.update(info)
        times, traj, cond, velocity, mem, tries = _measure(fam, model, opt, args, device, limit,
                                                           state)
        report.update(fam.describe(), latent=list(fam.latent()), tokens=fam.tokens(),
                      text_tokens=cond["emb"].shape[1], samples=args.samples,
                      num_steps=args.num_steps, trained=args.trained,
                      cfg=args.guidance[fam.name], lora_rank=args.lora_rank,
                      grad_ckpt=args.grad_ckpt, nfe=traj.nfe, size_tries=tries,
                      **{k: round(v, 4) for k, v in times.items()}, **mem)
        with phase_guard(limit(), "flops", state):
            f_call, f_train = count_flops(fam, velocity, cond, device)
        report.update(_flops(report, f_call, f_train, args, device))
    except (PhaseTimeout, Exception) as err:  # noqa: BLE001 - report and go on to the next
        report.update(status="timeout" if isinstance(err, PhaseTimeout) else "error",
                      phase=state["phase"], error=f"{type(err).__name__}: {str(err)[:400]}")
    finally:
        del model
        _mem_reset(device)
    return report


def _flops(report, f_call, f_train, args, device) -> dict:
    transitions = report["samples"] * report["trained"]
    hw = report["nfe"] * f_call + transitions * f_train
    # the checkpoint's recomputed forward is not model work: F_train - F_call per transition
    model = hw - (transitions * f_call if args.grad_ckpt else 0)
    peak = args.peak_tflops if args.peak_tflops else (989.0 if device.type == "cuda" else None)
    out = {"flops_counter": "torch.utils.flop_counter", "flops_call": f_call,
           "flops_train_transition": f_train, "step_flops_model": model, "step_flops_hw": hw,
           "step_tflops_per_s": round(model / report["step_s"] / 1e12, 3),
           "peak_tflops": peak, "mfu": None, "hfu": None}
    if peak:
        out["mfu"] = round(model / (report["step_s"] * peak * 1e12), 4)
        out["hfu"] = round(hw / (report["step_s"] * peak * 1e12), 4)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny configs, the same code path")
    p.add_argument("--models", default="wan,qwen_image", help="comma list: wan, qwen_image")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--samples", type=int, default=2, help="samples per rollout (one GPU's share)")
    p.add_argument("--num-steps", type=int, default=10, help="denoising steps T (flow_grpo: 10)")
    p.add_argument("--trained", type=int, default=2, help="trained steps per sample timed")
    p.add_argument("--wan-height", type=int, default=480)
    p.add_argument("--wan-width", type=int, default=832)
    p.add_argument("--wan-frames", type=int, default=33, help="pixel frames, 4k+1")
    p.add_argument("--qwen-size", type=int, default=1024, help="Qwen-Image side in pixels")
    p.add_argument("--text-len", type=int, default=128, help="Qwen-Image prompt tokens")
    p.add_argument("--wan-cfg", type=float, default=5.0, help="WanPipeline's default 5.0")
    p.add_argument("--qwen-cfg", type=float, default=4.0, help="QwenImagePipeline's true_cfg 4.0")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default 989 on CUDA: H100/H200 SXM dense BF16)")
    p.add_argument("--phase-timeout-s", type=float, default=240.0)
    p.add_argument("--budget-s", type=float, default=540.0, help="whole run; models past it skip")
    args = p.parse_args(argv)
    args.guidance = {"wan": args.wan_cfg, "qwen_image": args.qwen_cfg}
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.tiny:
        torch.set_num_threads(1)
        args.text_len = min(args.text_len, 8)
        args.num_steps, args.samples = min(args.num_steps, 4), min(args.samples, 2)
    deadline = time.monotonic() + args.budget_s
    try:  # imported before any phase clock runs; a stack without them fails here, clearly
        from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel  # noqa: F401
        from peft import LoraConfig  # noqa: F401

        from mmrl.algo import PolicyLoss  # noqa: F401
        from mmrl.diffusion import sample_sde  # noqa: F401
    except ImportError as err:
        print(json.dumps({"run": "error", "error": f"{err}; expected diffusers >= 0.35 (Wan and "
                          f"Qwen-Image transformers), peft and mmrl: run `pip install -e .` in "
                          f"the repository first"}), flush=True)
        return 1
    header = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps({"run": header}), flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in FAMILIES:
            print(json.dumps({"model": name, "status": "error", "error": f"unknown model; "
                              f"expected one of {sorted(FAMILIES)}"}), flush=True)
            continue
        print(json.dumps(run_model(name, args, device, deadline)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
