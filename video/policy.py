"""Any registered vision-language family as a :class:`mmrl.train.policy.GroupPolicy`: group
rollouts, per-token logp, reference, TW weights, concatenated tries, export, FSDP, and the
scores of preference pairs (``pair_rollout`` / ``pair_scores``, :mod:`mmrl.train.preference`).

The family's specifics (processor inputs, positions, where the vision features go, the module
layout, export) come from its :class:`~mmrl.video.models.base.VLMAdapter`, picked by
``config.model_type`` (:mod:`mmrl.video.models`); nothing here names a family.

Vision is encoded once per prompt. A rollout encodes each prompt once (the adapter's ``encode``
and ``positions``) and keeps ONE copy of its vision tensors; every forward (sampling, ``logp``,
``ref_logp``, TW weights) runs the vision tower on the unique prompts of its rows only and
expands the embeddings (and any extra language-model inputs, e.g. Qwen3-VL's DeepStack) to the
rows by indexing. HF ``generate`` with ``num_return_sequences=G`` instead copies every prompt's
pixel values G times and re-encodes them per row, and takes its positions from the model (for
Qwen2/2.5-VL transformers 5.24's ``get_rope_index``, wrong for text after a video of more than
one temporal grid); so sampling is a KV-cached loop here (temperature, top-p,
``max_new_tokens``, stop strings, an optional ``allowed_answers`` restriction) with the
adapter's positions.

The language model runs each unique prompt once too (``shared_prefix``, the default): the
training passes pack a prompt's rows' responses behind it under an explicit attention mask
(:mod:`mmrl.video.shared_prefix`), and sampling prefills it once and expands its KV cache to the
rows; values and gradients equal the repeated-prompt forward (``shared_prefix=False``).

Log-probs are of the temperature-scaled distribution (restricted to ``allowed_answers`` when set),
the one tokens are sampled from before top-p truncation, as TRL and verl do. The rollout reports
the sampled tokens' log-probs under that same distribution, taken from the sampling forward (KV
cache) as ``Rollout.rollout_logp``: with no engine or precision mismatch they equal ``logp``'s
(``algo.rollout_is`` weights are then 1); top-p truncation is the sampler's choice, not a
mismatch, and is not in them.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from mmrl.train.distributed import gathered_parameters, root_forward
from mmrl.train.policy import Capabilities, GroupPolicy
from mmrl.train.preference import PrefScores
from mmrl.train.rollout import Rollout, concat_off_policy, concat_rollout_logp

from .io import SkipCounter, VideoError
from .models import adapter_for, adapter_for_path

FINETUNE = ("lora", "full")
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")  # the kernels that take an explicit [U, 1, L, L] mask


def load_vlm(path: str, *, dtype: str = "float32", device: str = "cpu",
             finetune: str = "lora", lora_rank: int = 16, lora_alpha: int = 32,
             lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             freeze_vision: bool = True, gradient_checkpointing: bool = False, adapter=None):
    """``(model, processor)`` from a hub id or a local folder, through the family adapter of the
    checkpoint's ``config.model_type`` (:func:`mmrl.video.models.adapter_for`).

    ``finetune="lora"`` wraps the model in a peft LoRA on the language model's ``lora_targets``
    (the vision tower is never LoRA'd); ``"full"`` trains every weight. ``freeze_vision`` stops
    gradients into the adapter's ``vision_modules`` (tower and projector/merger).

    Raises:
        ValueError: unknown ``finetune``/``dtype``.
        NotImplementedError: a checkpoint whose ``model_type`` no registered family handles
            (checked from its config, before the weights load; the message lists the supported
            ones).
    """
    if finetune not in FINETUNE:
        raise ValueError(f"finetune={finetune!r}; expected one of {FINETUNE}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(dtypes)}")
    if adapter is None:
        adapter = adapter_for_path(path)
    else:
        from transformers import AutoConfig
        adapter.check(AutoConfig.from_pretrained(path).model_type)
    model, processor = adapter.load(path, dtypes[dtype], device)
    model.requires_grad_(True)
    if freeze_vision:
        for module in adapter.vision_modules(model):
            module.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
            target_modules=adapter.lora_target_regex(lora_targets)))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if finetune == "lora":
            model.enable_input_require_grads()
    return model, processor


load_qwen_vl = load_vlm  # the old name (any registered family loads)


@dataclass
class PromptCache:
    """The rollout's prompts, once each (shared by their rows; never sliced per row).

    Attributes:
        ids, attn: ``[U, P]`` left-padded prompt ids and attention mask.
        pos: ``[D, U, P]`` positions (D = the adapter's ``position_dims``: 3 for mRoPE);
            next_pos: ``[U]`` the first response position.
        vision: per prompt, the adapter's ``vision_payload`` (e.g. ``pixel_values_videos``,
            ``video_grid_thw``); one copy per prompt, whatever G is.
    """

    ids: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    next_pos: torch.Tensor
    vision: List[Dict[str, torch.Tensor]] = field(default_factory=list)


class VLMPolicy(GroupPolicy):
    """GroupPolicy over a vision-language model (plain or peft-wrapped) of any registered family.

    Prompts are strings (logged); ``metadata[i]["messages"]`` is the prompt's conversation in
    qwen-vl-utils format (as :func:`~mmrl.video.data.build_messages` makes it). Samples are the
    decoded completions; each row's metadata gains ``completion_length`` (tokens).
    A prompt whose video cannot be read is skipped (no rows) and counted in ``skips``.
    The family's specifics come from ``adapter`` (default: the registry's adapter of
    ``model.config.model_type``, :mod:`mmrl.video.models`).

    Raises:
        NotImplementedError: a model whose ``config.model_type`` no registered family handles.
    """

    capabilities = Capabilities(token_weights=True, sft=True, concat_rollouts=True, export=True,
                                fsdp=True, greedy=True, rollout_logp=True,
                                entropy=True, preference=True, retarget=True)

    def __init__(self, model, processor, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, stop: Sequence[str] = (),
                 allowed_answers: Sequence[str] = (), video: Optional[Dict[str, Any]] = None,
                 tw_alpha: float = 1.7, tw_chunk: int = 64, device: str = "cpu", adapter=None,
                 template: str = "video_r1", system_prompt: Optional[str] = None,
                 shared_prefix: bool = True):
        if temperature <= 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}, max_new_tokens="
                             f"{max_new_tokens}; expected temperature > 0, 0 < top_p <= 1, "
                             f"max_new_tokens >= 1")
        self.is_peft = hasattr(model, "disable_adapter")
        self.base = model.get_base_model() if self.is_peft else model
        self.cfg = self.base.config
        if adapter is None:
            adapter = adapter_for(self.cfg.model_type)
        adapter.check(self.cfg.model_type)
        self.adapter = adapter
        self.model, self.processor, self.device = model, processor, torch.device(device)
        self.tok = processor.tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop = [s for s in stop if s]
        self.video = dict(video or {})
        self.tw_alpha, self.tw_chunk = tw_alpha, tw_chunk
        self.shared_prefix = bool(shared_prefix)
        impl = getattr(self.cfg.get_text_config(), "_attn_implementation", None) or "sdpa"
        if self.shared_prefix and impl not in SHARED_PREFIX_ATTENTION:
            raise ValueError(
                f"video.shared_prefix=true runs the language model with an explicit attention "
                f"mask, which attn_implementation={impl!r} does not take; load the model with "
                f"one of {SHARED_PREFIX_ATTENTION}, or set video.shared_prefix: false")
        self.template, self.system_prompt = template, system_prompt  # pair records' prompts
        self.eos = adapter.end_token_ids(self.tok)
        self.allowed = self._allowed_ids(allowed_answers)
        # vision placeholders are never sampled: one in a completion would shift the features
        self.banned = torch.tensor(adapter.banned_token_ids(self.cfg), dtype=torch.long,
                                   device=self.device)
        self.ref = None
        self._fsdp = None  # the FSDP2 root once apply_fsdp ran
        self.skips = SkipCounter()
        # train mode for scoring (activation checkpointing only runs in it; the supported
        # families have no dropout); sampling switches to eval for its KV cache and back
        self.model.train()

    # ------------------------------------------------------------------ plumbing
    def _allowed_ids(self, answers: Sequence[str]) -> Optional[torch.Tensor]:
        """Token ids decoding may use: the answers' tokens and the end tokens (None = all)."""
        if not answers:
            return None
        ids = set(self.eos)
        for a in answers:
            ids.update(self.tok(a, add_special_tokens=False)["input_ids"])
        return torch.tensor(sorted(ids), device=self.device)

    def parameters(self):
        return self.model.parameters()

    def state_dict(self):
        if self.is_peft:
            from peft import get_peft_model_state_dict
            return get_peft_model_state_dict(self.model)
        return self.model.state_dict()

    def load_state_dict(self, state):
        if self.is_peft:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state)

    def export_pretrained(self, path: str, merge_lora: bool = False, state_dict=None) -> str:
        """The model in its library's format (the adapter's ``export``; for transformers
        families :func:`mmrl.video.models.export.export_vlm`)."""
        return self.adapter.export(self, path, merge_lora=merge_lora, state_dict=state_dict)

    def apply_fsdp(self):
        """FSDP2 for full fine-tuning (``train.parallel=fsdp``): each decoder layer of the
        language model is a unit; the root (the model) holds the rest, the vision tower
        included, so ranks whose prompts mix images and videos differently still run the same
        collectives. ``logp`` runs as the root's forward
        (:func:`mmrl.train.distributed.root_forward`); rollouts and TW weights run with the
        weights gathered."""
        from torch.distributed.fsdp import fully_shard
        if self.is_peft:
            raise ValueError("train.parallel=fsdp shards full fine-tuning; video.finetune=lora: "
                             "use train.parallel=ddp (a LoRA adapter is small enough to "
                             "replicate)")
        for layer in self.adapter.decoder_layers(self.base):
            fully_shard(layer)
        fully_shard(self.model)
        self._fsdp = self.model
        return self.model

    def enable_reference(self) -> None:
        """LoRA: the reference is the model with its adapter disabled (no copy). Full
        fine-tuning: a frozen copy of the current weights."""
        if not self.is_peft:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ prompts
    def _encode_one(self, messages) -> Dict[str, torch.Tensor]:
        """One prompt's processor tensors (the adapter's ``encode``)."""
        return self.adapter.encode(messages, self.processor, self.video)

    def encode_prompts(self, conversations) -> tuple:
        """``(PromptCache, kept prompt indices)``; unreadable media are skipped and counted."""
        rows, kept = [], []
        for i, messages in enumerate(conversations):
            try:
                rows.append(self._encode_one(messages))
            except VideoError as err:
                self.skips.add(err)
                continue
            kept.append(i)
        P = max((r["input_ids"].shape[1] for r in rows), default=0)
        D = self.adapter.position_dims
        ids = torch.full((len(rows), P), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros(len(rows), P, dtype=torch.long)
        pos = torch.ones(D, len(rows), P, dtype=torch.long)  # left padding gets position 1
        next_pos, vision = torch.zeros(len(rows), dtype=torch.long), []
        for u, r in enumerate(rows):
            n = r["input_ids"].shape[1]
            ids[u, P - n:], attn[u, P - n:] = r["input_ids"][0], 1
            p, next_pos[u] = self.adapter.positions(self.base, r)  # [D, 1, n], int
            pos[:, u, P - n:] = p[:, 0]
            vision.append(self.adapter.vision_payload(r))
        return PromptCache(ids, attn, pos, next_pos, vision), kept

    def _encode_counted(self, conversations) -> tuple:
        """``(PromptCache, kept prompt indices, {reason: this call's skips})``."""
        before = dict(self.skips.by_reason)
        cache, kept = self.encode_prompts(conversations)
        skipped = {k: v - before.get(k, 0) for k, v in self.skips.by_reason.items()
                   if v > before.get(k, 0)}
        return cache, kept, skipped

    def _prompt_embeds(self, base, cache: PromptCache, pidx: torch.Tensor, t: int) -> tuple:
        """``([b, P, H] prompt embeddings, language-model kwargs)`` of rows ``pidx`` followed by
        ``t`` response tokens: vision runs once per unique prompt and is expanded to the rows by
        indexing."""
        uniq, inv = torch.unique(pidx, return_inverse=True)
        ids = cache.ids[uniq].to(self.device)  # [U', P]
        emb, state = self.adapter.prompt_embeds(base, ids, [cache.vision[u]
                                                            for u in uniq.tolist()])
        inv = inv.to(self.device)
        return emb[inv], self.adapter.lm_kwargs(state, ids, inv, t)  # [U', P, H] -> [b, P, H]

    def _hidden(self, model, cache: PromptCache, pidx: torch.Tensor, resp: torch.Tensor):
        """``(last hidden states [b, P + t, H], lm head)`` of prompts ``pidx`` followed by
        ``resp [b, t]``."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        ad = self.adapter
        resp = resp.to(self.device)
        t = resp.shape[1]
        emb_p, kwargs = self._prompt_embeds(base, cache, pidx, t)
        emb = torch.cat([emb_p, ad.embed_tokens(base)(resp)], 1)
        attn = torch.cat([cache.attn[pidx], torch.ones(len(pidx), t, dtype=torch.long)], 1)
        rpos = cache.next_pos[pidx][:, None] + torch.arange(t)  # [b, t]
        pos = torch.cat([cache.pos[:, pidx], rpos.expand(ad.position_dims, -1, -1)], 2)
        out = ad.language_model(base)(inputs_embeds=emb, attention_mask=attn.to(self.device),
                                      position_ids=ad.lm_positions(pos.to(self.device)),
                                      use_cache=False, **kwargs)
        return out.last_hidden_state, ad.lm_head(base)

    def _response_hidden(self, model, cache: PromptCache, pidx: torch.Tensor,
                         resp: torch.Tensor) -> tuple:
        """``(h [b, t, H], lm head)``: ``h[:, k]`` is the hidden state that predicts response
        token ``k`` of rows ``pidx`` followed by ``resp [b, t]``. With ``shared_prefix`` each
        unique prompt runs once and its rows' responses attend to it
        (:mod:`mmrl.video.shared_prefix`); otherwise every row runs its own copy of the prompt
        (the reference the shared forward equals)."""
        t = resp.shape[1]
        if self.shared_prefix and t > 0:
            return self._shared_hidden(model, cache, pidx, resp)
        hidden, head = self._hidden(model, cache, pidx, resp)
        P = cache.ids.shape[1]
        return hidden[:, P - 1:P - 1 + t], head

    def _shared_hidden(self, model, cache: PromptCache, pidx: torch.Tensor, resp: torch.Tensor):
        """The shared-prefix forward: one packed ``[prefix ; responses]`` sequence per unique
        prompt under an explicit attention mask, the same result as :meth:`_hidden`'s rows."""
        from .shared_prefix import grouped_layout, grouped_mask
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        ad, dev = self.adapter, self.device
        resp = resp.to(dev)
        (b, t), P = resp.shape, cache.ids.shape[1]
        lay = grouped_layout(pidx, P, t)
        U, L = len(lay.uniq), lay.L
        ids = cache.ids[lay.uniq].to(dev)  # [U, P]
        emb_p, state = ad.prompt_embeds(base, ids, [cache.vision[u] for u in lay.uniq.tolist()])
        H = emb_p.shape[-1]
        put = lay.put.flatten().to(dev)
        emb = torch.cat([emb_p, emb_p.new_zeros(U, L - P, H)], 1).reshape(U * L, H)
        emb = emb.index_copy(0, put, ad.embed_tokens(base)(resp[:, :t - 1]).reshape(-1, H))
        pos = torch.ones(ad.position_dims, U * L, dtype=torch.long)  # unused slots: 1
        pos.view(-1, U, L)[:, :, :P] = cache.pos[:, lay.uniq]
        rpos = cache.next_pos[pidx][:, None] + torch.arange(t - 1)  # [b, t - 1]
        pos[:, lay.put.flatten()] = rpos.flatten()
        mask = grouped_mask(lay, cache.attn[lay.uniq].to(dev))
        if getattr(self.cfg.get_text_config(), "_attn_implementation", None) == "eager":
            mask = torch.zeros(mask.shape, dtype=emb.dtype, device=dev).masked_fill(
                ~mask, torch.finfo(emb.dtype).min)
        kwargs = ad.lm_kwargs(state, ids, torch.arange(U, device=dev), L - P)
        out = ad.language_model(base)(
            inputs_embeds=emb.view(U, L, H), attention_mask=mask,
            position_ids=ad.lm_positions(pos.view(-1, U, L).to(dev)), use_cache=False, **kwargs)
        h = out.last_hidden_state.reshape(U * L, H)[lay.take.to(dev)]  # [b, t, H]
        return h, ad.lm_head(base)

    def _logprobs(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled log-softmax ``[..., V]`` (fp32), restricted to the allowed ids
        (the vision placeholder tokens excluded)."""
        logits = head(hidden).float() / self.temperature
        logits[..., self.banned] = float("-inf")
        if self.allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[..., self.allowed] = 0.0
            logits = logits + keep
        return torch.log_softmax(logits, -1)

    # ------------------------------------------------------------------ rollout
    def _sample(self, logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per row from ``logp [b, V]`` with top-p (nucleus) truncation -> ``[b]``."""
        probs = logp.exp().cpu()
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest head >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @torch.no_grad()
    def _generate(self, cache: PromptCache, pidx: torch.Tensor, generator: torch.Generator,
                  greedy: bool = False):
        """KV-cached sampling (``greedy``: the argmax token) -> ``(tokens [B, T], mask [B, T],
        logp [B, T])``.

        With ``shared_prefix`` the prefill runs once per unique prompt and its cache is then
        expanded to the rows by indexing (``DynamicCache.batch_select_indices``: one copy of the
        prompt's keys and values per row, which the cache's per-step ``torch.cat`` would make
        anyway); the decode steps are the same either way."""
        from transformers import DynamicCache
        base, ad = self.base, self.adapter
        lm, embed, head = ad.language_model(base), ad.embed_tokens(base), ad.lm_head(base)
        was_training = self.model.training
        self.model.eval()
        uniq, inv = torch.unique(pidx, return_inverse=True)
        first = uniq if self.shared_prefix else pidx  # the prompts the prefill runs
        emb, extra = self._prompt_embeds(base, cache, first, 0)  # [U or B, P, H]
        kv = DynamicCache(config=base.config.get_text_config())
        h = lm(inputs_embeds=emb, attention_mask=cache.attn[first].to(self.device),
               position_ids=ad.lm_positions(cache.pos[:, first].to(self.device)), cache=kv,
               use_cache=True, **extra).last_hidden_state[:, -1]
        if self.shared_prefix:
            kv.batch_select_indices(inv.to(self.device))
            h = h[inv.to(self.device)]  # [U, H] -> [B, H]
        attn = cache.attn[pidx].to(self.device)
        B, D = len(pidx), ad.position_dims
        tokens, logps = [], []
        done = torch.zeros(B, dtype=torch.bool)
        ends = torch.tensor(self.eos)
        texts = [""] * B
        for t in range(self.max_new_tokens):
            if t > 0:
                h = lm(inputs_embeds=emb, attention_mask=attn, position_ids=ad.lm_positions(pos),
                       cache=kv, use_cache=True).last_hidden_state[:, -1]
            lp = self._logprobs(head, h)  # [B, V]
            nxt = lp.argmax(-1).cpu() if greedy else self._sample(lp, generator)  # [B]
            tokens.append(nxt)
            logps.append(lp.gather(-1, nxt[:, None].to(lp.device))[:, 0].cpu())
            stopped = torch.isin(nxt, ends)
            if self.stop:
                for i in (~done & ~stopped).nonzero().flatten().tolist():
                    texts[i] += self.tok.decode([int(nxt[i])])
                    stopped[i] = any(texts[i].endswith(s) for s in self.stop)
            done |= stopped
            if bool(done.all()):
                break
            emb = embed(nxt[:, None].to(self.device))
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=self.device)], 1)
            pos = (cache.next_pos[pidx] + t).view(1, B, 1).expand(D, B, 1).to(self.device)
        self.model.train(was_training)
        tokens, logps = torch.stack(tokens, 1), torch.stack(logps, 1)  # [B, T]
        ended = torch.isin(tokens, ends).cumsum(1)
        # up to and including the first end token (stop strings end after their last token)
        mask = (ended == 0) | ((ended == 1) & torch.isin(tokens, ends))
        if self.stop:
            mask = _cut_at_stop_strings(self.tok, tokens, mask, self.stop)
        return tokens, mask, logps

    def rollout(self, prompts, metadata, group_size, generator) -> Rollout:
        """``group_size`` completions per prompt (an int, or one count per prompt)."""
        return self._rollout(prompts, metadata, group_size, generator, greedy=False)

    def greedy_rollout(self, prompts, metadata, generator) -> Rollout:
        """One greedy completion per prompt: the argmax of the same temperature-scaled,
        restricted distribution the sampler draws from (ReMax's baseline; top-p cannot change
        an argmax). A prompt whose input is unreadable has no row."""
        return self._rollout(prompts, metadata, 1, generator, greedy=True)

    def _rollout(self, prompts, metadata, group_size, generator, greedy: bool) -> Rollout:
        counts = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
        if len(counts) != len(prompts):
            raise ValueError(f"group_size has {len(counts)} counts for {len(prompts)} prompts; "
                             f"pass an int or one count per prompt")
        convs = []
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict) or "messages" not in meta:
                raise ValueError(f"metadata[{i}] has no 'messages'; expected the prompt's "
                                 f"conversation (mmrl.video.data.build_messages(record))")
            convs.append(meta["messages"])
        cache, kept, skipped = self._encode_counted(convs)
        n = torch.tensor([counts[i] for i in kept], dtype=torch.long)
        pidx = torch.arange(len(kept)).repeat_interleave(n)  # [B] row -> cached prompt
        groups = torch.tensor(kept, dtype=torch.long).repeat_interleave(n)  # local prompt index
        if len(pidx) == 0:
            return Rollout([], [], [], groups, torch.zeros(0, 1, dtype=torch.bool),
                           {"prompt_index": pidx, "response": torch.zeros(0, 1, dtype=torch.long),
                            "prompt_cache": cache}, skipped=skipped,
                           rollout_logp=torch.zeros(0, 1))
        tokens, mask, logps = self._generate(cache, pidx, generator, greedy)
        samples = [self.tok.decode(r[m].tolist(), skip_special_tokens=True)
                   for r, m in zip(tokens, mask)]
        lengths = mask.sum(1).tolist()
        rows = groups.tolist()
        meta = [{**{k: v for k, v in metadata[g].items() if k != "messages"},
                 "completion_length": int(L)} for g, L in zip(rows, lengths)]
        return Rollout(samples, [prompts[g] for g in rows], meta, groups, mask,
                       {"prompt_index": pidx, "response": tokens, "prompt_cache": cache},
                       skipped=skipped, rollout_logp=torch.where(mask, logps, 0.0))

    def retarget(self, rollout: Rollout, prompts, metadata) -> Rollout:
        """The same responses under other prompts (``metadata[i]["messages"]``, one per row;
        rows of one group share their first row's): the prompt cache is rebuilt, the responses,
        masks and the sampler's ``rollout_logp`` are kept (Guide / ExPO, mmrl.train.guidance).

        Raises:
            ValueError: a count that is not one per row, or a prompt whose media is unreadable.
        """
        if len(prompts) != len(rollout) or len(metadata) != len(rollout):
            raise ValueError(f"retarget: {len(prompts)} prompts / {len(metadata)} metadata for "
                             f"{len(rollout)} rows; give one per row")
        first: Dict[int, int] = {}
        for i, g in enumerate(rollout.group_ids.tolist()):
            first.setdefault(g, i)
        rows = list(first.values())  # one prompt per group
        cache, kept, _ = self._encode_counted([metadata[i]["messages"] for i in rows])
        if len(kept) != len(rows):
            raise ValueError("retarget: a prompt's media could not be read; the rows cannot be "
                             "scored under it")
        slot = {g: u for u, g in enumerate(first)}
        pidx = torch.tensor([slot[g] for g in rollout.group_ids.tolist()], dtype=torch.long)
        meta = [{**{k: v for k, v in m.items() if k != "messages"},
                 "completion_length": old.get("completion_length")}
                for m, old in zip(metadata, rollout.metadata)]
        return dataclasses.replace(rollout, prompts=list(prompts), metadata=meta,
                                   data={**rollout.data, "prompt_cache": cache,
                                         "prompt_index": pidx})

    # ------------------------------------------------------------------ scoring
    def _logp(self, model, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        cache: PromptCache = rollout.data["prompt_cache"]
        pidx = rollout.data["prompt_index"][rows]
        resp = rollout.data["response"][rows, :t1]
        hidden, head = self._response_hidden(model, cache, pidx, resp)
        lp = self._logprobs(head, hidden[:, t0:t1])  # [b, t, V]
        return lp.gather(-1, resp[:, t0:t1, None].to(lp.device))[..., 0]

    def logp(self, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        """``[len(rows), t1 - t0]`` log-probs of the sampled tokens, with gradient."""
        if self._fsdp is not None:
            return root_forward(self._fsdp, lambda: self._logp(self.model, rollout, rows, t0, t1))
        return self._logp(self.model, rollout, rows, t0, t1)

    def logp_and_entropy(self, rollout: Rollout, rows, t0: int, t1: int) -> tuple:
        """``(logp, entropy)``, each ``[len(rows), t1 - t0]`` with gradient: the sampled tokens'
        log-probs and the entropy of the distribution they were sampled from (temperature,
        allowed answers; no top-p), from one forward. The lm head and softmax run ``tw_chunk``
        positions at a time and (without FSDP) are recomputed in the backward pass, so
        ``[b, t, V]`` is never held (:func:`mmrl.algo.entropy.logp_and_entropy`)."""
        from mmrl.algo.entropy import logp_and_entropy
        cache: PromptCache = rollout.data["prompt_cache"]
        resp = rollout.data["response"][rows, :t1]

        def run():
            hidden, head = self._response_hidden(self.model, cache,
                                                 rollout.data["prompt_index"][rows], resp)
            h = hidden[:, t0:t1]  # [b, t, H]
            # log-probs as logits: log_softmax(log_softmax(z)) = log_softmax(z)
            return logp_and_entropy(lambda a, b: self._logprobs(head, h[:, a:b]),
                                    resp[:, t0:t1].to(h.device), chunk_size=self.tw_chunk,
                                    recompute=self._fsdp is None)
        return run() if self._fsdp is None else root_forward(self._fsdp, run)

    def ref_logp(self, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        """The same under the reference: LoRA disabled, or the frozen copy."""
        return self._under_reference(lambda m: self._logp(m, rollout, rows, t0, t1))

    def _under_reference(self, fn):
        """``fn(model)`` without gradient on the reference: the LoRA model with its adapter
        disabled, or the frozen copy (full fine-tuning)."""
        if self.is_peft:
            with torch.no_grad(), self.model.disable_adapter():
                return fn(self.model)
        if self.ref is None:
            raise ValueError("the reference policy (algo.beta > 0, or a preference loss with a "
                             "reference) with full fine-tuning needs a frozen copy, and none was "
                             "made; call policy.enable_reference() first (the video job does "
                             "when its algorithm needs one)")
        with torch.no_grad():
            return fn(self.ref)

    # ------------------------------------------------------------------ preference pairs
    def pair_rollout(self, records) -> tuple:
        """``(Rollout, chosen_rows [P], rejected_rows [P])`` of preference pair records
        (:class:`mmrl.video.pairs.PairRecord` s, or raw JSON objects: the job's record fields
        plus ``"chosen"`` and ``"rejected"``), ready for :meth:`pair_scores`.

        A pair's prompt is built as the job builds it (``template``, ``system_prompt``) and
        encoded once for its two rows; its completions are tokenized (with the adapter's
        end-of-turn token, :func:`mmrl.video.pairs.completion_tokens`) as ``response`` rows
        ``2k`` (chosen) and ``2k + 1`` (rejected), masked up to and including the end token;
        ``group_ids`` are the records' indices. A record whose video / image cannot be read
        has no rows and is counted in ``Rollout.skipped`` (and ``skips``).

        Raises:
            PairRecordError: (a ``ValueError``) every malformed record and every completion
                the policy cannot emit (vision placeholders, tokens outside
                ``allowed_answers``), at once.
        """
        from .pairs import as_pair_records, completion_tokens
        pairs = as_pair_records(records)
        ids = completion_tokens(pairs, *self._token_rules())  # checked before any decoding
        ro = self._completion_rollout([p.record for p in pairs],
                                      [[p.chosen, p.rejected] for p in pairs],
                                      [list(i) for i in ids], ("chosen", "rejected"))
        K = len(ro) // 2
        return ro, 2 * torch.arange(K), 2 * torch.arange(K) + 1

    def target_rollout(self, examples) -> Rollout:
        """SFT rows (``Capabilities(sft=True)``, :mod:`mmrl.train.sft_stage`): one row per
        :class:`mmrl.video.sft.SFTExample` (a record and its target completion), its prompt
        built as the job builds it (once for consecutive examples of the same record) and its
        target tokenized as a pair's completion (the family's end-of-turn token appended);
        ``group_ids`` number the records, a record whose video / image cannot be read has no
        row (``Rollout.skipped``).

        Raises:
            PairRecordError: (a ``ValueError``) every target the policy cannot emit, at once.
        """
        from .pairs import text_tokens
        ids = text_tokens([(e.record.source, "target", e.target) for e in examples],
                          *self._token_rules(), where="SFT targets")
        records, texts, tokens = [], [], []  # consecutive examples of one record: one prompt
        for e, i in zip(examples, ids):
            if not records or records[-1] is not e.record:
                records.append(e.record)
                texts.append([])
                tokens.append([])
            texts[-1].append(e.target)
            tokens[-1].append(i)
        return self._completion_rollout(records, texts, tokens, ())

    def _token_rules(self) -> tuple:
        """``(tokenizer, end_id, end_ids, never, allowed)``: the arguments of
        :func:`mmrl.video.pairs.text_tokens` after the completions."""
        allowed = None if self.allowed is None else self.allowed.tolist()
        return (self.tok, self.adapter.turn_end_id(self.tok), self.eos, self.banned.tolist(),
                allowed)

    def _completion_rollout(self, records, texts, ids, roles) -> Rollout:
        """A teacher-forced rollout: for each record kept (its media readable), one row per
        completion ``ids[i][k]`` (text ``texts[i][k]``, metadata ``pair_role = roles[k]``, else
        ``"target"``), all behind the record's prompt encoded once; group ids = the records'
        positions."""
        from .data import build_messages, format_question
        cache, kept, skipped = self._encode_counted(
            [build_messages(r, self.template, system_prompt=self.system_prompt)
             for r in records])
        seqs = [s for i in kept for s in ids[i]]
        T = max((len(s) for s in seqs), default=1)
        resp = torch.full((len(seqs), T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for r, s in enumerate(seqs):
            resp[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), True
        meta = [{**records[i].metadata(), "completion_length": len(ids[i][k]),
                 "pair_role": roles[k] if roles else "target"}
                for i in kept for k in range(len(ids[i]))]
        samples = [text for i in kept for text in texts[i]]
        prompts = [format_question(records[i], self.template) for i in kept for _ in ids[i]]
        n = torch.tensor([len(ids[i]) for i in kept], dtype=torch.long)
        return Rollout(samples, prompts, meta,
                       torch.tensor(kept, dtype=torch.long).repeat_interleave(n), mask,
                       {"prompt_index": torch.arange(len(kept)).repeat_interleave(n),
                        "response": resp, "prompt_cache": cache}, skipped=skipped)

    def pair_scores(self, rollout: Rollout, chosen_rows, rejected_rows, generator=None,
                    with_ref: bool = False) -> PrefScores:
        """The completion tokens' log-probs of P pairs: ``[P, T]`` each, with gradient, under
        the distribution :meth:`logp` scores (temperature, ``allowed_answers``; vision once per
        prompt); the reference's (:meth:`ref_logp`'s: LoRA disabled, or the frozen copy),
        detached, when ``with_ref``. ``T`` is the longest of these rows' masks. One forward
        for the 2P rows; the lm head and log-softmax run ``tw_chunk`` positions at a time and
        (without FSDP) are recomputed in the backward pass, so ``[2P, T, V]`` is never held.
        ``generator`` is unused (the scores are deterministic).

        Raises:
            ValueError: ``chosen_rows`` and ``rejected_rows`` of different lengths.
        """
        chosen_rows = torch.as_tensor(chosen_rows, dtype=torch.long).flatten()
        rejected_rows = torch.as_tensor(rejected_rows, dtype=torch.long).flatten()
        if len(chosen_rows) != len(rejected_rows):
            raise ValueError(f"{len(chosen_rows)} chosen rows and {len(rejected_rows)} rejected "
                             f"rows; expected one of each per pair (pair_rollout's output)")
        P = len(chosen_rows)
        rows = torch.cat([chosen_rows, rejected_rows])  # [2P]
        used = rollout.mask[rows].any(0).nonzero()
        T = int(used.max()) + 1 if len(used) else 0
        mask = rollout.mask[rows, :T]

        def run():
            return self._chunked_logp(self.model, rollout, rows, T)
        lp = run() if self._fsdp is None else root_forward(self._fsdp, run)  # [2P, T]
        ref = (self._under_reference(lambda m: self._chunked_logp(m, rollout, rows, T))
               if with_ref else None)
        return PrefScores(lp[:P], lp[P:], mask[:P], mask[P:],
                          None if ref is None else ref[:P], None if ref is None else ref[P:])

    def _chunked_logp(self, model, rollout: Rollout, rows, T: int) -> torch.Tensor:
        """``[len(rows), T]`` log-probs of the stored tokens: one forward, then the lm head
        and log-softmax ``tw_chunk`` positions at a time (checkpointed under gradient without
        FSDP: each ``[b, c, V]`` is recomputed in the backward pass instead of saved)."""
        from torch.utils.checkpoint import checkpoint
        cache: PromptCache = rollout.data["prompt_cache"]
        resp = rollout.data["response"][rows, :T]
        h, head = self._response_hidden(model, cache, rollout.data["prompt_index"][rows], resp)
        tok = resp.to(h.device)  # [b, T, H], [b, T]
        recompute = self._fsdp is None and torch.is_grad_enabled()
        parts = []
        for a in range(0, T, self.tw_chunk):
            b = min(T, a + self.tw_chunk)

            def chunk(a=a, b=b):
                return self._logprobs(head, h[:, a:b]).gather(-1, tok[:, a:b, None])[..., 0]
            parts.append(checkpoint(chunk, use_reentrant=False) if recompute else chunk())
        return torch.cat(parts, 1) if parts else h.new_zeros(len(rows), 0)

    def token_weights(self, rollout: Rollout) -> torch.Tensor:
        """TW-GRPO weights ``[B, T]``, one group at a time; the group's hidden states are
        computed once and the lm head + log-softmax run ``tw_chunk`` positions at a time, so
        ``[N, T, V]`` is never held."""
        with torch.no_grad(), gathered_parameters(self._fsdp):
            return self._token_weights(rollout)

    def _token_weights(self, rollout: Rollout) -> torch.Tensor:
        from mmrl.algo.token_weights import tw_token_weights
        cache: PromptCache = rollout.data["prompt_cache"]
        P = cache.ids.shape[1]
        out = torch.ones(rollout.mask.shape)
        for g in rollout.group_ids.unique():
            rows = (rollout.group_ids == g).nonzero().flatten()
            hidden, head = self._response_hidden(self.model, cache,
                                                 rollout.data["prompt_index"][rows],
                                                 rollout.data["response"][rows])
            cols = self.allowed
            if cols is None:  # every token but the (never sampled) vision placeholders
                keep = torch.ones(head.out_features, dtype=torch.bool, device=self.device)
                keep[self.banned] = False
                cols = keep.nonzero().flatten()

            def chunk(t0, t1, hidden=hidden, head=head, cols=cols):
                lp = self._logprobs(head, hidden[:, t0:t1])  # [N, c, V]
                return lp[..., cols]  # only the tokens that can occur

            out[rows] = tw_token_weights(chunk, rollout.mask[rows].to(self.device),
                                         alpha=self.tw_alpha, chunk_size=self.tw_chunk).cpu()
        return out

    def concat_rollouts(self, parts: Sequence[Rollout]) -> Rollout:
        """Dynamic sampling's tries as one rollout: prompt caches merged (left padding kept),
        responses right-padded."""
        if len(parts) == 1:
            return parts[0]
        caches = [p.data["prompt_cache"] for p in parts]
        P = max(c.ids.shape[1] for c in caches)
        T = max(p.mask.shape[1] for p in parts)
        lp = lambda x, v: F.pad(x, (P - x.shape[-1], 0), value=v)  # noqa: E731
        cache = PromptCache(torch.cat([lp(c.ids, self.tok.pad_token_id) for c in caches]),
                            torch.cat([lp(c.attn, 0) for c in caches]),
                            torch.cat([lp(c.pos, 1) for c in caches], 1),
                            torch.cat([c.next_pos for c in caches]),
                            [v for c in caches for v in c.vision])
        offsets = torch.tensor([0] + [len(c.next_pos) for c in caches]).cumsum(0)
        rp = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
        data = {"prompt_cache": cache,
                "prompt_index": torch.cat([p.data["prompt_index"] + o
                                           for p, o in zip(parts, offsets.tolist())]),
                "response": torch.cat([rp(p.data["response"], self.tok.pad_token_id)
                                       for p in parts])}
        return Rollout([s for p in parts for s in p.samples], [s for p in parts for s in p.prompts],
                       [m for p in parts for m in p.metadata],
                       torch.cat([p.group_ids for p in parts]),
                       torch.cat([rp(p.mask, False) for p in parts]), data,
                       skipped=dict(sum((Counter(p.skipped) for p in parts), Counter())),
                       rollout_logp=concat_rollout_logp(parts, T),
                       off_policy=concat_off_policy(parts))


def _cut_at_stop_strings(tok, tokens: torch.Tensor, mask: torch.Tensor, stop: Sequence[str]):
    """Mask after the token that completes the first stop string (inclusive)."""
    out = mask.clone()
    for i in range(tokens.shape[0]):
        text = ""
        for t in range(tokens.shape[1]):
            if not out[i, t]:
                break
            text += tok.decode([int(tokens[i, t])])
            if any(text.endswith(s) for s in stop):
                out[i, t + 1:] = False
                break
    return out


QwenVLPolicy = VLMPolicy  # the old name (a Qwen model gets the Qwen adapter from the registry)
