"""Shared-prefix forward (Prefix Grouper, arXiv 2506.05433): one language-model pass per unique
prompt, its rows' responses packed after it.

A GRPO group's G rows repeat one prompt of ``P`` tokens and differ in their ``t`` response tokens.
The repeated-prefix forward runs ``G x (P + t)`` tokens through every layer; the grouped forward
runs each unique prompt once with its rows' responses packed behind it,
``[prefix ; r_1 ; ... ; r_g]``, ``P + g t`` tokens, under an explicit attention mask:

- a prefix query sees the valid (non-padding) prefix keys up to itself (causal);
- a query of response block ``k`` sees every valid prefix key and the keys of block ``k`` up to
  itself (causal), never another block;
- a padding query (the prompt's left padding, or an unused block of a prompt with fewer rows)
  sees itself only, so no row of the softmax is empty; nothing reads its output.

Every token keeps the position it has in the repeated forward (response token ``k`` of every row
at ``next_pos + k``), and embeddings, norms, MLPs and projections are per token, so each response
token's hidden state equals the repeated forward's. The hidden state of the prompt's last token
(which predicts every row's first response token) is gathered once per row; the backward of that
gather, and of the shared prefix keys and values, sums the rows' gradients into the one prefix,
which is exactly the sum the repeated forward accumulates over its G copies (the report's Lemma
2.1). Tests: values and gradients equal the repeated forward in float64
(tests/video/models/vlm_conformance.py, for every family).

Only ``t - 1`` response tokens per row enter the packed sequence: the last one's hidden state
predicts nothing that is scored. Shapes: ``U`` unique prompts, ``b`` rows, ``P`` the left-padded
prompt length, ``t`` response tokens, ``g`` the most rows of one prompt, ``L = P + g (t - 1)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["GroupedLayout", "grouped_layout", "grouped_mask"]


class GroupedLayout(NamedTuple):
    """Where each row's tokens sit in the packed ``[U, L]`` batch.

    Attributes:
        uniq: ``[U]`` the unique prompt indices (sorted); ``inv``: ``[b]`` row -> its prompt in
            ``uniq``; ``slot``: ``[b]`` the row's block among its prompt's rows (row order).
        L: the packed length ``P + g (t - 1)``.
        put: ``[b, t - 1]`` flat indices (into ``U * L``) of each row's response tokens
            ``0 .. t-2``.
        take: ``[b, t]`` flat indices of the hidden states that predict each row's tokens
            ``0 .. t-1``: the prompt's last position, then ``put``.
        block: ``[U, L]`` ``-1`` on the prefix, ``k`` on block ``k``, ``-2`` on unused blocks.
    """

    uniq: torch.Tensor
    inv: torch.Tensor
    slot: torch.Tensor
    L: int
    put: torch.Tensor
    take: torch.Tensor
    block: torch.Tensor


def grouped_layout(pidx: torch.Tensor, P: int, t: int) -> GroupedLayout:
    """The packed layout of rows ``pidx [b]`` (prompt index per row), ``P`` prompt tokens and
    ``t >= 1`` response tokens per row."""
    if t < 1:
        raise ValueError(f"t={t}: a shared-prefix forward scores at least one response token")
    pidx = pidx.cpu()
    uniq, inv = torch.unique(pidx, return_inverse=True)
    U, b, n = len(uniq), len(pidx), t - 1
    onehot = torch.nn.functional.one_hot(inv, U)  # [b, U]
    slot = ((onehot.cumsum(0) - 1) * onehot).sum(1)  # rank among the rows of the same prompt
    g = int(onehot.sum(0).max()) if b else 0
    L = P + g * n
    start = inv * L + P + slot * n  # [b]
    put = start[:, None] + torch.arange(n)  # [b, n]
    take = torch.cat([(inv * L + P - 1)[:, None], put], 1)  # [b, t]
    block = torch.full((U, L), -2, dtype=torch.long)
    block[:, :P] = -1
    block.view(-1)[put.flatten()] = slot.repeat_interleave(n)
    return GroupedLayout(uniq, inv, slot, L, put, take, block)


def grouped_mask(layout: GroupedLayout, prefix_attn: torch.Tensor) -> torch.Tensor:
    """``[U, 1, L, L]`` boolean attention mask (True = attend) of the packed batch, from the
    prompts' ``[U, P]`` attention mask (0 on left padding); see the module docstring."""
    U, L = layout.block.shape
    P = prefix_attn.shape[1]
    block = layout.block.to(prefix_attn.device)
    valid = block >= 0  # used response blocks
    valid[:, :P] = prefix_attn.bool()
    causal = torch.ones(L, L, dtype=torch.bool, device=block.device).tril()
    same = (block[:, :, None] == block[:, None, :]) | (block[:, None, :] == -1)  # [U, Lq, Lk]
    allowed = causal & same & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(L, dtype=torch.bool, device=block.device)  # padding sees itself
    return allowed[:, None]
