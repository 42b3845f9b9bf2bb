"""Images -> the patches Qwen2-VL's vision tower reads, as its Hugging Face image processor makes them.

  decode (Pillow; transparency composited onto white, as transformers does) -> RGB
  smart_resize: both sides to multiples of patch * merge (28), the area within [min_pixels, max_pixels],
                the aspect ratio kept as closely as that allows; bicubic (Pillow, on the 8-bit image)
  rescale by 1/255, normalize with CLIP's mean and std
  patches of 14 x 14, each 2 x 2 block of them consecutive (the merger takes them together), every
  patch repeated over the temporal patch (2 frames: a still image is a two-frame video)

The content digest (SHA-256 over the patch grid and the resized 8-bit pixels) keys the image's tokens
in the engine's prefix cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image the server cannot take: the message is safe to show to the client."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dir(cls, model_dir: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
                 ) -> "ImageProcessorConfig":  # fmt: skip
        """The model folder's preprocessor_config.json (defaults where absent), then the server's flags."""
        raw: dict = {}
        path = Path(model_dir) / "preprocessor_config.json"
        if path.is_file():
            raw = json.loads(path.read_text(encoding="utf-8"))
        size = raw.get("size") or {}
        lo = min_pixels or raw.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels
        hi = max_pixels or raw.get("max_pixels") or size.get("longest_edge") or cls.max_pixels
        if lo > hi:
            raise ValueError(f"min pixels ({lo}) exceed max pixels ({hi})")
        return cls(
            min_pixels=int(lo), max_pixels=int(hi), patch_size=raw.get("patch_size", 14),
            merge_size=raw.get("merge_size", 2), temporal_patch_size=raw.get("temporal_patch_size", 2),
            mean=tuple(raw.get("image_mean", CLIP_MEAN)), std=tuple(raw.get("image_std", CLIP_STD)),
        )


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # [t * h * w, 3 * T * P * P] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    digest: bytes  # SHA-256 of the grid and the resized pixels

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid
        return t * h * w // merge**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's processor resizes to (transformers' smart_resize)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image aspect ratio must be under 200, got {max(height, width) / min(height, width):.0f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_image(data: bytes, max_source_pixels: int):
    """Decode an image's bytes with Pillow (RGB), refusing what it cannot read and pictures larger
    than `max_source_pixels` before their pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_source_pixels:
                raise ImageError(f"image of {width}x{height} pixels is larger than the {max_source_pixels} "
                                 "pixels the server takes")
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("the image could not be read: not a supported image format, or corrupt") from None
    except (OSError, ValueError, SyntaxError, EOFError):  # truncated or malformed data Pillow trips over
        raise ImageError("the image could not be read: not a supported image format, or corrupt") from None
    if min(image.size) < 1:
        raise ImageError("the image is empty")
    return to_rgb(image)


def to_rgb(image):
    """RGB, transparency composited onto white (transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def preprocess(image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """A Pillow RGB image -> its patches (see the module's docstring)."""
    from PIL import Image

    width, height = image.size
    factor = cfg.patch_size * cfg.merge_size
    new_h, new_w = smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescaled as transformers does
    pixels = (pixels - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    chw = pixels.transpose(2, 0, 1)  # [C, H, W]
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = new_h // p, new_w // p
    blocks = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, p, p)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    patches = np.ascontiguousarray(frames.reshape(gh * gw, 3 * t * p * p), dtype=np.float32)
    grid = (1, gh, gw)
    # the resized 8-bit pixels determine the patches (the server's mean and std are fixed)
    digest = hashlib.sha256(np.asarray(grid, dtype=np.int64).tobytes() + resized.tobytes()).digest()
    return ProcessedImage(patches, grid, digest)
