"""A copy of a model folder with random weights: same config, tokenizer and chat template.

Speed does not depend on the weights' values, so benchmarks can run where the weights cannot go
(a lent GPU machine with no network and a small upload limit):

    python bench/random_model.py SRC DST [--dtype bfloat16] [--device cuda]

SRC is a Hugging Face style folder or an embedded model's name (its converted cache folder).
Only the small files travel; DST gets fresh random safetensors. Outputs are gibberish.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(args.src)
    if not src.is_dir():
        from dashchat.models.resolve import resolve_model

        src = Path(resolve_model(args.src).path)
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in {".json", ".jinja", ".txt", ".model"}:
            shutil.copy2(f, dst / f.name)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dst), dtype=getattr(torch, args.dtype))
    model.save_pretrained(dst, safe_serialization=True)
    print(f"{dst}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters ({args.dtype})")


if __name__ == "__main__":
    main()
