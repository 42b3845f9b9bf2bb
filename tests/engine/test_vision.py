"""Qwen2-VL and Qwen2.5-VL in the engine against transformers (float32), on tiny random checkpoints:
images spliced into the prompt, M-RoPE positions for the image and the text after it, chunked
prefill that splits an image's span, the prefix cache keyed by the image's content, preemption."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import ImageInput, SamplingParams, UnsupportedFeature
from dashchat.models.config import ModelConfig
from dashchat.models.image_processing import ImageProcessorConfig, open_image, preprocess
from dashchat.models.qwen2_vl import image_problem
from engine_helpers import collect
from tiny_qwen2_vl import FAMILIES, build_prompt, png, reference_logprobs, save_tiny_vl

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vl(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny_vl(request.param, path)
    # a step budget of 20 tokens: prompts and images are prefilled in several chunks
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(path), max_model_len=512, block_size=16,
                                                 max_num_seqs=4, max_num_batched_tokens=20))
    yield ref, engine
    engine.shutdown()


def check_against_transformers(ref, engine, parts, new_tokens: int = 4, salt: str | None = None) -> int:
    """Greedy tokens and top-5 log-probs of every step equal transformers' on prompt + output;
    returns the prompt tokens the engine found in its prefix cache."""
    prompt, images = build_prompt(engine, parts)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=5, images=images,
                            cache_salt=salt)
    cached = {}

    async def run():
        out = {}
        async for o in engine.generate(prompt, params, f"vl-{id(params)}"):
            cached["n"] = o.num_cached_tokens
            for d in o.deltas:
                acc = out.setdefault(d.index, [])
                acc += list(zip(d.token_ids, d.logprobs))
        return out[0]

    got = asyncio.run(run())
    tokens = [t for t, _ in got]
    expected = reference_logprobs(ref, prompt + tokens, images)
    for j, (token, lp) in enumerate(got):
        row = expected[len(prompt) - 1 + j]
        assert token == int(row.argmax()), f"step {j}"
        top = [t for t, _ in lp.top]
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), row[top], atol=2e-4, rtol=1e-4)
    return cached["n"]


def test_one_image(vl):
    ref, engine = vl
    check_against_transformers(ref, engine, ["Describe", png(84, 56, seed=1), " the picture in detail, please."])


def test_two_images_of_different_sizes(vl):
    """Text after each image continues from its largest position + 1; the spans cross chunks."""
    ref, engine = vl
    check_against_transformers(ref, engine, ["A:", png(112, 84, seed=2), "B:", png(56, 140, seed=3), " same?"])


def test_prefix_cache_keys_images_by_content(vl):
    """The same image again reuses its blocks (a follow-up turn); a different image of the same
    size (the same placeholder ids) shares only the text blocks before it."""
    ref, engine = vl
    intro = " ".join(map(str, range(12)))  # > 1 block of text before the image
    tail = " What is it?" * 6  # the image's span ends inside the cacheable blocks
    first = check_against_transformers(ref, engine, [intro, png(140, 112, seed=4), tail], salt="c")
    again = check_against_transformers(ref, engine, [intro, png(140, 112, seed=4), tail], salt="c")
    other = check_against_transformers(ref, engine, [intro, png(140, 112, seed=5), tail], salt="c")
    prompt, images = build_prompt(engine, [intro, png(140, 112, seed=4), tail])
    assert first == 0
    assert again >= images[0].offset + images[0].length  # the image's blocks came from the cache
    assert 16 <= other <= images[0].offset  # only the text blocks before the image


def test_text_only_and_mixed_batch(vl):
    """Text-only requests run beside image requests in the same steps."""
    ref, engine = vl

    async def run_all():
        texts = [build_prompt(engine, ["plain text only, no picture"])[0]]
        mixed = build_prompt(engine, ["look", png(56, 56, seed=6), "now"])
        params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                  SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, images=mixed[1])]
        return await asyncio.gather(collect(engine, texts[0], params[0]), collect(engine, mixed[0], params[1])), \
            [texts[0], mixed]

    (text_out, mixed_out), (text_prompt, (mixed_prompt, mixed_images)) = asyncio.run(run_all())
    for prompt, images, out in ((text_prompt, [], text_out), (mixed_prompt, mixed_images, mixed_out)):
        tokens = out[0].token_ids
        expected = reference_logprobs(ref, prompt + tokens, images)
        assert tokens == expected[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_images_refused_where_they_cannot_go(vl, smollm2_dir):
    _, engine = vl
    prompt, images = build_prompt(engine, ["see", png(56, 56, seed=7)])

    async def refused(ids, imgs):
        with pytest.raises(UnsupportedFeature) as err:
            await collect(engine, ids, SamplingParams(max_tokens=2, images=imgs))
        return str(err.value)

    # the placeholder run shortened: the image no longer fits its span
    img = images[0]
    short = ImageInput(img.pixel_values, img.grid, img.offset, img.length - 1, img.digest)
    assert "cannot fill" in asyncio.run(refused(prompt[:-3] + prompt[-2:], [short]))
    # placeholders where the prompt has text
    shifted = ImageInput(img.pixel_values, img.grid, img.offset - 1, img.length, img.digest)
    assert "placeholder" in asyncio.run(refused(prompt, [shifted]))
    # a text-only model's engine refuses any image (what the native engine checks at admission)
    assert "does not take images" in image_problem(ModelConfig.from_dir(smollm2_dir), prompt, images)


def test_preprocessing_matches_transformers_pil_processor():
    import io

    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (91, 57, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    for data in (png(300, 200, seed=8), buf.getvalue(), png(1000, 30, seed=9)):
        mine = preprocess(open_image(data, 10**8), ImageProcessorConfig(max_pixels=28 * 28 * 200))
        ref = Qwen2VLImageProcessorPil(max_pixels=28 * 28 * 200)(images=[Image.open(io.BytesIO(data))],
                                                                 return_tensors="np")
        assert list(mine.grid) == ref["image_grid_thw"][0].tolist()
        np.testing.assert_allclose(mine.pixel_values, ref["pixel_values"], atol=1e-6)


def test_preemption_recomputes_images(tmp_path):
    """A KV cache too small for four image requests at once: the newest are preempted and
    recomputed (the tower runs again for an image whose embeddings were dropped), with the
    same tokens as transformers."""
    ref = save_tiny_vl("qwen2.5-vl", tmp_path)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=192, block_size=16,
                                                 max_num_seqs=4, max_num_batched_tokens=64,
                                                 kv_cache_memory_gb=12 * 16 * 512 / 2**30))  # 12 blocks
    try:
        prompts = [build_prompt(engine, [" ".join(map(str, range(20 + 5 * i))), png(140, 112, seed=20 + i),
                                         " tell me more"]) for i in range(4)]

        async def run_all():
            return await asyncio.gather(*(collect(engine, ids, SamplingParams(
                max_tokens=16, temperature=0.0, ignore_eos=True, images=images)) for ids, images in prompts))

        outs = asyncio.run(run_all())
        assert engine.stats().num_preemptions > 0
        for (ids, images), out in zip(prompts, outs):
            tokens = out[0].token_ids
            expected = reference_logprobs(ref, ids + tokens, images)
            assert tokens == expected[len(ids) - 1 : -1].argmax(-1).tolist()
    finally:
        engine.shutdown()


def test_hub_configs_parse():
    """The hub's flat config.json (transformers 4.x: text fields at the top, M-RoPE as rope_scaling,
    the vision config's original names) reads as the nested one transformers 5 writes."""
    from dashchat.models.qwen2_vl import vision_config

    text = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_hidden_layers=28,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=32768, image_token_id=151655,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    qwen2 = ModelConfig.from_dict({"architectures": ["Qwen2VLForConditionalGeneration"], **text, "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}})
    assert (qwen2.family, qwen2.rope_scaling, qwen2.raw["mrope_section"], qwen2.attention_bias) == \
        ("qwen2_vl", None, [16, 24, 24], True)
    v = vision_config(qwen2)
    assert (v.hidden, v.out_hidden, v.patch_size, v.in_channels, v.qwen25) == (1280, 1536, 14, 3, False)
    qwen25 = ModelConfig.from_dict({"architectures": ["Qwen2_5_VLForConditionalGeneration"], **text, "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 1536,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3, "patch_size": 14}})
    v = vision_config(qwen25)
    assert (v.hidden, v.out_hidden, v.intermediate, v.fullatt_blocks, v.qwen25) == (1280, 1536, 3420, (7, 15, 23, 31), True)
