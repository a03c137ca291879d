"""XRPO's in-context seeding (guidance=xrpo_seed, mmrl.train.guidance.ExemplarSeeds) on the
hint-reading stub of test_guidance, the toy's and the video job's exemplar hints, hand-worked."""
import io

import pytest
import torch

from mmrl.demo.config import ToyConfig
from mmrl.demo.toy import ToyHints, ToyPrompt, toy_record
from mmrl.train.guidance import ExemplarSeeds, Guidance, build_guidance

from tests.train.test_guidance import _rounds


def test_toy_exemplar_is_the_answer_of_the_nearest_other_record():
    c = ToyConfig(length=4)
    corpus = [(p, toy_record(c, p)) for p in ([1, 2, 3, 4], [0, 1, 2, 4], [0, 1, 0, 0])]
    # Hamming distances to [0, 1, 2, 3]: 4, 1, 2 -> [0, 1, 2, 4] reversed
    assert ToyHints().exemplar_hint([0, 1, 2, 3], {}, corpus, 2) == [4, 2, 1, 0]
    assert ToyHints().exemplar_hint(ToyPrompt((1, 2, 3, 3)), {}, corpus, 1) == [4, 3, 2, 1]
    assert ToyHints().exemplar_hint([0, 1, 2, 3], {}, [], 2) is None


def test_seeding_rerolls_an_all_fail_group_with_a_solved_exemplar_for_the_plain_prompt():
    """Group 0 (need 0) is solved plain -> the corpus holds [1, 2, 3, 4]. Group 1 (need 4) gets
    its answer [4, 3, 2, 1] (4 digits) as the exemplar: the stub answers 4 -> success; group 2
    (need 9) stays all-fail. The re-rolled rows are trained for the plain prompt (retarget)
    with the sampler's hinted log-probs (-4) kept."""
    rounds, rnd, aug = _rounds("xrpo_seed", needs=[0, 4, 9])
    assert isinstance(aug, ExemplarSeeds) and aug.pool == "solved" and aug.k == 2
    out = aug(rounds, rnd)
    ids = out.rollout.group_ids
    for g, plain in ((1, [0, 1, 2, 3]), (2, [4, 3, 2, 1])):
        rows = (ids == g).nonzero().flatten().tolist()
        assert [out.rollout.prompts[i] for i in rows] == [plain] * 4
        assert out.rollout.rollout_logp[rows, 0].tolist() == [-4.0] * 4
    assert out.rewards.values[ids == 1, 0].tolist() == [1.0] * 4
    assert out.rewards.values[ids == 2, 0].tolist() == [0.0] * 4
    assert rounds.step_round_metrics() == {"guided_groups": 2.0, "guided_rescued": 1.0,
                                           "guided_rollouts": 8.0}
    # only plain successes enter the corpus (group 1's seeded success does not)
    assert list(aug.corpus) == [repr([1, 2, 3, 4])]
    fresh = build_guidance("xrpo_seed", aug.s, rounds.policy)
    buf = io.BytesIO()
    torch.save(aug.state_dict(), buf)  # the checkpoint's state.pt, read back weights_only
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh.corpus == aug.corpus


def test_no_exemplar_but_the_prompt_itself_means_no_reroll():
    rounds, rnd, aug = _rounds("xrpo_seed", needs=[9, 9, 9])  # nothing solved: empty corpus
    assert aug(rounds, rnd) is not None
    assert rounds.step_round_metrics()["guided_rollouts"] == 0.0
    aug.corpus = {repr([1, 2, 3, 4]): ([1, 2, 3, 4], toy_record(ToyConfig(length=4),
                                                                [1, 2, 3, 4]))}
    assert aug._hint(rnd, 0) is None  # its own record is never its exemplar
    assert aug._hint(rnd, 1) == [4, 3, 2, 1]


def test_dataset_pool_remembers_every_drawn_record_and_bad_settings_fail():
    rounds, rnd, _ = _rounds("none", needs=[9, 9, 9])
    aug = build_guidance("xrpo_seed", Guidance(ToyHints(), threshold=0.5), rounds.policy,
                         exemplar_pool="dataset")
    aug(rounds, rnd)
    assert len(aug.corpus) == 3
    with pytest.raises(ValueError, match="pool 'solved' or 'dataset'"):
        ExemplarSeeds(Guidance(ToyHints()), rounds.policy, k=0)


def test_video_exemplars_most_similar_questions_with_their_solutions():
    from mmrl.video.data import parse_record
    from mmrl.video.guidance import EXEMPLAR_CHARS, VideoHints
    from mmrl.video.rounds import _Media
    recs = [parse_record({"problem": p, "problem_type": "free-form", "solution": s})
            for p, s in (("How many red balls move?", "<answer>3</answer>"),
                         ("How many blue cubes move left?", "<answer>2</answer>"),
                         ("What colour is the sky?", "<answer>blue</answer>"),
                         ("How many red balls stop?", "x" * (EXEMPLAR_CHARS + 50)))]
    hints = VideoHints(_Media(recs, "plain", None, fps=4.0, max_frames=8))
    corpus = [(r.problem, {"record_index": i}) for i, r in enumerate(recs) if i]
    # word Jaccard with "How many red balls move?": {how, many} of 7 -> 2/7; 0; 4/6
    text = hints.exemplar_hint(recs[0].problem, {"record_index": 0}, corpus, 2)
    assert text == ("Solved examples of other questions:\n"
                    "Question: How many red balls stop?\nAnswer: " + "x" * EXEMPLAR_CHARS
                    + "\n\nQuestion: How many blue cubes move left?\nAnswer: 2")
    assert hints.exemplar_hint(recs[0].problem, {"record_index": 0}, corpus[:1], 1).endswith(
        "Answer: 2")


def test_toy_and_video_configs_build_the_seeding_augmenter_from_their_keys():
    from mmrl.config.schema import config_from_dict
    from mmrl.demo.toy import toy_guidance
    for job in ("toy", "video"):
        cfg = config_from_dict({"job": job, job: {"guidance": "xrpo_seed",
                                                   "guidance_exemplars": 3,
                                                   "guidance_exemplar_pool": "dataset"}})
        assert (cfg.task.guidance_exemplars, cfg.task.guidance_exemplar_pool) == (3, "dataset")
    from mmrl.train.guidance import GUIDANCE
    from mmrl.train.guidance_options import GUIDANCE_NAMES
    assert tuple(GUIDANCE_NAMES) == GUIDANCE  # the config's choices are the builder's
    rounds, _, _ = _rounds("none", needs=[0, 0, 0])
    toy = config_from_dict({"job": "toy", "toy": {"guidance": "xrpo_seed"}}).task
    (aug,) = toy_guidance(toy, rounds.policy)
    assert isinstance(aug, ExemplarSeeds) and (aug.k, aug.pool) == (2, "solved")
