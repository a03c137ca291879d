"""The toy job: a tiny causal transformer learns a digit-string task from a verifiable reward.

Pure torch, seconds per hundred steps on a laptop CPU: the demo and the loop's end-to-end test.
Prompt "3 1 4 2", task ``reverse`` -> the model should answer "2 4 1 3" then <eos>. The reward is
the fraction of answer positions that are right (an answer of the wrong length is scored against
the longer of the two), so GRPO gets a dense, verifiable signal. The policy also declares the
preference capability (pairs of answers from records ``{"prompt": [digits], "chosen": [digits],
"rejected": [digits]}``), so the runner's preference steps are tested in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrl.demo.config import TASKS, ToyConfig  # the section (importing it registers the job)
from mmrl.train.policy import Capabilities, GroupPolicy
from mmrl.train.preference import PrefScores
from mmrl.train.rollout import Rollout


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt with a hint: the prompt's digits and the hint's (a prefix of the answer), shown
    in the prompt's hint segment (``toy.hint_slot``). A plain prompt is a list of digits."""

    digits: Tuple[int, ...]
    hint: Tuple[int, ...] = ()


class ToyLM(nn.Module):
    """A causal transformer over tokens 0..V-1 (digits, <sep>, <eos>)."""

    def __init__(self, vocab: int, max_len: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, V] logits
        L = ids.shape[1]
        causal = torch.triu(torch.full((L, L), float("-inf"), device=ids.device), 1)
        h = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))
        return self.head(self.body(h, mask=causal, is_causal=True))


