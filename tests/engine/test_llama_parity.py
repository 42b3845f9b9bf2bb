"""dashchat's GGUF path against llama.cpp's llama-server, from a recorded run: CI cannot build
llama.cpp in time, so bench/llama_parity.py ran llama-server once on each family's tiny GGUF and
wrote its greedy tokens and top-5 log-probs to tests/data/llama_parity.json. Here each file is
rebuilt the same way (same seed, same converter; its sha256 must match the recorded one, so a
changed recipe fails as such and not as a parity failure) and dashchat decodes it greedily."""

from __future__ import annotations

import hashlib
import json

import pytest

from llama_cpp import PARITY_FILES, PARITY_FIXTURE, build_parity_ggufs, dashchat_greedy, recipe_versions

pytest.importorskip("transformers")

FIXTURE = json.loads(PARITY_FIXTURE.read_text())

# Twice the largest top-5 log-prob difference measured against llama-server (0.0045, Qwen3-MoE at
# Q8_0: both sides quantize activations to int8 and sum in their own order). Gemma 3 measured 0.026:
# llama-server's f16 KV cache and fp16 GeGLU table (0.012 with a float32 cache), which this random
# Gemma's large norm weights amplify (bench/README.md).
TOLERANCE = {"gemma3": 0.05}
DEFAULT_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_parity_ggufs(tmp_path_factory.mktemp("parity"), list(FIXTURE["files"]))


def test_fixture_covers_the_recipe():
    assert set(FIXTURE["files"]) == set(PARITY_FILES)
    assert all(entry["outtype"] == PARITY_FILES[f] for f, entry in FIXTURE["files"].items())


@pytest.mark.parametrize("family", list(FIXTURE["files"]))
def test_greedy_tokens_and_top_logprobs_match_llama_server(family, files, tmp_path):
    ref = FIXTURE["files"][family]
    digest = hashlib.sha256(files[family].read_bytes()).hexdigest()
    assert digest == ref["sha256"], (f"{family}: the rebuilt GGUF differs from the one llama-server ran on "
                                     f"(recorded with {FIXTURE['versions']}, now {recipe_versions()}; or the "
                                     "recipe changed): rerun bench/llama_parity.py --write-fixture")
    tolerance = TOLERANCE.get(family, DEFAULT_TOLERANCE)
    # fed llama-server's tokens: one forward; the steps up to the first difference are free decoding's
    ours, our_top = dashchat_greedy(files[family], FIXTURE["prompt"], FIXTURE["tokens"], tmp_path, FIXTURE["top"],
                                    follow=ref["tokens"])  # fmt: skip
    for step, (mine, theirs, ref_top) in enumerate(zip(ours, ref["tokens"], ref["top_logprobs"])):
        # the inputs up to here are the same: the log-probs of the tokens both top lists hold agree
        mine_d, ref_d = dict(our_top[step]), dict(ref_top)
        shared = [t for t in ref_d if t in mine_d]
        assert ref_top[0][0] in shared, (family, step, our_top[step], ref_top)
        worst = max(abs(mine_d[t] - ref_d[t]) for t in shared)
        assert worst <= tolerance, (family, step, worst, our_top[step], ref_top)
        if mine != theirs:  # allowed only at a near-tie, after which the two sequences part
            assert ref_top[0][1] - ref_d.get(mine, float("-inf")) <= tolerance, (family, step, mine, theirs, ref_top)
            break
