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

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH_ALPHA = 0.6
_CALIBRATION_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge. "
    "def main():\n    print('hello world')\n    return 0\n"
    "用户：请查询北京天气。助手：好的。 {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}} "
    "1, 2, 3, 4, 5. Once upon a time, there was a little robot who wanted to paint.\n"
) * 3


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

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
    inter = model.config.intermediate_size
    pairs = []
    for layer in model.layers:
        pairs += [(layer.input_layernorm, layer.self_attn.qkv_proj), (layer.post_attention_layernorm, layer.mlp.gate_up_proj)]
        down, gate_up = layer.mlp.down_proj, layer.mlp.gate_up_proj
        s = _smoothing(maxima[down], [down.weight])
        gate_up.weight[inter:].div_(s[:, None].to(gate_up.weight.dtype))  # silu(g) * (u / s) feeds down
        down.weight.mul_(s[None, :].to(down.weight.dtype))
    pairs.append((model.norm, model.lm_head))
    for norm, linear in pairs:
        s = _smoothing(maxima[linear], [linear.weight])
        norm.weight.div_(s.to(norm.weight.dtype))
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def _swap_linears(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)


def quantize_linears_int8(model: nn.Module, tokenizer) -> None:
    """Smooth on the calibration text, then replace every nn.Linear (head included) in place."""
    ids = torch.tensor(tokenizer.encode(_CALIBRATION_TEXT)[:256], dtype=torch.long)
    smooth_activations(model, ids)
    _swap_linears(model)