class ToyPolicy(GroupPolicy):
    """:class:`mmrl.train.policy.GroupPolicy` for the toy task (reference = a frozen copy at start)."""

    capabilities = Capabilities(token_weights=True, greedy=True, preference=True,
                                rollout_logp=True, retarget=True, sft=True,
                                continuations=True)

    def __init__(self, c: ToyConfig, seed: int = 0, device: str = "cpu"):
        torch.manual_seed(seed)
        self.c, self.device = c, torch.device(device)
        self.sep, self.eos, self.pad = c.digits, c.digits + 1, c.digits + 2
        self.T = c.length + 1  # answer digits + <eos>
        # the hint segment: `length` tokens between the digits and <sep>, <pad> where empty
        self.H = c.length if (c.hint_slot or c.guidance != "none") else 0
        self.model = ToyLM(c.digits + 2 + (self.H > 0), c.length + self.H + 1 + self.T,
                           c.d_model, c.layers, c.heads).to(self.device)
        self.ref = None
        self.tw_alpha = 1.7

    def parameters(self):
        return self.model.parameters()

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)

    def enable_reference(self):
        import copy
        # left in train mode (there is no dropout): the eval-mode fast path of
        # nn.TransformerEncoderLayer sums in another order, and at the start the reference must
        # score exactly as the policy does (KL 0, implicit rewards 0, accuracy 0.5)
        self.ref = copy.deepcopy(self.model).requires_grad_(False)

    def rollout(self, prompts, metadata, group_size, generator) -> Rollout:
        """``group_size`` samples per prompt (an int, or one count per prompt)."""
        return self._generate(prompts, metadata, group_size, generator, greedy=False)

    def greedy_rollout(self, prompts, metadata, generator) -> Rollout:
        """One greedy (argmax) completion per prompt (ReMax's baseline); draws nothing."""
        return self._generate(prompts, metadata, 1, generator, greedy=True)

    def _generate(self, prompts, metadata, group_size, generator, greedy: bool) -> Rollout:
        counts = torch.as_tensor([group_size] * len(prompts) if isinstance(group_size, int)
                                 else list(group_size))
        P = self.prompt_ids(prompts).repeat_interleave(counts, 0)  # [B, L + H]
        ids = torch.cat([P, torch.full((len(P), 1), self.sep)], 1).to(self.device)
        ids, taken = self._sample(ids, self.T, generator, greedy)
        groups = torch.arange(len(prompts)).repeat_interleave(counts)
        rep = lambda xs: [x for x, n in zip(xs, counts.tolist()) for _ in range(n)]  # noqa: E731
        return self._finish(ids, taken, rep(list(prompts)), rep(list(metadata)), groups)

    def _sample(self, ids, steps: int, generator, greedy: bool = False):
        """``steps`` more tokens after ``ids`` -> (ids, ``[B, steps]`` their log-probs)."""
        taken = []
        for _ in range(steps):  # no KV cache: the sequences are a dozen tokens long
            logits = self.model(ids)[:, -1].float() / self.c.temperature
            if greedy:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(logits, -1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).to(self.device)
            taken.append(torch.log_softmax(logits, -1).gather(-1, nxt).cpu())  # [B, 1]
            ids = torch.cat([ids, nxt], 1)
        return ids, torch.cat(taken, 1) if taken else torch.zeros(len(ids), 0)

    def _finish(self, ids, logp, prompts, metadata, groups) -> Rollout:
        """The rollout of full sequences ``ids`` (``logp [B, T]``: the sampler's log-probs)."""
        resp = ids[:, -self.T:].cpu()  # [B, T]
        ended = (resp == self.eos).cumsum(1)
        mask = (ended == 0) | ((ended == 1) & (resp == self.eos))  # up to and incl. first <eos>
        sampled = torch.where(mask, logp, torch.zeros(()))  # [B, T], 0 on padding
        samples = [[int(t) for t, m in zip(r, mk) if m and t < self.sep] for r, mk in
                   zip(resp, mask)]
        return Rollout(samples, list(prompts), list(metadata), groups, mask,
                       {"ids": ids.cpu()}, rollout_logp=sampled)

    def continue_from(self, rollout: Rollout, rows, keep, m: int, generator) -> Rollout:
        """``m`` sampled completions of each row's prompt ⊕ its first ``keep[i]`` response
        tokens (capability ``continuations``; SPO's Monte-Carlo values): ``N·m`` rows, pair i's
        group id i; ``rollout_logp`` holds the rollout's log-probs on the kept prefix."""
        rows, keep = torch.as_tensor(rows).repeat_interleave(m), torch.as_tensor(keep)
        keep = keep.repeat_interleave(m)
        ids = rollout.data["ids"][rows]  # [N·m, L + T]
        start = ids.shape[1] - self.T
        out = ids.clone()
        logp = torch.zeros(len(rows), self.T)
        if rollout.rollout_logp is not None:
            logp[:] = rollout.rollout_logp[rows]
        for k in keep.unique().tolist():  # one batch per prefix length
            sel = (keep == k).nonzero().flatten()
            got, lp = self._sample(ids[sel, :start + k].to(self.device), self.T - k, generator)
            out[sel], logp[sel, k:] = got.cpu(), lp
        groups = torch.arange(len(keep) // max(m, 1)).repeat_interleave(m)
        return self._finish(out, logp, [rollout.prompts[i] for i in rows.tolist()],
                            [rollout.metadata[i] for i in rows.tolist()], groups)

    def prompt_ids(self, prompts) -> torch.Tensor:
        """``[P, length + H]`` token ids: the digits, then the hint segment (the hint's digits,
        <pad> after them) when the policy has one.

        Raises:
            ValueError: a hinted prompt without a hint segment, or a hint longer than it.
        """
        rows = []
        for p in prompts:
            digits, hint = (list(p.digits), list(p.hint)) if isinstance(p, ToyPrompt) else (
                list(p), [])
            if len(hint) > self.H:
                raise ValueError(f"a hint of {len(hint)} digits but the prompt's hint segment "
                                 f"holds {self.H}; set toy.hint_slot=true (or a guidance "
                                 f"method) so prompts carry one of `length` tokens")
            rows.append(digits + hint + [self.pad] * (self.H - len(hint)))
        return torch.tensor(rows, dtype=torch.long)

    def retarget(self, rollout: Rollout, prompts, metadata) -> Rollout:
        """The same completions under ``prompts`` (one per row): the prompt part of
        ``data["ids"]`` is rebuilt, ``rollout_logp`` (the sampler's) is kept."""
        if len(prompts) != len(rollout):
            raise ValueError(f"retarget: {len(prompts)} prompts for {len(rollout)} rows; "
                             f"give one prompt per row")
        ids = rollout.data["ids"].clone()
        ids[:, :self.c.length + self.H] = self.prompt_ids(prompts)
        return Rollout(list(rollout.samples), list(prompts), list(metadata), rollout.group_ids,
                       rollout.mask, {**rollout.data, "ids": ids}, skipped=dict(rollout.skipped),
                       row_keep=rollout.row_keep, nfe=rollout.nfe,
                       rollout_logp=rollout.rollout_logp, mini_batch=rollout.mini_batch)

    def _logp(self, model, rollout, rows, t0, t1):
        ids = rollout.data["ids"][rows].to(self.device)  # [b, L + T]
        start = ids.shape[1] - self.T
        # the temperature-scaled distribution the rollout sampled from ([b, t, V])
        logits = model(ids[:, :-1])[:, start - 1 + t0:start - 1 + t1].float() / self.c.temperature
        tgt = ids[:, start + t0:start + t1]
        return torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]

    def logp(self, rollout, rows, t0, t1):
        return self._logp(self.model, rollout, rows, t0, t1)

    @torch.no_grad()
    def token_weights(self, rollout) -> torch.Tensor:
        """TW-GRPO weights ``[B, T]``, one group at a time from full-vocabulary log-probs."""
        from mmrl.algo.token_weights import tw_token_weights
        out = torch.ones(rollout.mask.shape)
        for g in rollout.group_ids.unique():
            rows = (rollout.group_ids == g).nonzero().flatten()
            ids = rollout.data["ids"][rows].to(self.device)
            start = ids.shape[1] - self.T
            full = torch.log_softmax(
                self.model(ids[:, :-1])[:, start - 1:].float() / self.c.temperature, -1)
            out[rows] = tw_token_weights(full, rollout.mask[rows].to(self.device),
                                         alpha=self.tw_alpha).cpu()
        return out

    def ref_logp(self, rollout, rows, t0, t1):
        if self.ref is None:
            raise ValueError("beta > 0 needs a reference policy; call enable_reference() first")
        return self._logp(self.ref, rollout, rows, t0, t1)

    def pair_rollout(self, records):
        """``(rollout, chosen_rows, rejected_rows)`` of pair records ``{"prompt": [digits],
        "chosen": [digits], "rejected": [digits]}``: rows 0..P-1 the chosen answers, P..2P-1
        the rejected ones (each followed by <eos>). A record whose prompt is not ``length``
        digits or whose answers are not lists of at most ``length`` digits is left out and
        counted in ``skipped["bad_record"]``."""
        good = [r for r in records if self._usable(r)]
        P, T = len(good), self.T
        rows = [(r["prompt"], r[side]) for side in ("chosen", "rejected") for r in good]
        L = self.c.length + self.H  # digits and the (empty) hint segment
        ids = torch.full((2 * P, L + 1 + T), self.eos, dtype=torch.long)
        mask = torch.zeros(2 * P, T, dtype=torch.bool)
        for i, (prompt, answer) in enumerate(rows):
            ids[i, :L] = self.prompt_ids([prompt])[0]
            ids[i, L] = self.sep
            ids[i, L + 1:L + 1 + len(answer)] = torch.tensor(answer, dtype=torch.long)
            mask[i, :len(answer) + 1] = True  # the answer and its <eos>
        rollout = Rollout([list(a) for _, a in rows], [list(p) for p, _ in rows],
                          [{} for _ in rows], torch.arange(2 * P) % max(P, 1), mask, {"ids": ids},
                          skipped={"bad_record": len(records) - P} if len(records) > P else {})
        return rollout, torch.arange(P), torch.arange(P, 2 * P)

    def target_rollout(self, examples):
        """SFT rows (:mod:`mmrl.train.sft_stage`) of examples ``{"prompt": [digits],
        "target": [digits]}``: one row each, the target and its <eos> masked; unusable
        examples are counted in ``skipped["bad_record"]`` as :meth:`pair_rollout`'s."""
        ro, chosen, _ = self.pair_rollout([{"prompt": e.get("prompt"), "chosen": e.get("target"),
                                            "rejected": e.get("target")} for e in examples])
        return ro.select(chosen)

    def _usable(self, record) -> bool:
        digits = lambda xs, most: isinstance(xs, list) and len(xs) <= most and all(  # noqa: E731
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < self.c.digits for x in xs)
        return (isinstance(record, dict) and digits(record.get("prompt"), self.c.length)
                and len(record["prompt"]) == self.c.length
                and digits(record.get("chosen"), self.c.length)
                and digits(record.get("rejected"), self.c.length))

    def pair_scores(self, rollout, chosen_rows, rejected_rows, generator, with_ref):
        """The pairs' answer log-probs ``[P, T]`` (with gradient) and, with ``with_ref``, the
        frozen reference's (:meth:`enable_reference`); draws nothing from ``generator``."""
        if with_ref and self.ref is None:
            raise ValueError("the preference loss needs a reference policy; call "
                             "enable_reference() first")
        both = torch.cat([chosen_rows, rejected_rows])
        P = len(chosen_rows)
        logp = self._logp(self.model, rollout, both, 0, self.T)  # [2P, T]
        ref = None
        if with_ref:
            with torch.no_grad():
                ref = self._logp(self.ref, rollout, both, 0, self.T)
        mask = rollout.mask[both].to(logp.device)
        return PrefScores(logp[:P], logp[P:], mask[:P], mask[P:],
                          None if ref is None else ref[:P], None if ref is None else ref[P:])


