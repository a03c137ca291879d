"""Diffusion-DPO on the flow policy: the scores −½·e of ``pair_scores`` (flow-matching form,
flow_grpo ``scripts/train_sd3_dpo.py``), the pair rollout from image files, online pairs from a
sampled rollout's final latents, and the preference presets the job refuses; tiny SD3 and FLUX.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mmrl.diffusion.config import preference_problems
from mmrl.diffusion.dpo import denoising_error, pair_noise
from mmrl.train.policy import check_policy
from mmrl.train.rollout import Rollout

sys.path.insert(0, os.path.dirname(__file__))
from flow_pref_helpers import BETA, FAMILIES, PROMPTS, make_policy, pair_rollout_of  # noqa: E402


# ------------------------------------------------------------------ the pieces, by hand
def test_denoising_error_hand_worked_for_a_stub_velocity():
    # v(x, σ) = 2x. Row 0: x0 = (1, 2), ε = (0, 1), σ = ½ -> x_σ = (.5, 1.5), v = (1, 3),
    # target ε − x0 = (−1, −1), error (2, 4) -> e = (4 + 16)/2 = 10.
    # Row 1: x0 = (0, 0), ε = (1, −1), σ = ¼ -> x_σ = (.25, −.25), v = (.5, −.5),
    # target (1, −1), error (−.5, .5) -> e = .25.
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    eps = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    seen = []

    def velocity(x, sigma, cond):
        seen.append((x.clone(), sigma.clone(), cond))
        return 2 * x

    e = denoising_error(velocity, x0, eps, torch.tensor([0.5, 0.25]), {"k": 1})
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, torch.tensor([10.0, 0.25]), rtol=0, atol=0)
    torch.testing.assert_close(seen[0][0], torch.tensor([[0.5, 1.5], [0.25, -0.25]]))
    assert seen[0][1].tolist() == [0.5, 0.25] and seen[0][2] == {"k": 1}
    # any latent rank: a [R, C, h, w] latent and its [R, h·w, C] packing give the same e
    x4, e4 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    packed = denoising_error(lambda x, s, c: 2 * x, x4.flatten(2).transpose(1, 2),
                             e4.flatten(2).transpose(1, 2), torch.tensor([0.3, 0.9]), {})
    torch.testing.assert_close(denoising_error(lambda x, s, c: 2 * x, x4, e4,
                                               torch.tensor([0.3, 0.9]), {}), packed)


def test_pair_noise_is_the_logit_normal_index_into_the_training_grid():
    # SD3's grid (shift 3, N = 1000): σ_i = 3s/(1 + 2s), s = (1000 − i)/1000
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    grid = (3 * s / (1 + 2 * s)).float()
    sigma, eps = pair_noise(4, (2, 3), grid, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    n = torch.randn(4, generator=g).double()
    index = (1000 / (1 + torch.exp(-n))).floor().long()
    s_i = (1000 - index).double() / 1000
    torch.testing.assert_close(sigma, (3 * s_i / (1 + 2 * s_i)).float(), rtol=0, atol=1e-6)
    assert torch.equal(eps, torch.randn((4, 2, 3), generator=g))  # ε drawn after u


def test_the_training_grid_is_the_schedulers_own_sd3_shifted_flux_not(request):
    # flow_grpo indexes FlowMatchEulerDiscreteScheduler.from_pretrained(...).sigmas: SD3's
    # config shifts it (3.0); FLUX's shifts dynamically, at set_timesteps only
    s = (torch.arange(1000, 0, -1, dtype=torch.float64) / 1000)
    sd3 = make_policy(request, "sd3", finetune="none", move=False).flow
    flux = make_policy(request, "flux", finetune="none", move=False).flow
    torch.testing.assert_close(sd3.training_sigmas(), (3 * s / (1 + 2 * s)).float(), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(flux.training_sigmas(), s.float(), rtol=0, atol=1e-6)
    sd3.shift = 1.5  # an adapter's own shift (diffusion.shift) shifts this grid too
    torch.testing.assert_close(sd3.training_sigmas(), (1.5 * s / (1 + 0.5 * s)).float(),
                               rtol=0, atol=1e-6)


def test_an_extreme_draw_stays_on_the_grid(monkeypatch):
    # n beyond ~17 rounds sigmoid(n) to 1.0 in fp32, so ⌊u·N⌋ = N: clamped to the last σ
    real = torch.randn
    calls = []

    def pinned(*shape, **kw):
        calls.append(shape)
        return torch.full((2,), 40.0) if len(calls) == 1 else real(*shape, **kw)

    monkeypatch.setattr(torch, "randn", pinned)
    grid = torch.linspace(1.0, 0.001, 1000)
    sigma, _ = pair_noise(2, (1,), grid, torch.Generator())
    assert sigma.tolist() == [grid[-1].item()] * 2


# ------------------------------------------------------------------ pair_scores on the tiny models
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_on_the_scores_is_flow_grpos_loss_values_and_gradients(request, family):
    policy = make_policy(request, family)
    flow = policy.flow
    assert check_policy(policy).preference
    rollout, chosen, rejected = pair_rollout_of(policy)
    scores = policy.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(11),
                                with_ref=True)
    assert scores.chosen_logp.shape == (3, 1) and scores.chosen_mask.all()
    assert scores.rejected_mask.all() and scores.rejected_mask.shape == (3, 1)
    assert scores.chosen_ref.grad_fn is None and not scores.chosen_ref.requires_grad
    assert scores.rejected_ref.grad_fn is None and not scores.rejected_ref.requires_grad
    # DPO (the oracle written here; mmrl.algo.preference.PreferenceLoss("diffusion_dpo") is
    # Lane P1's and not on this branch): −log σ(β[(c − c_ref) − (r − r_ref)]), mean over pairs
    logits = BETA * ((scores.chosen_logp - scores.chosen_ref)
                     - (scores.rejected_logp - scores.rejected_ref))
    loss = -F.logsigmoid(logits).mean()
    params = flow.trainable_parameters()
    grads = torch.autograd.grad(loss, params)
    # flow_grpo's loss block, on its own forwards: the raw conditional transformer (no CFG),
    # the same σ and ε for w and l, e = mean (pred − (ε − x0))² in fp32, reference = adapter off
    g = torch.Generator().manual_seed(11)
    sigma, eps = pair_noise(3, policy.latent, flow.training_sigmas(), g)
    x0 = rollout.data["x0"]
    sig, noise = torch.cat([sigma, sigma]), torch.cat([eps, eps])
    s = sig.reshape(-1, *[1] * len(policy.latent))
    noisy = (1 - s) * x0 + s * noise
    cond = flow.encode_prompt(rollout.prompts)
    pred = oracle_velocity(flow, family, noisy, sig, cond)
    with torch.no_grad():
        flow.transformer.disable_adapters()
        pred_ref = oracle_velocity(flow, family, noisy, sig, cond)
        flow.transformer.enable_adapters()
    target = noise - x0
    theta_mse = ((pred.float() - target) ** 2).reshape(6, -1).mean(dim=1)
    ref_mse = ((pred_ref.float() - target) ** 2).reshape(6, -1).mean(dim=1)
    w_diff, l_diff = theta_mse[:3] - ref_mse[:3], theta_mse[3:] - ref_mse[3:]
    expected = -F.logsigmoid(-0.5 * BETA * (w_diff - l_diff)).mean()
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - 0.6931472) > 1e-3  # log 2 would mean policy = reference
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # gradients reach every LoRA tensor whose output reaches the image: in SD3's last
    # (context-pre-only) block the text queries only make text outputs, which are dropped
    names = [n for n, p in flow.transformer.named_parameters() if p.requires_grad]
    assert len(names) == len(params) and all("lora" in n for n in names)
    zero = {n.split(".")[3] for n, gr in zip(names, grads) if float(gr.abs().sum()) == 0}
    assert zero == ({"add_q_proj"} if family == "sd3" else set())
    assert sum(float(gr.abs().sum()) > 0 for gr in grads) >= len(names) - 2


def oracle_velocity(flow, family, latents, sigma, cond):
    """The transformer forward as flow_grpo's DPO script calls it: conditional embeddings only."""
    model = flow.transformer
    if family == "sd3":
        return model(hidden_states=latents, timestep=sigma * 1000,
                     encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
                     return_dict=False)[0]
    # FLUX: the adapter's forward (embedded guidance kept), equal to FluxPipeline's own
    # (tests/diffusion/models/test_flux.py)
    return flow.transformer_velocity(model, latents, sigma, cond)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_pair_shares_sigma_and_noise_and_pairs_do_not(request, family):
    policy = make_policy(request, family, move=False)
    rollout, chosen, rejected = pair_rollout_of(policy, P=4)
    seen = []
    real = policy.flow.transformer_velocity

    def spy(model, latents, sigma, cond):
        seen.append((latents.detach().clone(), sigma.clone()))
        return real(model, latents, sigma, cond)

    policy.flow.transformer_velocity = spy
    policy.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(2), False)
    assert len(seen) == 1  # one forward for the 2P images, no reference pass
    noisy, sigma = seen[0]
    x0 = rollout.data["x0"]
    s = sigma.reshape(-1, *[1] * len(policy.latent))
    eps = (noisy - (1 - s) * x0) / s  # the noise each row was given
    assert torch.equal(sigma[:4], sigma[4:])
    torch.testing.assert_close(eps[:4], eps[4:], rtol=0, atol=1e-4)
    assert len(set(sigma[:4].tolist())) == 4
    assert all(float((eps[i] - eps[j]).abs().max()) > 0.1 for i in range(4) for j in range(i))
    # a second call draws new (σ, ε) from the generator's next state
    policy.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(3), False)
    assert not torch.equal(seen[1][1], sigma)


