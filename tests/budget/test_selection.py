"""Prompt selectors (mmrl.budget.selection): posteriors, decay, Thompson sampling, state round trips."""
import io

import pytest
import torch

from mmrl.budget.allocate import expand_groups
from mmrl.budget.selection import (SELECTORS, DynamicSampling, VADESelector, VarianceAwareSelector,
                            group_success_counts, make_selector, sample_beta)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_group_success_counts_hand_worked():
    prompt_idx = torch.tensor([3, 3, 3, 0, 0, 3])
    rewards = torch.tensor([1.0, 0.5, 0.7, 0.0, 0.9, 0.2])
    group_ids = torch.tensor([10, 10, 10, 11, 11, 12])  # prompt 3 appears in two groups
    k, n = group_success_counts(prompt_idx, rewards, group_ids, num_items=5)
    assert k.tolist() == [1, 0, 0, 2, 0] and n.tolist() == [2, 0, 0, 4, 0]
    k, _ = group_success_counts(prompt_idx, rewards, group_ids, 5, success_threshold=0.8)
    assert k.tolist() == [1, 0, 0, 1, 0]


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([0, 1]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0])), "different prompts"),
    ((torch.tensor([0, 9]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1])), r"\[0, 5\)"),
    ((torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), torch.tensor([0, 1])), "NaN"),
    ((torch.tensor([0, 1]), torch.tensor([1.0]), torch.tensor([0, 1])), "same length"),
    ((torch.tensor([0, 1]), torch.ones(2, 2), torch.tensor([0, 1])), "1-D"),
])
def test_update_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        make_selector("vade", 5).update(*args)


def test_update_rejects_float_indices():
    with pytest.raises(TypeError, match="integer"):
        make_selector("vade", 5).update(torch.tensor([0.0]), torch.tensor([1.0]),
                                        torch.tensor([0]))