def make_prompts(c: ToyConfig, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c.digits, (c.num_prompts, c.length), generator=g).tolist()


def digit_reward(samples: Sequence[List[int]], prompts, metadata) -> torch.Tensor:
    """Fraction of answer positions right, over the longer of answer and target -> [B] in [0, 1]."""
    out = []
    for s, m in zip(samples, metadata):
        target = m["target"]
        hits = sum(int(a == b) for a, b in zip(s, target))
        out.append(hits / max(len(s), len(target), 1))
    return torch.tensor(out)


def exact_reward(samples: Sequence[List[int]], prompts, metadata) -> torch.Tensor:
    """1 for an answer equal to the target, else 0 -> [B] (a stricter verifier)."""
    return torch.tensor([float(list(s) == list(m["target"])) for s, m in zip(samples, metadata)])


def run(config) -> Dict[str, Any]:
    from mmrl.train.runner import run_training
    c: ToyConfig = config.task
    policy = ToyPolicy(c, seed=config.train.seed, device=_device(config.train.device))
    spec = config.algo.resolve()
    policy.tw_alpha = spec.tw_alpha
    if spec.needs_ref or pref_needs_ref(config.pref):
        policy.enable_reference()
    prompts = make_prompts(c, config.train.seed)
    metadata = [toy_record(c, p) for p in prompts]
    augmenters = toy_guidance(c, policy, config.algo.reward_weights)
    if spec.needs_steps:  # GiGPO / SPO: one answer token = one step
        from mmrl.train.steps import StepAugmenter
        augmenters.append(StepAugmenter(spec, toy_step_fn(policy, c.reward), policy))
    return run_training(config, policy, toy_reward(c.reward), prompts, metadata,
                        augmenters=augmenters, verifier=toy_verifier(config.pref.verifier))