def test_the_reference_is_the_base_model_lora_and_full(request):
    lora = make_policy(request, "sd3")
    rollout, chosen, rejected = pair_rollout_of(lora)
    scores = lora.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(4), True)
    base = make_policy(request, "sd3", finetune="none", move=False)
    want = base.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(4), False)
    torch.testing.assert_close(scores.chosen_ref, want.chosen_logp, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores.rejected_ref, want.rejected_logp, rtol=0, atol=1e-6)
    assert (scores.chosen_logp - scores.chosen_ref).abs().max() > 1e-4
    full = make_policy(request, "sd3", finetune="full")  # reference = the frozen copy
    got = full.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(4), True)
    torch.testing.assert_close(got.chosen_ref, want.chosen_logp, rtol=0, atol=1e-6)
    assert got.chosen_ref.grad_fn is None and got.chosen_logp.grad_fn is not None
    assert (got.chosen_logp - got.chosen_ref).abs().max() > 1e-4
    # with_ref=False: no reference scores, and an empty pair set gives empty scores
    no_ref = lora.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(4), False)
    assert no_ref.chosen_ref is None and no_ref.rejected_ref is None
    torch.testing.assert_close(no_ref.chosen_logp, scores.chosen_logp)
    empty = lora.pair_scores(rollout, chosen[:0], rejected[:0], torch.Generator(), True)
    assert empty.chosen_logp.shape == (0, 1) and empty.chosen_ref.shape == (0, 1)
    with pytest.raises(ValueError, match=r"chosen_rows \(3,\) and rejected_rows \(2,\)"):
        lora.pair_scores(rollout, chosen, rejected[:2], torch.Generator(), True)


