"""Weight-only int8 linear layers for CPU decoding.

Decoding one token reads every weight once, so bytes per weight bound the speed.
The x86/FBGEMM dynamic-quantized Linear has AVX2 kernels; torch's int8pack/int4pack
CPU kernels want AVX512 and are slower than float32 on AVX2 machines.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_linears_int8(model: nn.Module) -> None:
    """Replace every nn.Linear in place with a dynamic int8 Linear (per-channel weights)."""
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