def toy_step_fn(policy: ToyPolicy, reward: str):
    """The toy job's steps (:data:`mmrl.train.steps.StepFn`): one answer token = one step;
    the state before step t = prompt ⊕ the t tokens emitted so far (equal prefixes = GiGPO's
    anchor states). Step rewards sum to the row's reward: ``digits``: r_t = [digit t right] /
    max(answer length, target length) on digit steps, 0 on <eos>; ``exact``: the reward on the
    row's last step."""
    from mmrl.train.steps import prefix_anchors

    def steps(rollout: Rollout):
        mask = rollout.mask
        r = torch.zeros(mask.shape)
        if reward == "digits":
            for i, (s, m) in enumerate(zip(rollout.samples, rollout.metadata)):
                hits = [float(a == b) for a, b in zip(s, m["target"])]
                r[i, :len(hits)] = torch.tensor(hits) / max(len(s), len(m["target"]), 1)
        else:
            last = (mask.sum(-1) - 1).clamp(min=0)
            r[torch.arange(len(r)), last] = exact_reward(rollout.samples, rollout.prompts,
                                                         rollout.metadata)
        ids = rollout.data["ids"]
        return r, prefix_anchors(ids, ids.shape[1] - policy.T)
    return steps


def toy_record(c: ToyConfig, prompt: Sequence[int]) -> Dict[str, Any]:
    """A prompt's metadata: ``target`` (the answer), ``solution_steps`` (its digits, one step
    each) and ``hints`` (abstract to concrete: the answer's first digit, then one more each,
    never the whole answer)."""
    target = list(TASKS[c.task](list(prompt)))
    return {"target": target, "solution_steps": [[d] for d in target],
            "hints": [[d] for d in target[:-1]]}


