"""Qwen2-VL and Qwen2.5-VL: the Qwen2 decoder with images spliced into the prompt.

An image enters the prompt as `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`; the
vision tower (qwen2_vl_vision.py) turns it into N embeddings, which replace the placeholders'
token embeddings. Positions are multimodal (M-RoPE): every token has three position ids (t, h, w),
and the rotary frequencies are cut into `mrope_section` parts, each turned by one of the three.
Text has t = h = w (so it rotates exactly as with ordinary RoPE); an image's tokens share t and
count h and w across its grid of merged patches, from the position after the text before it; the
text after an image continues from the image's largest position + 1 (`mrope_positions`).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .config import ModelConfig
from .layers import RotaryEmbedding
from .llama import LlamaForCausalLM
from .parallel import SINGLE, TensorParallel
from .qwen2_vl_vision import VisionConfig, VisionTower


class MRotaryEmbedding(RotaryEmbedding):
    """RoPE that takes positions [N] (text: every section turned by the same position) or [3, N]."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, section: Sequence[int]) -> None:
        super().__init__(head_dim, max_positions, theta, None)
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(section)} must add up to half the head size ({head_dim // 2})")
        self.section = list(section)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, dtype)
        cos, sin = self.cos[positions], self.sin[positions]  # [3, N, D/2]

        def pick(table: torch.Tensor) -> torch.Tensor:
            parts = table.split(self.section, dim=-1)
            return torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1).unsqueeze(1).to(dtype)

        return pick(cos), pick(sin)


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__(cfg, tp)
        section = cfg.raw.get("mrope_section") or [cfg.head_dim // 2]
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, section)
        self.visual = VisionTower(vision_config(cfg))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Any,
                mm_rows: torch.Tensor | None = None, mm_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """As the text model, with the rows `mm_rows` of the flat batch taking `mm_embeds` (image
        embeddings) instead of their placeholder tokens' embeddings."""
        x = self.embed_tokens(input_ids)
        if mm_rows is not None and len(mm_rows):
            x = x.index_copy(0, mm_rows, mm_embeds.to(x.dtype))
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x, attention)
        return self.norm(x)

    @torch.inference_mode()
    def embed_images(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Run the tower once over several images: each image's embeddings [tokens, hidden]."""
        like = self.embed_tokens.weight  # the linears may be packed (no .weight): take the model's place
        patches = torch.cat(pixel_values).to(like.device, like.dtype)
        return self.visual(patches, grids)

    def checkpoint_name(self, name: str) -> str:
        return name.removeprefix("language_model.")  # transformers >= 4.52 nests the text model

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """The text model's weights as Qwen2's (split over ranks); the tower's whole on every rank."""
        vision: list[tuple[str, Any]] = []

        def text_weights() -> Iterable[tuple[str, Any]]:
            for name, tensor in weights:
                short = name.removeprefix("model.")
                if short.startswith("visual."):
                    vision.append((short.removeprefix("visual."), tensor))
                else:
                    yield name, tensor

        tower = self._modules.pop("visual")  # out of the text model's missing-weight check
        try:
            super().load_weights(text_weights())
        finally:
            self._modules["visual"] = tower
        tower.load_weights(vision)


def vision_config(cfg: ModelConfig) -> VisionConfig:
    return VisionConfig.from_dict(cfg.raw["vision_config"], cfg.architecture == "Qwen2_5_VLForConditionalGeneration",
                                  cfg.hidden_size)


def mrope_positions(prompt_len: int, images: Sequence[Any], merge: int) -> tuple[torch.Tensor, int]:
    """Position ids [3, prompt_len] of a prompt whose images (each with `offset`, `length` and
    `grid` (t, h, w) in patches) sit at their placeholder runs, and the delta that text after the
    prompt adds to its index (position = index + delta)."""
    out = torch.empty(3, prompt_len, dtype=torch.long)
    index = pos = 0  # next token, and the position it gets if it is text
    for img in sorted(images, key=lambda i: i.offset):
        t, h, w = img.grid[0], img.grid[1] // merge, img.grid[2] // merge
        if t * h * w != img.length:
            raise ValueError(f"image of {img.length} tokens does not match its grid {img.grid}")
        out[:, index : img.offset] = torch.arange(pos, pos + img.offset - index)
        pos += img.offset - index
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        out[:, img.offset : img.offset + img.length] = grid.reshape(3, -1) + pos
        pos += max(h, w)  # as transformers' get_rope_index (t is 1 for an image)
        index = img.offset + img.length
    out[:, index:] = torch.arange(pos, pos + prompt_len - index)
    return out, pos + prompt_len - index - prompt_len


def image_problem(cfg: ModelConfig, prompt: Sequence[int], images: Sequence[Any]) -> str | None:
    """Why a prompt's images cannot be served by this model (None: they can): a model without a
    vision tower, or images whose placeholder runs, grids or patches do not agree."""
    if cfg.family != "qwen2_vl":
        return f"the model ({cfg.architecture}) does not take images"
    vis = vision_config(cfg)
    pad = cfg.raw.get("image_token_id", 151655)
    end = 0
    for img in images:
        t, h, w = img.grid
        if img.offset < end or img.offset + img.length > len(prompt):
            return "image spans overlap or leave the prompt"
        if h % vis.merge_size or w % vis.merge_size or t * h * w // vis.merge_size**2 != img.length:
            return f"an image of grid {img.grid} cannot fill {img.length} tokens"
        if tuple(img.pixel_values.shape) != (t * h * w, vis.patch_dim):
            return f"an image's patches have shape {tuple(img.pixel_values.shape)}, not {(t * h * w, vis.patch_dim)}"
        if any(tok != pad for tok in prompt[img.offset : img.offset + img.length]):
            return "an image's span is not all image placeholder tokens"
        end = img.offset + img.length
    return None
