"""Int8 linear layers for CPU decoding: int8 weights (per output channel) x int8 activations (per row).

Decoding one token reads every weight once, so bytes per weight bound the speed:
int8 weights read 4x fewer bytes than float32. Activations are quantized per row
(per token), never per batch, so a token's result does not depend on what else is
in the batch (seeded sampling stays reproducible). The int8 x int8 -> int32 product
is torch._int_mm (oneDNN). On this 2-core AVX2 machine it beat float32 by ~3x for one
row, while torch's int8pack/int4pack weight-only kernels (AVX512-only fast paths) were
slower than float32 and FBGEMM's dynamic Linear (one activation scale per batch) lost accuracy.

Outlier activation channels would crush a per-row int8 scale, so before quantizing,
SmoothQuant moves part of each channel's range into the weights (alpha 0.6), folded
into the preceding RMSNorm (q/k/v, gate/up, head) or up projection (down), measured on a
fixed calibration text. On SmolLM2-135M this took greedy-token agreement with float32
from 84% to 91% on a held-out text.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...models.layers import GatedMLP

log = logging.getLogger(__name__)

SMOOTH_ALPHA = 0.6
CACHE_FORMAT = 1  # bump when the quantized layout or the smoothing changes
_CALIBRATION_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge. "
    "def main():\n    print('hello world')\n    return 0\n"
    "用户：请查询北京天气。助手：好的。 {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}} "
    "1, 2, 3, 4, 5. Once upon a time, there was a little robot who wanted to paint.\n"
) * 3


def float_bias(linear: nn.Linear) -> nn.Parameter | None:
    """A replacement layer's copy of the bias: float32, frozen."""
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, quantize: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if quantize:
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            qweight = (w / scale[:, None]).round().to(torch.int8)
        else:  # a shell that cached int8 weights are copied into
            scale = torch.empty(self.out_features)
            qweight = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = float_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = (x / x_scale).round_().to(torch.int8)
        # _int_mm wants the right operand column-major: .t() of the row-major [out, in] weight is.
        y = torch._int_mm(xq, self.qweight.t()).float()
        y = y.mul_(x_scale).mul_(self.scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def _causal_attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return o.transpose(0, 1).reshape(q.shape[0], -1)


@torch.no_grad()
def _input_maxima(model: nn.Module, input_ids: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """Per input channel max |activation| of every Linear on the calibration tokens."""
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
        maxima[module] = torch.maximum(maxima[module], x) if module in maxima else x

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        positions = torch.arange(len(input_ids), device=input_ids.device)
        model.compute_logits(model(input_ids, positions, _causal_attention))
    finally:
        for h in hooks:
            h.remove()
    return maxima


def _smoothing(act_max: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
    s = act_max.clamp(min=1e-5) ** SMOOTH_ALPHA / w_max.clamp(min=1e-5) ** (1 - SMOOTH_ALPHA)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_activations(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Fold SmoothQuant scales into the model; the float function is unchanged."""
    if model.config.tie_word_embeddings:  # the head gets its own weights: the embedding stays as is
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.lm_head = head
    maxima = _input_maxima(model, input_ids)
    pairs = []
    for layer in model.layers:
        pairs.append((layer.input_layernorm, layer.self_attn.qkv_proj))
        if not isinstance(layer.mlp, GatedMLP):
            # a mixture of experts: the norm feeds the router and every expert, some of which the
            # calibration text never reaches; its experts are quantized unsmoothed
            continue
        # the norm that feeds the MLP (Gemma 3's post-attention norm feeds the residual instead)
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)
        pairs.append((mlp_norm, layer.mlp.gate_up_proj))
        down, gate_up = layer.mlp.down_proj, layer.mlp.gate_up_proj
        inter = down.in_features  # this rank's slice of the MLP under tensor parallelism
        s = _smoothing(maxima[down], [down.weight])
        gate_up.weight[inter:].div_(s[:, None].to(gate_up.weight.dtype))  # silu(g) * (u / s) feeds down
        down.weight.mul_(s[None, :].to(down.weight.dtype))
    pairs.append((model.norm, model.lm_head))
    for norm, linear in pairs:
        s = _smoothing(maxima[linear], [linear.weight])
        norm.weight.div_(s.to(norm.weight.dtype))
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def _swap_linears(module: nn.Module, quantize: bool = True) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, quantize))
        else:
            _swap_linears(child, quantize)


def quantize_linears_int8(model: nn.Module, tokenizer) -> None:
    """Smooth on the calibration text, then replace every nn.Linear (head included) in place."""
    ids = torch.tensor(tokenizer.encode(_CALIBRATION_TEXT)[:192], dtype=torch.long)
    smooth_activations(model, ids)
    _swap_linears(model)


def _int8_state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """What quantization changes, by name: int8 linears and the norms smoothing rescaled."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Linear, Int8Linear)):
            shapes[prefix + "qweight"] = (module.out_features, module.in_features)
            shapes[prefix + "scale"] = (module.out_features,)
            if module.bias is not None:
                shapes[prefix + "bias"] = (module.out_features,)
        elif name.endswith("norm"):
            shapes[prefix + "weight"] = tuple(module.weight.shape)
    return shapes


def int8_cache_path(model_dir: str, cache_root: Path, shard: str = "") -> Path:
    """Keyed by the checkpoint's identity (path, size and mtime of its files), the format and the
    tensor-parallel shard ("" for the whole model)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]
    ident = [str(Path(model_dir).resolve()), str(CACHE_FORMAT), str(SMOOTH_ALPHA)] + ([shard] if shard else [])
    ident += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
    key = hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]
    return cache_root / "int8" / f"{Path(model_dir).name}-{key}.safetensors"


def load_or_quantize_int8(model: nn.Module, tokenizer, model_dir: str, cache_root: Path, shard: str = "") -> None:
    """Quantize a loaded float model in place, once per checkpoint (and tensor-parallel shard): later
    starts load the cached result."""
    from safetensors.torch import load_file, save_file

    path = int8_cache_path(model_dir, cache_root, shard)
    state = None
    if path.is_file():
        try:
            state = load_file(str(path))
        except Exception:  # noqa: BLE001 - a bad cache file is rebuilt, never fatal
            log.warning("int8 cache %s unreadable; quantizing anew", path, exc_info=True)
    if state is not None and {k: tuple(v.shape) for k, v in state.items()} == _int8_state_shapes(model):
        if model.config.tie_word_embeddings:  # the cached head is smoothed: no longer the embedding
            model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        _swap_linears(model, quantize=False)
        with torch.no_grad():
            for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
                if name in state:
                    tensor.copy_(state[name])
        log.info("int8 weights loaded from %s", path)
        return
    quantize_linears_int8(model, tokenizer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tensors = {n: t for n, t in model.named_buffers() if n.endswith((".qweight", ".scale"))}
        tensors |= {n: p.data for n, p in model.named_parameters() if n in _int8_state_shapes(model)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name
    except OSError:
        log.warning("could not cache int8 weights at %s", path, exc_info=True)