def test_vade_posterior_update_and_two_scale_decay_exact():
    sel = VADESelector(3, global_decay=0.9, visit_decay=0.5)
    # step 1: prompt 0 has 3 of 4 successes, prompt 1 has 0 of 2, prompt 2 is not in the batch
    sel.update(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1.0, 1, 1, 0, 0, 0]),
               torch.tensor([0, 0, 0, 0, 1, 1]))
    assert sel.alpha.tolist() == [4.0, 1.0, 1.0] and sel.beta.tolist() == [2.0, 3.0, 1.0]
    # step 2: prompt 1 has 1 of 2. Prompt 0 only decays globally:
    #   alpha_0 = 1 + 0.9 (4 - 1) = 3.7, beta_0 = 1 + 0.9 (2 - 1) = 1.9
    # prompt 1 decays on both scales (0.9 * 0.5 = 0.45), then takes the new counts:
    #   alpha_1 = 1 + 0.45 * 0 + 1 = 2, beta_1 = 1 + 0.45 * 2 + 1 = 2.9
    sel.update(torch.tensor([1, 1]), torch.tensor([1.0, 0.0]), torch.tensor([7, 7]))
    torch.testing.assert_close(sel.alpha, torch.tensor([3.7, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sel.beta, torch.tensor([1.9, 2.9, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sel.success_probs(),
                               torch.tensor([3.7 / 5.6, 2 / 4.9, 0.5], dtype=torch.float64))


def test_vade_stale_evidence_fades_to_the_prior():
    sel = VADESelector(2, prior_alpha=2.0, prior_beta=3.0, global_decay=0.8, visit_decay=0.5)
    sel.update(torch.tensor([0] * 10), torch.ones(10), torch.zeros(10, dtype=torch.long))
    assert sel.alpha[0] == 2.0 + 10 and sel.beta[0] == 3.0
    for t in range(1, 6):  # only prompt 1 is visited from now on
        sel.update(torch.tensor([1]), torch.tensor([0.0]), torch.tensor([0]))
        assert float(sel.alpha[0]) == pytest.approx(2.0 + 10 * 0.8 ** t, rel=1e-12)
        assert float(sel.beta[0]) == pytest.approx(3.0, rel=1e-12)
    # visit_decay = 0 keeps only the newest visit on top of the (decayed) prior
    sel = VADESelector(1, global_decay=1.0, visit_decay=0.0)
    for _ in range(3):
        sel.update(torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert sel.alpha.tolist() == [2.0] and sel.beta.tolist() == [2.0]


def test_sample_beta_moments_determinism_and_global_rng_untouched():
    a, b = torch.full((40_000,), 2.0, dtype=torch.float64), torch.full((40_000,), 5.0,
                                                                      dtype=torch.float64)
    before = torch.get_rng_state()
    x = sample_beta(a, b, gen(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(x, sample_beta(a, b, gen(3)))
    assert float(x.mean()) == pytest.approx(2 / 7, abs=3e-3)
    assert float(x.var()) == pytest.approx(10 / (49 * 8), rel=3e-2)


def test_vade_thompson_prefers_uncertain_prompts():
    sel = VADESelector(4)
    sel.alpha = torch.tensor([1000.0, 1.0, 50.0, 1000.0], dtype=torch.float64)
    sel.beta = torch.tensor([1.0, 1000.0, 50.0, 2.0], dtype=torch.float64)
    picks = [sel.select(1, gen(s)).tolist() for s in range(50)]
    assert picks == [[2]] * 50
    assert sorted(sel.select(4, gen(0)).tolist()) == [0, 1, 2, 3]


def test_uniform_selector_covers_every_prompt_once_per_epoch():
    sel = make_selector("uniform", 10)
    g = gen(1)
    first = torch.cat([sel.select(5, g), sel.select(5, g)])
    assert sorted(first.tolist()) == list(range(10))
    sel, picks = make_selector("uniform", 10), []
    for _ in range(5):  # batches of 4 cross epoch boundaries
        batch = sel.select(4, g)
        assert batch.unique().numel() == 4
        picks += batch.tolist()
    assert sorted(picks[:10]) == list(range(10))
    assert all(picks.count(i) == 2 for i in range(10))
    for seed in range(20):  # 3 of 4: the second batch takes 1 old + 2 fresh, never a repeat
        sel, g = make_selector("uniform", 4), gen(seed)
        sel.select(3, g)
        assert sel.select(3, g).unique().numel() == 3, seed


def test_last_visit_success_estimate():
    sel = make_selector("uniform", 4)
    sel.update(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([1.0, 1, 0, 0, 1, 1]),
               torch.tensor([0, 0, 0, 0, 1, 1]))
    sel.update(torch.tensor([0, 0, 2, 2]), torch.tensor([0.0, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
    # prompt 0: newest visit 0/2 replaces 2/4; prompt 1: 2/2; 2: 1/2; 3: never seen -> 0.5
    assert sel.success_probs().tolist() == [0.0, 1.0, 0.5, 0.5]
    assert sel.last_trials.tolist() == [2.0, 2.0, 2.0, 0.0]


def test_variance_aware_draws_from_high_variance_prompts():
    sel = VarianceAwareSelector(10, mix=1.0, floor=1e-9)
    rewards = torch.tensor([1.0, 0.0] * 5 + [1.0, 1.0] * 5)  # prompts 0-4: p = 0.5; 5-9: p = 1
    prompts = torch.arange(10).repeat_interleave(2)
    sel.update(prompts, rewards, prompts)
    assert sel.scores().tolist() == [0.25] * 5 + [0.0] * 5
    for s in range(20):
        assert sorted(sel.select(5, gen(s)).tolist()) == [0, 1, 2, 3, 4]
    half = VarianceAwareSelector(10, mix=0.5, floor=1e-9)
    half.update(prompts, rewards, prompts)
    batch = half.select(6, gen(0))
    assert batch.unique().numel() == 6 and set(batch[:3].tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("name", SELECTORS.names())
def test_selector_conformance_and_exact_resume(name):
    """Every registered selector: valid picks; state_dict round trip reproduces the run."""
    num = 12

    def step(sel, g):
        idx = sel.select(4, g)
        assert idx.dtype == torch.long and idx.unique().numel() == 4
        assert int(idx.min()) >= 0 and int(idx.max()) < num
        prompts, group_ids = expand_groups(idx, torch.full((4,), 3))
        rewards = (torch.rand(prompts.shape, generator=g) < 0.5).float()
        sel.update(prompts, rewards, group_ids)
        return idx

    sel, g = make_selector(name, num), gen(5)
    for _ in range(4):
        step(sel, g)
    buf = io.BytesIO()
    torch.save(sel.state_dict(), buf)
    buf.seek(0)
    resumed = make_selector(name, num)
    resumed.load_state_dict(torch.load(buf))
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    for _ in range(6):
        assert torch.equal(step(sel, g), step(resumed, g2))
    a, b = sel.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
    probs = sel.success_probs()
    assert probs.dtype == torch.float64 and ((probs >= 0) & (probs <= 1)).all()


def test_load_state_dict_mismatch_errors():
    state = make_selector("vade", 5, visit_decay=0.3).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        make_selector("vade", 6, visit_decay=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match="hparams"):
        make_selector("vade", 5).load_state_dict(state)
    with pytest.raises(ValueError, match="name"):
        make_selector("uniform", 5).load_state_dict(state)


def test_factory_and_select_errors():
    with pytest.raises(ValueError, match="did you mean 'vade'"):
        make_selector("vadee", 5)
    with pytest.raises(ValueError, match=r"no hyper-parameter 'visit_decy'.*did you mean"):
        make_selector("vade", 5, visit_decy=0.5)
    with pytest.raises(ValueError, match="num_items"):
        make_selector("uniform", 0)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        make_selector("uniform", 5).select(6, gen())
    with pytest.raises(TypeError, match="torch.Generator"):
        make_selector("uniform", 5).select(2, 0)
    with pytest.raises(ValueError, match="global_decay"):
        make_selector("vade", 5, global_decay=0.0)
    assert make_selector("uniform", 5, success_threshold=0.2).success_threshold == 0.2


def test_dynamic_sampling_is_reexported():
    from mmrl import budget
    assert DynamicSampling is budget.DynamicSampling


def test_vade_in_the_shared_runner_resumes_exactly(tmp_path):
    """The lead's runner feeds the selector and checkpoints it; resume gives the same state."""
    from mmrl.train.runner import run_training
    from mmrl.config.schema import config_from_dict
    from mmrl.demo.toy import TASKS, ToyPolicy, digit_reward, make_prompts

    def train(out, steps):
        cfg = config_from_dict({"job": "toy", "train": {
            "steps": steps, "prompts_per_step": 3, "group_size": 2, "save_every": 2,
            "progress": False, "output_dir": str(out), "log_every": 100},
            "toy": {"d_model": 16, "layers": 1, "heads": 2}})
        prompts = make_prompts(cfg.task, cfg.train.seed)
        metadata = [{"target": TASKS[cfg.task.task](p)} for p in prompts]
        selector = make_selector("vade", len(prompts))
        run_training(cfg, ToyPolicy(cfg.task), digit_reward, prompts, metadata,
                     selector=selector)
        return selector

    straight = train(tmp_path / "a", 4).state_dict()
    train(tmp_path / "b", 2)
    resumed = train(tmp_path / "b", 4).state_dict()  # a fresh selector, restored at step 2
    assert straight["num_updates"] == resumed["num_updates"] == 4
    for key in ("alpha", "beta", "last_successes", "last_trials"):
        assert torch.equal(straight[key], resumed[key])
    assert float(straight["last_trials"].sum()) > 0