# ------------------------------------------------------------------ pairs from files, online pairs
def save_png(path, color, size):
    from PIL import Image
    Image.new("RGB", size, color).save(path)
    return str(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pair_rollout_encodes_the_images_and_counts_unreadable_ones(request, family, tmp_path):
    policy = make_policy(request, family, move=False)
    side = policy.c.height
    red = save_png(tmp_path / "red.png", (255, 0, 51), (2 * side, side))  # fitted: crop + resize
    blue = save_png(tmp_path / "blue.png", (0, 102, 255), (side, side))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records = [{"prompt": "a red cat", "chosen": red, "rejected": blue, "id": 7},
               {"prompt": "a blue dog", "chosen": str(broken), "rejected": blue},
               {"prompt": "a green frog", "chosen": blue, "rejected": str(tmp_path / "no.png")},
               {"prompt": "a blue dog", "chosen": blue, "rejected": red}]
    rollout, chosen, rejected = policy.pair_rollout(records)
    assert rollout.skipped == {"unreadable_image": 2}
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]
    assert rollout.prompts == ["a red cat", "a blue dog"] * 2
    assert rollout.group_ids.tolist() == [0, 1, 0, 1] and rollout.mask.shape == (4, 1)
    assert rollout.metadata[0]["id"] == 7 and rollout.metadata[2]["role"] == "rejected"
    red_px = torch.tensor([1.0, 0.0, 0.2]).reshape(3, 1, 1).expand(3, side, side)
    blue_px = torch.tensor([0.0, 0.4, 1.0]).reshape(3, 1, 1).expand(3, side, side)
    torch.testing.assert_close(rollout.samples[0], red_px, rtol=0, atol=1 / 255)
    torch.testing.assert_close(rollout.samples[2], blue_px, rtol=0, atol=1 / 255)
    # x0: the VAE posterior mean, shifted and scaled (and packed for FLUX), per image
    vae = policy.flow.pipe.vae
    with torch.no_grad():
        z = vae.encode(torch.stack(rollout.samples) * 2 - 1).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    if family == "flux":
        z = policy.flow.pipe._pack_latents(z, 4, z.shape[1], z.shape[2], z.shape[3])
    torch.testing.assert_close(rollout.data["x0"], z, rtol=1e-5, atol=1e-6)
    assert rollout.data["x0"].shape == (4, *policy.latent)
    scores = policy.pair_scores(rollout, chosen, rejected, torch.Generator(), True)
    assert torch.isfinite(scores.chosen_logp).all() and scores.chosen_logp.shape == (2, 1)
    with pytest.raises(ValueError, match=r"pair record 0: .* lacks string field\(s\) "
                                         r"\['rejected'\]"):
        policy.pair_rollout([{"prompt": "a", "chosen": red}])
    none, c0, _ = policy.pair_rollout([records[1]])
    assert len(none) == 0 and c0.numel() == 0 and none.skipped == {"unreadable_image": 1}


