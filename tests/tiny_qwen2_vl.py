"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints (transformers writes them) with the embedded
Qwen2.5 model's tokenizer and chat template, and test images made with Pillow."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch

from dashchat.engine.types import ImageInput
from dashchat.models.image_processing import ImageProcessorConfig, open_image, preprocess
from dashchat.models.resolve import resolve_model

VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655
_TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
# Qwen2.5-VL: windows of 2x2 merged patches (56 pixels), the middle block attends the whole image
FAMILIES = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                   dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                        window_size=56, fullatt_block_indexes=[1])),
}


def save_tiny_vl(family: str, path: Path) -> torch.nn.Module:
    """The checkpoint, with tokenizer files, in `path`; returns transformers' model (float32, eval)."""
    import transformers

    config_cls, model_cls, vision = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(text_config=dict(_TEXT), vision_config=vision)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    qwen = resolve_model("qwen2.5-coder-0.5b-instruct").path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(qwen) / name, Path(path) / name)
    return model


def png(width: int, height: int, seed: int) -> bytes:
    """A random RGB picture as PNG bytes."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


# small images: 56 x 84 pixels -> 4 x 6 patches -> 6 tokens; the max keeps tokens few
PROC = ImageProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 20)


def build_prompt(engine, parts: list) -> tuple[list[int], list[ImageInput]]:
    """Text pieces and PNG images -> token ids with each image's placeholder run, and the images."""
    ids: list[int] = []
    images: list[ImageInput] = []
    for part in parts:
        if isinstance(part, str):
            ids += engine.tokenizer.encode(part)
            continue
        img = preprocess(open_image(part, 10**8), PROC)
        n = img.num_tokens(PROC.merge_size)
        ids.append(VISION_START)
        images.append(ImageInput(torch.from_numpy(img.pixel_values), img.grid, len(ids), n, img.digest))
        ids += [IMAGE_PAD] * n + [VISION_END]
    return ids, images


def reference_logprobs(ref, ids: list[int], images: list[ImageInput]) -> torch.Tensor:
    kwargs = {}
    if images:
        kwargs = dict(pixel_values=torch.cat([i.pixel_values for i in images]),
                      image_grid_thw=torch.tensor([i.grid for i in images]),
                      mm_token_type_ids=torch.tensor([[int(t == IMAGE_PAD) for t in ids]]))
    with torch.inference_mode():
        return torch.log_softmax(ref(input_ids=torch.tensor([ids]), **kwargs).logits[0].float(), dim=-1)