class ToyHints:
    """:class:`mmrl.train.guidance.HintPrompts` of the toy job: hints are answer prefixes."""

    def level_hints(self, meta) -> List[List[int]]:
        steps = meta.get("hints") or []
        return [[d for h in steps[:k] for d in h] for k in range(1, len(steps) + 1)]

    def prefix_hint(self, meta, ratio: float) -> Optional[List[int]]:
        steps = [d for s in meta.get("solution_steps") or [] for d in s]
        n = int(round(ratio * len(steps)))
        return steps[:n] if n > 0 else None

    def answer_hint(self, meta) -> Optional[List[int]]:
        return list(meta["target"]) if meta.get("target") else None

    def exemplar_hint(self, prompt, meta, corpus, k: int) -> Optional[List[int]]:
        """XRPO seeding: the answer of the corpus record nearest in Hamming distance of the
        digits (first in corpus order on ties). The hint segment holds one answer, so k is
        capped at 1 and the exemplar's question is not shown."""
        digits = prompt.digits if isinstance(prompt, ToyPrompt) else tuple(prompt)

        def distance(entry):
            other = entry[0].digits if isinstance(entry[0], ToyPrompt) else tuple(entry[0])
            return sum(a != b for a, b in zip(digits, other)) + abs(len(digits) - len(other))

        near = min(corpus, key=distance, default=None)
        return list(near[1]["target"]) if near and near[1].get("target") else None

    def with_hint(self, prompt, meta, hint):
        digits = prompt.digits if isinstance(prompt, ToyPrompt) else tuple(prompt)
        return ToyPrompt(tuple(digits), tuple(hint)), {**meta, "hinted": len(hint)}


def toy_guidance(c: ToyConfig, policy, reward_weights=None) -> list:
    """The toy job's round augmenters: ``toy.guidance``'s (none: no augmenter); a sample
    succeeds when its reward is 1 (the whole answer right, either reward)."""
    from mmrl.train.guidance import Guidance, build_guidance
    aug = build_guidance(c.guidance, Guidance(ToyHints(), threshold=1.0 - 1e-6,
                                              start_step=c.guidance_start,
                                              weights=reward_weights),
                         policy, ratios=c.guidance_ratios, exemplars=c.guidance_exemplars,
                         exemplar_pool=c.guidance_exemplar_pool)
    return [] if aug is None else [aug]


VERIFIERS = {"digits": digit_reward, "exact": exact_reward}
"""Reward names the toy job knows (``toy.reward``, ``pref.verifier``)."""


def toy_reward(spec: str):
    """``toy.reward``'s reward: one verifier, or for ``digits,exact`` one whose columns are
    named after them (``{name: [B]}``)."""
    names = spec.split(",")
    if len(names) == 1:
        return VERIFIERS[spec]
    return lambda samples, prompts, metadata: {
        n: VERIFIERS[n](samples, prompts, metadata) for n in names}


def toy_verifier(name):
    """The verifier reward ``pref.verifier`` names (None for null).

    Raises:
        UserError: a name the toy job does not know.
    """
    if name is None:
        return None
    if name not in VERIFIERS:
        from mmrl.config.core import UserError
        raise UserError(f"pref.verifier: got {name!r}; the toy job knows "
                        f"{', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[name]


def pref_needs_ref(pref) -> bool:
    """Does the ``pref`` section need the reference policy (a loss with a reference, or
    eval pairs)?"""
    if pref.eval_pairs:
        return True
    if pref.mode == "off":
        return False
    return pref.resolve().needs_ref


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
