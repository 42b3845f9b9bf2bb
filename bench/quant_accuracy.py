"""Int8, int4 and GGUF-as-shipped drift against float32 on a fixed text: mean log-prob of the true next token,
and how often each picks the same greedy token as float32.

    python bench/quant_accuracy.py [--model smollm2-135m-instruct] [--tokens 384] [--quantization int8,int4,gguf]

float32 here is the GGUF's own weights dequantized, so `gguf` (the file's blocks run by the C
kernels, activations in int8 per 32 values) measures only what the kernels' arithmetic changes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dashchat.engine.quantization.int8 import _causal_attention, quantize_linears_int8  # noqa: E402
from dashchat.engine.quantization.int4 import quantize_linears_int4  # noqa: E402
from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_linears  # noqa: E402
from dashchat.models.parallel import ShardPlan  # noqa: E402
from dashchat.models.config import ModelConfig  # noqa: E402
from dashchat.models.registry import build_model  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402
from dashchat.models.weights import iter_weights  # noqa: E402
from dashchat.tokenizer import Tokenizer  # noqa: E402

# Held out: not the calibration text.
TEXT = (Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md").read_text(encoding="utf-8")


@torch.inference_mode()
def logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), _causal_attention)
    return torch.log_softmax(model.compute_logits(hidden), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--quantization", default="int8,int4", help="comma list of int8, int4, gguf (the file's blocks "
                    "through the C kernels: int8 activations per 32 values, the same kernel at every batch size)")
    args = ap.parse_args()
    path = str(resolve_model(args.model).path)
    cfg, tok = ModelConfig.from_dir(path), Tokenizer.from_dir(path)
    model = build_model(cfg)
    model.load_weights(iter_weights(path))
    model.eval()
    ids = torch.tensor(tok.encode(TEXT)[: args.tokens])
    ref = logprobs(model, ids)
    target = ids[1:, None]
    lp_ref = ref[:-1].gather(1, target).squeeze(1)
    for kind in args.quantization.split(","):
        quantized = copy.deepcopy(model)
        if kind == "int8":
            quantize_linears_int8(quantized, tok)
        elif kind == "gguf":
            load_gguf_linears(quantized, gguf_source(path), cfg, ShardPlan(cfg, 0, 1))
        else:
            quantize_linears_int4(quantized)
        got = logprobs(quantized, ids)
        lp_got = got[:-1].gather(1, target).squeeze(1)
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        print(f"{args.model}: {len(ids)} tokens; mean log-prob float32 {lp_ref.mean():.4f}, {kind} {lp_got.mean():.4f} "
              f"(drift {lp_got.mean() - lp_ref.mean():+.4f}, mean |diff| {(lp_ref - lp_got).abs().mean():.4f}); "
              f"greedy agreement {agree:.1%}")

if __name__ == "__main__":
    main()
