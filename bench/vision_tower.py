"""Vision tower time per image: dashchat's Qwen2.5-VL tower against transformers' (same random weights).

The tower at Qwen2.5-VL-3B's vision shape (depth 32, width 1280, 16 heads, MLP 3420, output 2048,
windows of 112 pixels, full attention in blocks 7/15/23/31), random weights, one image at a time,
preprocessed as the server does (448x448 -> 256 tokens; 1024x1024 -> the default max of 1280 tokens).
On CPU in float32 dashchat's linears are packed for oneDNN as the engine packs them.
Rounds alternate between the implementations; medians are reported. `--bf16` (CPU) also times
dashchat's tower in bfloat16 (oneDNN's bf16 matmul; fast where the CPU has AVX-512 BF16 or AMX) and
reports its drift from transformers' float32 output. `--drift` only checks whether a tiny random
Qwen2.5-VL's greedy tokens after an image change when dashchat's bf16 tower replaces its float32 one.

    python bench/vision_tower.py [--rounds 3] [--device cpu|cuda] [--sizes 448 1024] [--bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashchat.models.image_processing import ImageProcessorConfig, open_image, preprocess  # noqa: E402
from dashchat.models.qwen2_vl_vision import VisionConfig, VisionTower  # noqa: E402

SHAPE = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
             window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


def picture(side: int, seed: int | None = None) -> bytes:
    """A random side x side PNG (the seed defaults to the side)."""
    from PIL import Image

    pixels = np.random.default_rng(side if seed is None else seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def build(device: torch.device, dtype: torch.dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
        Qwen2_5_VLVisionConfig,
    )

    torch.manual_seed(0)
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**SHAPE), dtype=dtype)
    ref = ref.to(device).eval()
    ours = VisionTower(VisionConfig.from_dict(SHAPE, qwen25=True, text_hidden=2048)).to(device, dtype).eval()
    ours.load_weights(ref.state_dict().items())
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        from dashchat.engine.cpu.linear import pack_linears

        pack_linears(ours)  # as the engine serves a float32 model on CPU: oneDNN products, weights packed once
    return ours, ref


def greedy_drift(steps: int = 16) -> dict:
    """On a tiny random Qwen2.5-VL (transformers, float32): greedy tokens after a 448x448 image with
    its own float32 tower, and with dashchat's tower in bfloat16 in its place: do they change?"""
    import transformers
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch.manual_seed(0)
    text = dict(vocab_size=2048, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=56,
                  fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=2000,
                                        video_token_id=2001, vision_start_token_id=2002, vision_end_token_id=2003)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    tower = VisionTower(VisionConfig.from_dict(vision, qwen25=True, text_hidden=64)).to(torch.bfloat16).eval()
    tower.load_weights(model.model.visual.state_dict().items())
    img = preprocess(open_image(picture(448), 10**8), ImageProcessorConfig())
    pixels, grid = torch.from_numpy(img.pixel_values), torch.tensor([img.grid])
    prompt = [5, 6, 7, 2002] + [2000] * img.num_tokens(2) + [2003] + list(range(100, 110))

    def run() -> tuple[list[int], torch.Tensor]:
        ids, first = list(prompt), None
        with torch.inference_mode():
            for _ in range(steps):  # whole-sequence forwards: tiny, and no cache to get wrong
                logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid,
                               mm_token_type_ids=torch.tensor([[int(t == 2000) for t in ids]])).logits[0, -1]
                first = logits if first is None else first
                ids.append(int(logits.argmax()))
        return ids[len(prompt):], first

    want, want_logits = run()
    visual = model.model.visual
    visual.forward = lambda pv, grid_thw, **_: BaseModelOutputWithPooling(
        pooler_output=torch.cat(tower(pv.to(torch.bfloat16), [tuple(g) for g in grid_thw.tolist()])).float())
    got, got_logits = run()
    same = sum(a == b for a, b in zip(want, got))
    diff = (want_logits - got_logits).abs().max().item()
    print(f"tiny Qwen2.5-VL, {steps} greedy tokens after a 448x448 image: bf16 tower {same}/{steps} equal to the "
          f"float32 tower's; first logits max |diff| {diff:.2e}", flush=True)
    return {"steps": steps, "equal_tokens": same, "first_logits_max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 1024])
    ap.add_argument("--bf16", action="store_true", help="also time dashchat's tower in bfloat16 (CPU)")
    ap.add_argument("--drift", action="store_true", help="only: greedy tokens of a tiny model with a bf16 tower")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.drift:
        greedy_drift()
        return
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ours, ref = build(device, dtype)
    runs = {"dashchat": lambda p, g, grid: ours(p, g), "transformers": lambda p, g, grid: ref(p, grid_thw=grid)}
    if args.bf16 and dtype == torch.float32:
        half = VisionTower(ours.cfg).to(torch.bfloat16).eval()  # unpacked: oneDNN's bf16 matmul as it is
        half.load_weights(ref.state_dict().items())
        runs["dashchat bf16"] = lambda p, g, grid: half(p.to(torch.bfloat16), g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    print(f"device {device} {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    for side in args.sizes:
        img = preprocess(open_image(picture(side), 10**8), ImageProcessorConfig())
        patches = torch.from_numpy(img.pixel_values).to(device, dtype)
        grid = torch.tensor([img.grid], device=device)
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            want = ref(patches, grid_thw=grid).pooler_output.float()
            err = {name: (run(patches, [img.grid], grid)[0].float() - want).abs().max().item()
                   for name, run in runs.items() if name != "transformers"}
            for _ in range(args.rounds):  # alternating rounds
                for name, run in runs.items():
                    sync()
                    start = time.perf_counter()
                    run(patches, [img.grid], grid)
                    sync()
                    times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = img.num_tokens(2)
        scale = want.abs().max().item()
        results[side] = {"tokens": tokens, "patches": len(patches), "max_abs_diff": err, "max_abs": scale,
                         "seconds": med, "load": os.getloadavg()[0]}
        line = ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in med.items())
        ratios = ", ".join(f"{name} {med['transformers'] / sec:.2f}x" for name, sec in med.items()
                           if name != "transformers")
        diffs = ", ".join(f"{name} {e:.2e}" for name, e in err.items())
        print(f"{side}x{side}: {len(patches)} patches -> {tokens} tokens; {line}; faster than transformers: {ratios}; "
              f"max |diff| from transformers: {diffs} (its largest |value| {scale:.2f}); "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
