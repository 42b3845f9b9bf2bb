"""Images in chat messages: from a request's parts to the engine's `ImageInput`s.

  parts   every API's image parts arrive as chat `image_url` parts (Responses' `input_image` and
          Anthropic's `image` blocks are translated to them by their routes)
  bytes   `data:` URLs decoded, http(s) URLs fetched only from `--allowed-media-domains`, both by
          `media/image_fetch.py` under the operator's policy; everything else a 400
  patches Pillow decodes, the model's processor resizes and cuts (models/image_processing.py), off
          the event loop
  prompt  the template writes one `<|vision_start|><|image_pad|><|vision_end|>` per image part
          (chat_template.py); here each `<|image_pad|>` of the token ids becomes as many as the
          image has tokens. Text a client typed never encodes as `<|image_pad|>` (the control-token
          guard), so only real image parts are expanded.

Every refusal is a 400 APIError, which each API answers in its own shape.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import torch

from dashchat.engine.types import ImageInput
from dashchat.models.image_processing import ImageError, ImageProcessorConfig, ProcessedImage, open_image, preprocess
from dashchat.server.media.image_fetch import ImageFetchError, decode_data_url, fetch_image_bytes
from dashchat.server.plumbing.errors import bad_request

log = logging.getLogger("dashchat.server")

IMAGE_PART_TYPES = ("image_url", "image", "input_image")
MAX_SOURCE_PIXELS = 8192 * 8192  # a decoded picture's pixels before resizing (decompression bombs)


@dataclass(frozen=True)
class Vision:
    """What the server needs to know about a model that takes images."""

    processor: ImageProcessorConfig
    image_token_id: int


def vision_support(engine: Any, cfg: Any) -> Vision | None:
    """The served model's image support (None: a text-only model)."""
    model_config = getattr(engine, "model_config", None)
    args = getattr(engine, "args", None)
    if model_config is None or args is None or getattr(model_config, "family", None) != "qwen2_vl":
        return None
    processor = ImageProcessorConfig.from_dir(args.model_dir, cfg.mm_min_pixels, cfg.mm_max_pixels)
    return Vision(processor, int(model_config.raw.get("image_token_id", 151655)))


def image_url_of(part: dict[str, Any]) -> str | None:
    """The URL of a chat image part (`image_url` as an object or a string)."""
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) else None


def for_template(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages with each image part reduced to `{"type": "image"}` (the template writes its
    placeholder; the URL, maybe megabytes of base64, never goes through the template), and each
    image's (param, URL) in prompt order."""
    urls: list[tuple[str, str]] = []
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                             for p in content):
            parts = []
            for j, p in enumerate(content):
                if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES:
                    param = f"messages[{i}].content[{j}].image_url"
                    url = image_url_of(p)
                    if not url:
                        raise bad_request("An image part needs 'image_url.url'.", param)
                    urls.append((param, url))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out, urls


async def load_images(state: Any, model: str, urls: list[tuple[str, str]]) -> list[ProcessedImage]:
    """Each image's bytes (decoded, or fetched where allowed), checked and cut into patches.
    `model`: the served name the request asked for (a text-only model is refused by it)."""
    if not urls:
        return []
    vision: Vision | None = getattr(state.model, "vision", None)
    if vision is None:
        raise bad_request(f"The model '{model}' does not take images; send text only.", urls[0][0])
    limit = state.cfg.limit_mm_per_prompt.get("image", 0)
    if len(urls) > limit:
        raise bad_request(f"At most {limit} images per request (--limit-mm-per-prompt); this one has {len(urls)}.",
                          urls[limit][0])
    datas = [await image_bytes(state, param, url) for param, url in urls]
    return await asyncio.to_thread(_process_all, state, urls, datas, vision.processor)


def _process_all(state: Any, urls: list[tuple[str, str]], datas: list[bytes], processor: ImageProcessorConfig
                 ) -> list[ProcessedImage]:  # fmt: skip
    out = []
    for (param, _), data in zip(urls, datas):
        try:
            out.append(preprocess(open_image(data, MAX_SOURCE_PIXELS), processor))
        except ImageError as exc:
            raise bad_request(f"Invalid image: {exc}.", param) from None
    return out


async def image_bytes(state: Any, param: str, url: str) -> bytes:
    """A `data:` URL decoded, or an http(s) URL fetched under the operator's policy (image_fetch.py:
    allowed hosts, public addresses only, size and time bounds); anything else is a 400."""
    policy = state.cfg.image_fetch
    try:
        if url[:5].lower() == "data:":
            return decode_data_url(url, policy.max_bytes)[1]
        if not url.lower().startswith(("http://", "https://")):
            raise bad_request("An image URL must be a base64 'data:' URL (or http(s) where the server allows it).",
                              param)
        if not policy.allowed_hosts:
            raise bad_request("Remote image URLs are not allowed on this server (the operator may allow hosts "
                              "with --allowed-media-domains); send the image as a base64 data URL.", param)
        return await fetch_image_bytes(url, policy)
    except ImageFetchError as exc:
        raise bad_request(f"Invalid image URL: {exc}.", param) from None


def expand_images(ids: list[int], images: list[ProcessedImage], vision: Vision | None, param: str = "messages"
                  ) -> tuple[list[int], list[ImageInput]]:  # fmt: skip
    """Each image's single placeholder in the rendered ids -> its run of tokens, and the engine's
    ImageInput for it (offset and length in the new ids)."""
    if not images:
        return ids, []
    assert vision is not None
    pad = vision.image_token_id
    where = [i for i, t in enumerate(ids) if t == pad]
    if len(where) != len(images):
        raise bad_request(f"The chat template shows {len(where)} of the request's {len(images)} images; "
                          "images are supported in user messages.", param)
    merge = vision.processor.merge_size
    out: list[int] = []
    inputs: list[ImageInput] = []
    prev = 0
    for at, img in zip(where, images):
        out += ids[prev:at]
        n = img.num_tokens(merge)
        inputs.append(ImageInput(torch.from_numpy(img.pixel_values), img.grid, len(out), n, img.digest))
        out += [pad] * n
        prev = at + 1
    out += ids[prev:]
    return out, inputs
