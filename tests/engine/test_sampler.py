"""The sampler's masks on one mixed batch: ignore_eos, min_tokens (eos and stop ids) and plain rows."""

from __future__ import annotations

import torch

from dashchat.engine.native.sampler import Sampler
from dashchat.engine.native.sequence import Sequence
from dashchat.engine.types import SamplingParams


def _seq(params: SamplingParams, generated: int) -> Sequence:
    prompt = [1, 2, 3]
    return Sequence(request_id="r", index=0, token_ids=prompt + [4] * generated, num_prompt_tokens=len(prompt),
                    params=params, arrival=0.0)


def test_eos_and_stop_bans_apply_to_their_rows_only():
    eos, stop = 7, 5
    seqs = [
        _seq(SamplingParams(max_tokens=8, temperature=0.0), 0),  # plain: eos may win
        _seq(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, stop_token_ids=[stop]), 1),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, min_tokens=2, stop_token_ids=[stop]), 2),  # reached
    ]
    logits = torch.zeros(len(seqs), 10)
    logits[:, eos] = 5.0  # eos is everyone's best token
    logits[:, stop] = 4.0  # then the stop id
    logits[:, 9] = 3.0
    tokens = [r.token_id for r in Sampler({eos}).sample(seqs, logits)]
    assert tokens == [eos, stop, 9, eos]


def test_sample_never_edits_the_callers_logits():
    """The engine re-samples row by row from the same logits when one request's processor raises:
    bias, penalties and bans already written into them would then count twice."""
    seqs = [
        _seq(SamplingParams(max_tokens=8, temperature=0.0, logit_bias={2: 5.0}, repetition_penalty=1.5), 1),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5), 2),
        _seq(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0),
    ]
    logits = torch.randn(len(seqs), 10, generator=torch.Generator().manual_seed(0))
    pristine = logits.clone()
    first = Sampler({7}).sample(seqs, logits)
    assert torch.equal(logits, pristine)
    again = [Sampler({7}).sample([s], logits[i : i + 1])[0] for i, s in enumerate(seqs)]
    assert [r.token_id for r in again] == [r.token_id for r in first]
