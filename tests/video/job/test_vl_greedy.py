"""QwenVLPolicy.greedy_rollout (ReMax's baseline): one completion per prompt, each token the
argmax of the distribution the policy scores with, drawing nothing from the generator."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vt_helpers import make_policy  # noqa: E402


def test_greedy_rollout_takes_the_argmax_token_of_every_step(tiny_vl_dir, vt_batch):
    prompts, meta = vt_batch
    pol = make_policy(tiny_vl_dir, max_new_tokens=5, temperature=0.7, top_p=0.5)
    assert pol.capabilities.greedy
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with torch.no_grad():
        ro = pol.greedy_rollout(prompts, meta, gen)
    assert torch.equal(gen.get_state(), state)  # nothing drawn
    assert ro.group_ids.tolist() == [0, 1] and len(ro.samples) == 2
    cache, resp = ro.data["prompt_cache"], ro.data["response"]
    T, P = resp.shape[1], cache.ids.shape[1]
    with torch.no_grad():
        hidden, head = pol._hidden(pol.model, cache, ro.data["prompt_index"], resp)
        full = pol._logprobs(head, hidden[:, P - 1:P - 1 + T])  # [2, T, V]
    assert torch.equal(full.argmax(-1)[ro.mask], resp[ro.mask])
    torch.testing.assert_close(full.max(-1).values[ro.mask], ro.rollout_logp[ro.mask],
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        again = pol.greedy_rollout(prompts, meta, torch.Generator().manual_seed(4))
    assert again.samples == ro.samples