@pytest.mark.parametrize("sampler", ["full", "tree"])
def test_online_pairs_score_the_rollouts_final_latents(request, sampler):
    policy = make_policy(request, "sd3", sampler=sampler, tree_split_steps=[1],
                         tree_branching=2)
    with torch.no_grad():
        rollout = policy.rollout(PROMPTS[:2], [{}, {}], 2, torch.Generator().manual_seed(0))
    final = rollout.data["trajectory"].traj.final  # [4, *L], output order
    chosen, rejected = torch.tensor([0, 3]), torch.tensor([1, 2])
    got = policy.pair_scores(rollout, chosen, rejected, torch.Generator().manual_seed(9), True)
    as_pairs = Rollout([None] * 4, rollout.prompts[:4], [{}] * 4, torch.arange(4),
                       torch.ones(4, 1, dtype=torch.bool), {"x0": final})
    want = policy.pair_scores(as_pairs, chosen, rejected, torch.Generator().manual_seed(9), True)
    torch.testing.assert_close(got.chosen_logp, want.chosen_logp, rtol=0, atol=0)
    torch.testing.assert_close(got.rejected_ref, want.rejected_ref, rtol=0, atol=0)
    # rows survive select(): the selected rollout's rows 0, 1 are samples 3, 0
    part = rollout.select(torch.tensor([3, 0]))
    sel = policy.pair_scores(part, torch.tensor([1]), torch.tensor([0]),
                             torch.Generator().manual_seed(9), False)
    ref = policy.pair_scores(as_pairs, torch.tensor([0]), torch.tensor([3]),
                             torch.Generator().manual_seed(9), False)
    torch.testing.assert_close(sel.chosen_logp, ref.chosen_logp, rtol=0, atol=0)
    if sampler == "tree":  # rows past the leaves are inner nodes: no image to score
        with pytest.raises(ValueError, match=r"rows \[4\] are inner tree nodes"):
            policy.pair_scores(rollout, torch.tensor([4]), torch.tensor([0]),
                               torch.Generator(), False)


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class Spec:
    """The fields of mmrl.algo.preference.PrefSpec (Lane P1's) the diffusion check reads;
    tests/diffusion/job/test_preference_loss.py runs the check on the real presets."""
    reference_free: bool = False
    token_guidance: bool = False
    length_normalize: bool = False


def test_reference_free_and_token_level_preference_losses_are_refused_with_the_reason():
    assert preference_problems(Spec()) == []
    assert preference_problems(Spec(length_normalize=True)) == []  # a no-op at T = 1
    simpo = preference_problems(Spec(reference_free=True, length_normalize=True))
    assert len(simpo) == 1 and simpo[0].startswith("pref: reference_free=true (SimPO)")
    assert "cancel against the reference at the same noise (e - e_ref)" in simpo[0]
    assert preference_problems(Spec(token_guidance=True)) == [
        "pref: token_guidance=true (TGDPO) weighs each token by a guide model's per-token "
        "log-ratio, and a flow sample has one Diffusion-DPO score (T = 1) and no guide model; "
        "use pref.preset=diffusion_dpo"]
