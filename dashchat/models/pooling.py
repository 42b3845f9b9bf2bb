"""What a model folder says about serving it for embeddings or scores.

Embedding models come as sentence-transformers saves them: `modules.json` lists the modules in
order (the transformer at the folder's root, then `1_Pooling` with its `config.json`, often
`2_Normalize`); the transformer may be a head-less `Qwen3Model` / `Qwen2Model` / `LlamaModel`
(weights without the `model.` prefix, no lm_head) or a causal LM with these files beside it.
Decoder rerankers (Qwen3-Reranker) are causal LMs scored by their "yes" / "no" logits; a folder
says it is one the way vLLM's overrides do (`is_original_qwen3_reranker`, or
`classifier_from_token` naming the two tokens), else the operator says so with `--task score`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = ("auto", "generate", "embed", "score")

# sentence-transformers' pooling modes -> the engine's (engine/types.py PoolingParams.pooling)
_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_NAMED_MODES = {"lasttoken": "last", "mean": "mean", "cls": "cls"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class EmbeddingSpec:
    pooling: str = "last"  # "last" | "mean" | "cls"
    normalize: bool = True
    # Matryoshka: the model's vectors may be cut to their first `dimensions` values (None: not
    # declared, so `dimensions` is refused); an empty tuple allows any size.
    matryoshka: tuple[int, ...] | None = None
    declared: bool = False  # the folder has sentence-transformers' modules.json


@dataclass(frozen=True)
class RerankSpec:
    yes_token: str = "yes"
    no_token: str = "no"


def _read(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_embedding_spec(model_dir: str | Path) -> EmbeddingSpec:
    """Pooling and normalisation from the folder's sentence-transformers files; without them, what
    vLLM does for a decoder served for embeddings (last token, normalised)."""
    d = Path(model_dir)
    cfg = _read(d / "config.json") if (d / "config.json").is_file() else {}
    matryoshka = None
    if cfg.get("matryoshka_dimensions"):
        matryoshka = tuple(int(x) for x in cfg["matryoshka_dimensions"])
    elif cfg.get("is_matryoshka"):
        matryoshka = ()
    if not (d / "modules.json").is_file():
        return EmbeddingSpec(matryoshka=matryoshka)
    pooling, normalize = None, False
    for module in _read(d / "modules.json"):
        # "sentence_transformers.models.Pooling", or since v6 the class's full module path
        kind = str(module.get("type", "")).rpartition(".")[2]
        if kind == "Pooling":
            pooling = _pooling_mode(_read(d / module.get("path", "1_Pooling") / "config.json"))
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(f"{d}: sentence-transformers module {kind} is not supported "
                             "(served: Transformer, Pooling, Normalize)")
    return EmbeddingSpec(pooling or "last", normalize, matryoshka, declared=pooling is not None)


def _pooling_mode(cfg: dict[str, Any]) -> str:
    if any(cfg.get(k) for k in _UNSUPPORTED) or cfg.get("include_prompt") is False:
        raise ValueError(f"unsupported sentence-transformers pooling {cfg}: served are last token, mean and CLS")
    named = cfg.get("pooling_mode")  # sentence-transformers 6 names one mode; older versions set flags
    if named is not None:
        names = named if isinstance(named, list) else [named]
        modes = [_NAMED_MODES.get(n) for n in names]
        if None in modes:
            raise ValueError(f"unsupported sentence-transformers pooling {named!r}: served are lasttoken, mean, cls")
    else:
        modes = [mode for key, mode in _MODES.items() if cfg.get(key)]
    if len(modes) != 1:
        raise ValueError(f"sentence-transformers pooling {cfg} sets {len(modes)} modes; one is served")
    return modes[0]


def read_rerank_spec(model_dir: str | Path) -> RerankSpec | None:
    """The yes/no tokens of a decoder reranker the folder's config declares, else None."""
    path = Path(model_dir) / "config.json"
    cfg = _read(path) if path.is_file() else {}
    tokens = cfg.get("classifier_from_token")
    if isinstance(tokens, list) and len(tokens) == 2:
        return RerankSpec(yes_token=str(tokens[1]), no_token=str(tokens[0]))  # vLLM's order: [no, yes]
    if cfg.get("is_original_qwen3_reranker"):
        return RerankSpec()
    return None


def is_headless(architecture: str) -> bool:
    """A transformer without its LM head (sentence-transformers saves `Qwen3Model` and the like)."""
    return architecture.endswith("Model")


def resolve_task(task: str, model_dir: str | Path, architecture: str | None) -> str:
    """The one task a model is served for. auto: a reranker config -> score; sentence-transformers
    pooling or a head-less checkpoint -> embed; else generate."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if architecture is None:
        path = Path(model_dir) / "config.json"
        architecture = ((_read(path) if path.is_file() else {}).get("architectures") or [None])[0]
    headless = architecture is not None and is_headless(architecture)
    if task == "generate" and headless:
        raise ValueError(f"{architecture} has no LM head: it cannot generate (serve it with --task embed)")
    if task == "score" and headless:
        raise ValueError(f"{architecture} has no LM head: a decoder reranker needs its yes/no logits")
    if task != "auto":
        return task
    if read_rerank_spec(model_dir) is not None:
        return "score"
    if headless or (Path(model_dir) / "modules.json").is_file():
        return "embed"
    return "generate"


def serving(task: str, model_dir: str | Path | None, architecture: str | None
            ) -> tuple[str, EmbeddingSpec | RerankSpec | None]:
    """The task a model is served for and how: its embedding spec (embed), its yes/no tokens (score)."""
    if model_dir is None:  # an engine that names no folder: as asked, generation by default
        return ("generate" if task == "auto" else task), None
    task = resolve_task(task, model_dir, architecture)
    if task == "embed":
        return task, read_embedding_spec(model_dir)
    if task == "score":
        return task, read_rerank_spec(model_dir) or RerankSpec()
    return task, None
