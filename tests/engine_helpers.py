"""Helpers shared by the tests of every engine (native, DashInfer)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import torch

from dashchat.engine.types import CompletionDelta, SamplingParams

_ids = itertools.count()


async def collect(
    engine: Any, prompt: list[int], params: SamplingParams, request_id: str | None = None, delay: float = 0.0
) -> dict[int, CompletionDelta]:
    """Run one request to the end; per choice index the joined delta (tokens, logprobs, finish)."""
    await asyncio.sleep(delay)
    out: dict[int, CompletionDelta] = {}
    async for o in engine.generate(prompt, params, request_id or f"test-{next(_ids)}"):
        for d in o.deltas:
            acc = out.setdefault(d.index, CompletionDelta(d.index, [], [] if d.logprobs is not None else None))
            acc.token_ids += d.token_ids
            if d.logprobs is not None:
                acc.logprobs += d.logprobs
            acc.finish_reason = d.finish_reason or acc.finish_reason
    return out


def transformers_greedy(model_dir: str, tokenizer: Any, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens for each prompt; min_new_tokens bans eos as ignore_eos does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return greedy_tokens(model, [tokenizer.encode(p) for p in prompts], [new_tokens] * len(prompts))


def greedy_tokens(model: Any, prompts: list[list[int]], new_tokens: list[int]) -> list[list[int]]:
    """A loaded transformers model's greedy continuation of each token-id prompt, exactly
    new_tokens[i] long (min_new_tokens bans eos as ignore_eos does), on the model's device."""
    device = next(model.parameters()).device
    refs = []
    for ids, n in zip(prompts, new_tokens):
        x = torch.tensor([ids], device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        refs.append(out[0, len(ids):].tolist())
    return refs
