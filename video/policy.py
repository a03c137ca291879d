"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL as a :class:`mmrl.train.loop.GroupPolicy`: group rollouts,
per-token logp, reference, TW.

Vision is encoded once per prompt. A rollout tokenizes each prompt once (video through
:func:`~mmrl.video.qwen_inputs.build_qwen_video_inputs`, positions through
:func:`~mmrl.video.mrope.mrope_position_ids`, per architecture) and keeps ONE copy of its pixel
values; every forward (sampling, ``logp``, ``ref_logp``, TW weights) runs the vision tower on the unique
prompts of its rows only and expands the merged visual embeddings to the rows by indexing. HF
``generate`` with ``num_return_sequences=G`` instead copies every prompt's pixel values G times
and re-encodes them per row, and its 3-D positions come from transformers 5.24's
``get_rope_index``, wrong for text after a video of more than one temporal grid; so sampling is
a KV-cached loop here (temperature, top-p, ``max_new_tokens``, stop strings, an optional
``allowed_answers`` restriction) with the release's positions. Qwen3-VL's DeepStack features
(vision-tower blocks added to the first decoder layers' hidden states at the visual positions)
are expanded to the rows the same way and passed with the prompt's tokens only.

Log-probs are of the temperature-scaled distribution (restricted to ``allowed_answers`` when set),
the one tokens are sampled from before top-p truncation, as TRL and verl do.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from mmrl.train.distributed import gathered_parameters, root_forward
from mmrl.train.policy import Capabilities, GroupPolicy
from mmrl.train.rollout import Rollout

from .export import export_qwen_vl
from .io import SkipCounter, VideoError
from .mrope import check_model_type, mrope_position_ids
from .qwen_inputs import build_qwen_video_inputs

FINETUNE = ("lora", "full")


def load_qwen_vl(path: str, *, dtype: str = "float32", device: str = "cpu",
                 finetune: str = "lora", lora_rank: int = 16, lora_alpha: int = 32,
                 lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                 freeze_vision: bool = True, gradient_checkpointing: bool = False):
    """``(model, processor)`` from a hub id or a local folder (``from_pretrained``).

    ``finetune="lora"`` wraps the model in a peft LoRA on the language model's ``lora_targets``
    (the vision tower is never LoRA'd); ``"full"`` trains every weight. ``freeze_vision`` stops
    gradients into the vision tower and its merger.

    Raises:
        ValueError: unknown ``finetune``/``dtype``.
        NotImplementedError: a checkpoint whose ``model_type`` is not qwen2_vl, qwen2_5_vl or
            qwen3_vl (checked from its config, before the weights load).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    if finetune not in FINETUNE:
        raise ValueError(f"finetune={finetune!r}; expected one of {FINETUNE}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(dtypes)}")
    check_model_type(AutoConfig.from_pretrained(path).model_type)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtypes[dtype]).to(device)
    model.requires_grad_(True)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model
        targets = "|".join(lora_targets)
        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
            target_modules=rf".*language_model.*\.({targets})"))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if finetune == "lora":
            model.enable_input_require_grads()
    return model, processor


@dataclass
class PromptCache:
    """The rollout's prompts, once each (shared by their rows; never sliced per row).

    Attributes:
        ids, attn: ``[U, P]`` left-padded prompt ids and attention mask.
        pos: ``[3, U, P]`` mRoPE positions; next_pos: ``[U]`` the first response position.
        vision: per prompt, its processor tensors (``pixel_values_videos``, ``video_grid_thw``,
            ``pixel_values``, ``image_grid_thw``); one copy per prompt, whatever G is.
    """

    ids: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    next_pos: torch.Tensor
    vision: List[Dict[str, torch.Tensor]] = field(default_factory=list)


class QwenVLPolicy(GroupPolicy):
    """GroupPolicy over a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (plain or peft-wrapped).

    Prompts are strings (logged); ``metadata[i]["messages"]`` is the prompt's conversation in
    qwen-vl-utils format (as :func:`~mmrl.video.data.build_messages` makes it). Samples are the
    decoded completions; each row's metadata gains ``completion_length`` (tokens).
    A prompt whose video cannot be read is skipped (no rows) and counted in ``skips``.

    Raises:
        NotImplementedError: a model of another ``config.model_type``.
    """

    capabilities = Capabilities(token_weights=True, concat_rollouts=True, export=True,
                                fsdp=True)

    def __init__(self, model, processor, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, stop: Sequence[str] = (),
                 allowed_answers: Sequence[str] = (), video: Optional[Dict[str, Any]] = None,
                 tw_alpha: float = 1.7, tw_chunk: int = 64, device: str = "cpu"):
        if temperature <= 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}, max_new_tokens="
                             f"{max_new_tokens}; expected temperature > 0, 0 < top_p <= 1, "
                             f"max_new_tokens >= 1")
        self.model, self.processor, self.device = model, processor, torch.device(device)
        self.tok = processor.tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop = [s for s in stop if s]
        self.video = dict(video or {})
        self.tw_alpha, self.tw_chunk = tw_alpha, tw_chunk
        self.is_peft = hasattr(model, "disable_adapter")
        self.base = model.get_base_model() if self.is_peft else model
        self.cfg = self.base.config
        check_model_type(self.cfg.model_type)
        self.eos = sorted({i for i in (self.tok.convert_tokens_to_ids("<|im_end|>"),
                                       self.tok.convert_tokens_to_ids("<|endoftext|>"),
                                       self.tok.eos_token_id) if isinstance(i, int) and i >= 0})
        self.allowed = self._allowed_ids(allowed_answers)
        # vision placeholders are never sampled: one in a completion would shift the features
        self.banned = torch.tensor([i for i in (self.cfg.image_token_id, self.cfg.video_token_id,
                                                self.cfg.vision_start_token_id,
                                                self.cfg.vision_end_token_id) if i is not None],
                                   dtype=torch.long, device=self.device)
        self.ref = None
        self._fsdp = None  # the FSDP2 root once apply_fsdp ran
        self.skips = SkipCounter()
        # train mode for scoring (activation checkpointing only runs in it; Qwen has no dropout);
        # sampling switches to eval for its KV cache and back
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
        """The model in Hugging Face format (see :func:`mmrl.video.export.export_qwen_vl`)."""
        return export_qwen_vl(self, path, merge_lora=merge_lora, state_dict=state_dict)

    def apply_fsdp(self):
        """FSDP2 for full fine-tuning (``train.parallel=fsdp``): each decoder layer of the
        language model is a unit; the root (the model) holds the rest, the vision tower
        included, so ranks whose prompts mix images and videos differently still run the same
        collectives. ``logp`` runs as the root's forward (:func:`mmrl.train.distributed.root_forward`);
        rollouts and TW weights run with the weights gathered."""
        from torch.distributed.fsdp import fully_shard
        if self.is_peft:
            raise ValueError("train.parallel=fsdp shards full fine-tuning; video.finetune=lora: "
                             "use train.parallel=ddp (a LoRA adapter is small enough to "
                             "replicate)")
        for layer in self.base.model.language_model.layers:
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
        kinds = {item.get("type") for m in messages if isinstance(m.get("content"), list)
                 for item in m["content"] if isinstance(item, dict)}
        if "video" in kinds:
            batch = build_qwen_video_inputs([messages], self.processor, on_error="raise",
                                            **self.video)
            return dict(batch.inputs)
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        images = None
        if "image" in kinds:
            from PIL import Image
            src = next(item["image"] for m in messages if isinstance(m.get("content"), list)
                       for item in m["content"] if isinstance(item, dict) and
                       item.get("type") == "image")
            try:
                images = [src if isinstance(src, Image.Image) else Image.open(src).convert("RGB")]
            except (OSError, ValueError) as err:
                raise VideoError(str(src), "unreadable_image", str(err)) from None
        return dict(self.processor(text=[text], images=images, return_tensors="pt"))

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
        ids = torch.full((len(rows), P), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros(len(rows), P, dtype=torch.long)
        pos = torch.ones(3, len(rows), P, dtype=torch.long)
        next_pos, vision = torch.zeros(len(rows), dtype=torch.long), []
        for u, r in enumerate(rows):
            n = r["input_ids"].shape[1]
            ids[u, P - n:], attn[u, P - n:] = r["input_ids"][0], 1
            p, _ = mrope_position_ids(self.base.model, {k: v for k, v in r.items()
                                                        if k != "attention_mask"})
            pos[:, u, P - n:] = p[:, 0]
            next_pos[u] = int(p.max()) + 1
            vision.append({k: v for k, v in r.items() if k in (
                "pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw")})
        return PromptCache(ids, attn, pos, next_pos, vision), kept

    def _prompt_embeds(self, model, cache: PromptCache, uniq: torch.Tensor) -> tuple:
        """``([U', P, H] input embeddings, DeepStack)`` of prompts ``uniq``, vision encoded once
        each. DeepStack (Qwen3-VL) is one ``[U', P, H]`` tensor per injected decoder layer, the
        tower's features at the visual slots and zeros elsewhere; None for other models."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner = base.model
        ids = cache.ids[uniq].to(self.device)
        emb = inner.get_input_embeddings()(ids)
        deep = None
        for key, grid_key, token_id, fn in (
                ("pixel_values_videos", "video_grid_thw", self.cfg.video_token_id,
                 inner.get_video_features),
                ("pixel_values", "image_grid_thw", self.cfg.image_token_id,
                 inner.get_image_features)):
            parts = [cache.vision[u] for u in uniq.tolist() if key in cache.vision[u]]
            if not parts:
                continue
            pix = torch.cat([p[key] for p in parts]).to(self.device)
            grid = torch.cat([p[grid_key] for p in parts]).to(self.device)
            out = fn(pix, grid, return_dict=True)
            slots = (ids == token_id).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(slots, torch.cat(out.pooler_output).to(emb.dtype))
            stack = getattr(out, "deepstack_features", None)
            if stack:
                deep = deep or [torch.zeros_like(emb) for _ in stack]
                deep = [d.masked_scatter(slots, torch.cat(f).to(emb.dtype))
                        for d, f in zip(deep, stack)]
        return emb, deep

    def _deepstack_kwargs(self, cache: PromptCache, pidx: torch.Tensor, inv: torch.Tensor,
                          deep, extra: int) -> Dict[str, Any]:
        """Qwen3-VL language-model kwargs for rows ``pidx`` (``inv`` indexes the unique prompts'
        DeepStack): ``visual_pos_masks [b, P + extra]`` (response positions are never visual)
        and the features at those slots in row-major order; ``{}`` without DeepStack."""
        if deep is None:
            return {}
        vision_ids = torch.tensor([self.cfg.image_token_id, self.cfg.video_token_id])
        vis = torch.isin(cache.ids[pidx], vision_ids).to(self.device)  # [b, P]
        r, c = vis.nonzero(as_tuple=True)
        inv = inv.to(self.device)
        return {"visual_pos_masks": F.pad(vis, (0, extra), value=False),
                "deepstack_visual_embeds": [d[inv[r], c] for d in deep]}

    def _hidden(self, model, cache: PromptCache, pidx: torch.Tensor, resp: torch.Tensor):
        """Last hidden states ``[b, P + t, H]`` of prompts ``pidx`` followed by ``resp``."""
        uniq, inv = torch.unique(pidx, return_inverse=True)
        # [U', P, H] -> [b, P, H]: vision once per unique prompt, expanded by indexing
        emb_p, deep = self._prompt_embeds(model, cache, uniq)
        emb_p = emb_p[inv.to(self.device)]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        resp = resp.to(self.device)
        emb = torch.cat([emb_p, base.model.get_input_embeddings()(resp)], 1)
        t = resp.shape[1]
        attn = torch.cat([cache.attn[pidx], torch.ones(len(pidx), t, dtype=torch.long)], 1)
        rpos = cache.next_pos[pidx][:, None] + torch.arange(t)  # [b, t]
        pos = torch.cat([cache.pos[:, pidx], rpos.expand(3, -1, -1)], 2)
        out = base.model.language_model(inputs_embeds=emb, attention_mask=attn.to(self.device),
                                        position_ids=pos.to(self.device), use_cache=False,
                                        **self._deepstack_kwargs(cache, pidx, inv, deep, t))
        return out.last_hidden_state, base.lm_head

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
    def _generate(self, cache: PromptCache, pidx: torch.Tensor, generator: torch.Generator):
        """KV-cached sampling -> ``(tokens [B, T], mask [B, T], logp [B, T])``."""
        from transformers import DynamicCache
        base = self.base
        was_training = self.model.training
        self.model.eval()
        uniq, inv = torch.unique(pidx, return_inverse=True)
        emb, deep = self._prompt_embeds(self.model, cache, uniq)
        emb = emb[inv.to(self.device)]  # [B, P, H]
        extra = self._deepstack_kwargs(cache, pidx, inv, deep, 0)  # prompt (prefill) step only
        attn = cache.attn[pidx].to(self.device)
        pos = cache.pos[:, pidx].to(self.device)
        kv = DynamicCache(config=base.config.get_text_config())
        B = len(pidx)
        tokens, logps = [], []
        done = torch.zeros(B, dtype=torch.bool)
        ends = torch.tensor(self.eos)
        texts = [""] * B
        for t in range(self.max_new_tokens):
            h = base.model.language_model(inputs_embeds=emb, attention_mask=attn,
                                          position_ids=pos, cache=kv, use_cache=True,
                                          **(extra if t == 0 else {})).last_hidden_state[:, -1]
            lp = self._logprobs(base.lm_head, h)  # [B, V]
            nxt = self._sample(lp, generator)  # [B]
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
            emb = base.model.get_input_embeddings()(nxt[:, None].to(self.device))
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=self.device)], 1)
            pos = (cache.next_pos[pidx] + t).view(1, B, 1).expand(3, B, 1).to(self.device)
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
        before = dict(self.skips.by_reason)
        cache, kept = self.encode_prompts(convs)
        skipped = {k: v - before.get(k, 0) for k, v in self.skips.by_reason.items()
                   if v > before.get(k, 0)}  # this call's skips, by reason
        n = torch.tensor([counts[i] for i in kept], dtype=torch.long)
        pidx = torch.arange(len(kept)).repeat_interleave(n)  # [B] row -> cached prompt
        groups = torch.tensor(kept, dtype=torch.long).repeat_interleave(n)  # local prompt index
        if len(pidx) == 0:
            return Rollout([], [], [], groups, torch.zeros(0, 1, dtype=torch.bool),
                           {"prompt_index": pidx, "response": torch.zeros(0, 1, dtype=torch.long),
                            "sample_logp": torch.zeros(0, 1), "prompt_cache": cache},
                           skipped=skipped)
        tokens, mask, logps = self._generate(cache, pidx, generator)
        samples = [self.tok.decode(r[m].tolist(), skip_special_tokens=True)
                   for r, m in zip(tokens, mask)]
        lengths = mask.sum(1).tolist()
        rows = groups.tolist()
        meta = [{**{k: v for k, v in metadata[g].items() if k != "messages"},
                 "completion_length": int(L)} for g, L in zip(rows, lengths)]
        return Rollout(samples, [prompts[g] for g in rows], meta, groups, mask,
                       {"prompt_index": pidx, "response": tokens, "sample_logp": logps,
                        "prompt_cache": cache}, skipped=skipped)

    # ------------------------------------------------------------------ scoring
    def _logp(self, model, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        cache: PromptCache = rollout.data["prompt_cache"]
        pidx = rollout.data["prompt_index"][rows]
        resp = rollout.data["response"][rows, :t1]
        hidden, head = self._hidden(model, cache, pidx, resp)
        P = cache.ids.shape[1]
        lp = self._logprobs(head, hidden[:, P - 1 + t0:P - 1 + t1])  # [b, t, V]
        return lp.gather(-1, resp[:, t0:t1, None].to(lp.device))[..., 0]

    def logp(self, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        """``[len(rows), t1 - t0]`` log-probs of the sampled tokens, with gradient."""
        if self._fsdp is not None:
            return root_forward(self._fsdp, lambda: self._logp(self.model, rollout, rows, t0, t1))
        return self._logp(self.model, rollout, rows, t0, t1)

    def ref_logp(self, rollout: Rollout, rows, t0: int, t1: int) -> torch.Tensor:
        """The same under the reference: LoRA disabled, or the frozen copy."""
        if self.is_peft:
            with torch.no_grad(), self.model.disable_adapter():
                return self._logp(self.model, rollout, rows, t0, t1)
        if self.ref is None:
            raise ValueError("beta > 0 with full fine-tuning needs a reference copy; call "
                             "policy.enable_reference() first (the video job does)")
        with torch.no_grad():
            return self._logp(self.ref, rollout, rows, t0, t1)

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
            hidden, head = self._hidden(self.model, cache, rollout.data["prompt_index"][rows],
                                        rollout.data["response"][rows])
            cols = self.allowed
            if cols is None:  # every token but the (never sampled) vision placeholders
                keep = torch.ones(head.out_features, dtype=torch.bool, device=self.device)
                keep[self.banned] = False
                cols = keep.nonzero().flatten()

            def chunk(t0, t1, hidden=hidden, head=head, cols=cols):
                lp = self._logprobs(head, hidden[:, P - 1 + t0:P - 1 + t1])  # [N, c, V]
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
                                       for p in parts]),
                "sample_logp": torch.cat([rp(p.data["sample_logp"], 0.0) for p in parts])}
        return Rollout([s for p in parts for s in p.samples], [s for p in parts for s in p.prompts],
                       [m for p in parts for m in p.metadata],
                       torch.cat([p.group_ids for p in parts]),
                       torch.cat([rp(p.mask, False) for p in parts]), data,
                       skipped=dict(sum((Counter(p.skipped) for p in parts), Counter())))


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


