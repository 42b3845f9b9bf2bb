"""Hub model ids (`org/name`) -> a local folder, via Hugging Face or ModelScope.

The local cache is tried first, so a cached model starts offline and instantly. Going online is
preceded by a quick HTTP reachability probe: a closed network fails in seconds with a clear message,
not after minutes of library retries.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

# Only what the engine reads: configs, tokenizer files, chat templates and safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
# Duplicate weight formats some repos also carry (llama's original/, mistral's consolidated).
IGNORE_PATTERNS = ["original/*", "consolidated*", "*.bin", "*.pth", "*.pt", "*.gguf", "onnx/*", "*.onnx"]
PROBE_TIMEOUT_S = 3.0

_TRUE = {"1", "true", "yes", "on"}


class HubError(RuntimeError):
    """A hub model could not be found locally nor downloaded."""


def download_model(repo_id: str, use_modelscope: bool = False, revision: str | None = None) -> Path:
    """Local folder with `repo_id`'s config, tokenizer and safetensors (downloading what is missing)."""
    if use_modelscope:
        return _fetch(repo_id, revision, _ModelScope())
    return _fetch(repo_id, revision, _HuggingFace())


def _fetch(repo_id: str, revision: str | None, hub: _Hub) -> Path:
    local = hub.local(repo_id, revision)
    if local is not None and _complete(local):
        return local
    if hub.offline():
        raise HubError(
            f"model {repo_id!r} is not in the local {hub.name} cache ({hub.cache_hint()}) and {hub.offline_var} "
            f"is set (offline); pass a local model folder or .gguf file, or unset {hub.offline_var}"
        )
    url = hub.endpoint()
    if not _reachable(url):
        raise HubError(
            f"the {hub.name} hub ({urlparse(url).hostname or url}) is unreachable, so model {repo_id!r} cannot be downloaded "
            f"(and it is not in the local cache {hub.cache_hint()}); pass a local model folder or .gguf file instead"
        )
    path = hub.download(repo_id, revision)
    if not (path / "config.json").is_file():
        raise HubError(f"{hub.name} repo {repo_id!r} has no config.json: not a transformers model repo")
    if not _complete(path):
        raise HubError(
            f"{hub.name} repo {repo_id!r} has no *.safetensors weights (dashchat does not load .bin/.pth); "
            "convert it to safetensors or pass a .gguf file"
        )
    return path


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Does `url` answer an HTTP request (any status) within `timeout`, DNS and TLS included?

    HTTP rather than a bare TCP connect: sandboxes and firewalls often accept every connection and
    then never answer. urllib honours the usual *_PROXY variables, like the hub libraries do.
    """
    ok = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.set()
        except urllib.error.HTTPError:  # the server answered: reachable
            ok.set()
        except Exception:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return ok.is_set()


def _url(endpoint: str) -> str:
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _Hub:
    name = ""
    offline_var = ""

    def offline(self) -> bool:
        return os.environ.get(self.offline_var, "").strip().lower() in _TRUE

    def cache_hint(self) -> str:
        raise NotImplementedError

    def endpoint(self) -> str:
        raise NotImplementedError

    def local(self, repo_id: str, revision: str | None) -> Path | None:
        raise NotImplementedError

    def download(self, repo_id: str, revision: str | None) -> Path:
        raise NotImplementedError


class _HuggingFace(_Hub):
    name = "Hugging Face"
    offline_var = "HF_HUB_OFFLINE"

    @staticmethod
    def cache() -> str | None:
        # Read now, not at huggingface_hub import time, so a changed environment is honoured.
        env = os.environ
        if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
            return env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        return os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None

    def cache_hint(self) -> str:
        return self.cache() or "~/.cache/huggingface/hub"

    def endpoint(self) -> str:
        return _url(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")

    def _snapshot(self, repo_id: str, revision: str | None, local_only: bool) -> Path:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=self.cache(),
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                local_files_only=local_only,
                etag_timeout=10,
            )
        )

    def local(self, repo_id: str, revision: str | None) -> Path | None:
        try:
            return self._snapshot(repo_id, revision, local_only=True)
        except ImportError:
            raise HubError("hub ids need huggingface_hub: pip install huggingface_hub") from None
        except Exception:  # not cached (or a bad id): the online path reports it properly
            return None

    def download(self, repo_id: str, revision: str | None) -> Path:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return self._snapshot(repo_id, revision, local_only=False)
        except GatedRepoError:
            raise HubError(f"Hugging Face repo {repo_id!r} is gated: accept its license and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise HubError(f"Hugging Face repo {repo_id!r} not found (or private: set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise HubError(f"revision {revision!r} of Hugging Face repo {repo_id!r} not found") from None
        except Exception as e:
            raise HubError(f"downloading {repo_id!r} from Hugging Face failed: {_first_line(e)}") from None


class _ModelScope(_Hub):
    name = "ModelScope"
    offline_var = "MODELSCOPE_OFFLINE"

    def cache_hint(self) -> str:
        return os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope"

    def endpoint(self) -> str:
        env = os.environ
        return _url(env.get("MODELSCOPE_ENDPOINT") or env.get("MODELSCOPE_DOMAIN") or "https://modelscope.cn")

    def _snapshot(self, repo_id: str, revision: str | None, local_only: bool) -> Path:
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise HubError("--use-modelscope needs modelscope: pip install modelscope") from None
        kwargs = {"revision": revision} if revision else {}
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=os.environ.get("MODELSCOPE_CACHE") or None,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
                local_files_only=local_only,
                **kwargs,
            )
        )

    def local(self, repo_id: str, revision: str | None) -> Path | None:
        try:
            return self._snapshot(repo_id, revision, local_only=True)
        except HubError:
            raise
        except Exception:
            return None

    def download(self, repo_id: str, revision: str | None) -> Path:
        try:
            return self._snapshot(repo_id, revision, local_only=False)
        except HubError:
            raise
        except Exception as e:
            raise HubError(f"downloading {repo_id!r} from ModelScope failed: {_first_line(e)}") from None
