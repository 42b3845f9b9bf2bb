"""The vision tower of Qwen2-VL and Qwen2.5-VL: image patches -> embeddings in the language model's width.

Patches come from `image_processing.py` as rows of C * T * P * P values (T = 2: a still image is
two equal frames), already in 2x2 merge-block order. The tower:

  patch embedding   a Conv3d whose kernel equals its stride, so it is one matmul over the rows
  blocks            pre-norm attention with a 2-D rotary embedding (a patch's row on the first half of
                    the rotated frequencies, its column on the second), then an MLP
                    Qwen2-VL: LayerNorm and a quick-GELU MLP; Qwen2.5-VL: RMSNorm and a SwiGLU MLP
                    with biases, and windowed attention except in `fullatt_block_indexes`
  merger            each 2x2 block of patches -> one token: norm, concat, Linear-GELU-Linear

Attention is over one image (one frame of a video) at a time, or one window. Segments of equal length
that sit side by side (the windows of a frame are ordered so that they do) run as one batched scaled_dot_product_attention
over a view of the packed rows: no padding, no mask, a handful of calls per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden: int  # the tower's width
    heads: int
    out_hidden: int  # the language model's width
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2-VL
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    # Qwen2.5-VL
    qwen25: bool = False
    intermediate: int = 0
    window_size: int = 112
    fullatt_blocks: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], qwen25: bool, text_hidden: int) -> "VisionConfig":
        rope = raw.get("rope_parameters") or {}
        # the hub's original configs spell two of these as spatial_patch_size and in_chans
        common = dict(
            depth=raw["depth"], heads=raw["num_heads"],
            patch_size=raw.get("patch_size") or raw.get("spatial_patch_size") or 14,
            temporal_patch_size=raw.get("temporal_patch_size", 2), merge_size=raw.get("spatial_merge_size", 2),
            in_channels=raw.get("in_channels") or raw.get("in_chans") or 3,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
        if qwen25:
            return cls(hidden=raw["hidden_size"], out_hidden=raw.get("out_hidden_size", text_hidden), qwen25=True,
                       intermediate=raw["intermediate_size"], hidden_act=raw.get("hidden_act", "silu"),
                       window_size=raw.get("window_size", 112),
                       fullatt_blocks=tuple(raw.get("fullatt_block_indexes", (7, 15, 23, 31))), **common)
        # Qwen2-VL's vision config calls the tower's width embed_dim and the output hidden_size
        return cls(hidden=raw["embed_dim"], out_hidden=raw.get("hidden_size", text_hidden),
                   mlp_ratio=raw.get("mlp_ratio", 4), hidden_act=raw.get("hidden_act", "quick_gelu"), **common)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


Runs = list[tuple[int, int, int]]  # (first row, segments, rows per segment): equal segments side by side


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: Runs) -> torch.Tensor:
    """Bidirectional attention within each segment of a packed sequence. q/k/v [S, H, D] -> [S, H * D].
    A run of n equal segments of L rows is one SDPA call over a [n, H, L, D] view: no padding, no mask,
    no gather. Inputs are 4-D so that CPU SDPA takes its flash kernel (3-D inputs fall back to the
    math path, which materialises every [L, L] score matrix)."""
    s, h, d = q.shape
    if len(runs) == 1 and runs[0][1] == 1:
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
        return out[0].transpose(0, 1).reshape(s, h * d)
    out = q.new_empty(s, h, d)
    for start, n, length in runs:
        rows = slice(start, start + n * length)
        part = F.scaled_dot_product_attention(*(x[rows].view(n, length, h, d).transpose(1, 2) for x in (q, k, v)))
        out[rows] = part.transpose(1, 2).reshape(n * length, h, d)
    return out.view(s, h * d)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], runs: Runs) -> torch.Tensor:
        s = x.shape[0]
        qkv = self.qkv(x).view(s, 3, self.heads, self.head_dim)
        q, k = apply_rope(qkv[:, :2], rope).unbind(1)  # q and k rotated in one pass
        return self.proj(segment_attention(q, k, qkv[:, 2], runs))


class VisionMlp(nn.Module):
    """Qwen2-VL: fc1 -> activation -> fc2."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width = int(cfg.hidden * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden, width)
        self.fc2 = nn.Linear(width, cfg.hidden)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6) if cfg.qwen25 else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, cfg.hidden)
        self.norm2 = _norm(cfg, cfg.hidden)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionGatedMlp(cfg) if cfg.qwen25 else VisionMlp(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], runs: Runs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.width = cfg.hidden * cfg.merge_size**2
        self.ln_q = _norm(cfg, cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d (kernel = stride = T x P x P): one matmul on flattened patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def _inv_freq(self, dev: torch.device) -> torch.Tensor:
        """Each of h and w turns half of the rotated frequencies (computed per call: a model built
        on the meta device has no buffers to keep)."""
        spatial = self.cfg.hidden // self.cfg.heads // 2
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=dev) / spatial))

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """patches [sum of t * h * w, patch_dim] of several images (in the tower's dtype), grids (t, h, w) in patches ->
        each image's embeddings [t * h * w / merge^2, out_hidden]."""
        cfg, dev = self.cfg, patches.device
        unit = cfg.merge_size**2
        x = self.patch_embed(patches)
        cos, sin = self._rope(grids, dev)
        image_runs = _runs([h * w for t, h, w in grids for _ in range(t)])  # full attention is per frame
        order = None
        window_runs = image_runs
        if cfg.qwen25:
            order, window_runs = self._windows(grids, dev)
            x, cos, sin = (_by_unit(t, order, unit) for t in (x, cos, sin))
        rope = (cos[:, None, None].to(x.dtype), sin[:, None, None].to(x.dtype))  # over [S, q/k, H, D / 2]
        for i, block in enumerate(self.blocks):
            full = not cfg.qwen25 or i in cfg.fullatt_blocks
            x = block(x, rope, image_runs if full else window_runs)
        merged = self.merger(x)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return list(merged.split([t * h * w // unit for t, h, w in grids]))

    def _rope(self, grids: list[tuple[int, int, int]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [S, head_dim / 2] of each patch's (row, column), patches in merge-block order."""
        m = self.cfg.merge_size
        rows, cols = [], []
        for t, h, w in grids:
            hh = torch.arange(h, device=dev).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            ww = torch.arange(w, device=dev).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rows.append(hh.permute(0, 2, 1, 3).reshape(-1).repeat(t))
            cols.append(ww.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        inv = self._inv_freq(dev)
        angles = torch.cat((torch.cat(rows)[:, None] * inv, torch.cat(cols)[:, None] * inv), dim=-1)
        return angles.cos(), angles.sin()

    def _windows(self, grids: list[tuple[int, int, int]], dev: torch.device) -> tuple[torch.Tensor, Runs]:
        """Qwen2.5-VL's windows: merge units reordered window by window (windows of
        window_size / patch_size patches a side, cut from the top left; the last ones smaller),
        and the windows' runs in patches. Within each frame the windows go full ones first, then the
        smaller edge ones by size, so that equal windows sit side by side and attend in one call
        (attention never crosses a window, and the merged tokens are put back in image order)."""
        cfg = self.cfg
        m, side = cfg.merge_size, cfg.window_size // cfg.merge_size // cfg.patch_size
        order, lens, base = [], [], 0
        for t, h, w in grids:
            gh, gw = h // m, w // m
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            ph, pw = -gh % side, -gw % side
            padded = F.pad(index, (0, pw, 0, ph), value=-1)
            nh, nw = (gh + ph) // side, (gw + pw) // side
            padded = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
            sizes = (padded >= 0).sum(-1)  # [t, windows]: sorted within each frame, which stays whole
            by_size = torch.argsort(sizes, dim=1, descending=True, stable=True)
            padded = padded.gather(1, by_size[..., None].expand_as(padded)).flatten(0, 1)
            sizes = sizes.gather(1, by_size).flatten()
            order.append(padded[padded >= 0] + base)
            lens += sizes[sizes > 0].tolist()
            base += t * gh * gw
        return torch.cat(order).to(dev), _runs([n * m * m for n in lens])

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Checkpoint tensors named relative to the tower (`blocks.0.attn.qkv.weight`, ...)."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            tensor = tensor[...] if not isinstance(tensor, torch.Tensor) else tensor
            if name not in params:
                raise KeyError(f"unexpected vision weight {name!r} in checkpoint")
            params[name].copy_(tensor.reshape(params[name].shape))  # the Conv3d kernel flattens
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks vision weights: {missing[:5]}")


def _runs(lengths: list[int]) -> Runs:
    """Consecutive segments of these lengths as runs of equal ones."""
    runs: Runs = []
    start = 0
    for length in lengths:
        if runs and runs[-1][2] == length:
            first, n, _ = runs[-1]
            runs[-1] = (first, n + 1, length)
        else:
            runs.append((start, 1, length))
        start += length
    return runs


def _by_unit(x: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of x reordered by merge unit (`unit` consecutive rows move together)."""
    return x.view(-1, unit, *x.shape[1:])[order].reshape(x.shape)
