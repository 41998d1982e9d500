"""A model name → a Runner: the one path every command, the server, training and the benchmarks load models by.

    runner = load("smollm2")                   # engine "auto", device "cpu"
    runner.config, runner.tokenizer            # the model's Config and Tokenizer (None for a file without one)
    runner.defaults                            # SamplingParams: llmos's, overridden by generation_config.json
    runner.model                               # the Transformer, or None when the fast decoder runs alone
    runner.decoder                             # a llmos.fast Decoder, a CUDA-graph decoder, or None (PyTorch path)

Three decisions are made here and nowhere else:

    resolve             a name to a file (llmos/registry.py: bundled names, paths, the Hugging Face cache)
    backend()           what runs it: "fast" (C++ CPU kernels, one sequence at a time), "cuda-graph"
                        (the model's own blocks replayed as a CUDA graph) or "torch" (the PyTorch model, batches)
    generation_defaults()   the sampling defaults: SamplingParams' own, then the model's generation config

Which backend: --engine torch, training, batches of several sequences, speculative decoding and
--gpu-layers run the PyTorch model; on a GPU the CUDA-graph decoder; on the CPU the fast decoder when its
C++ kernels build (auto falls back to PyTorch with a one-line note; --engine fast insists). A GGUF file of
Q8_0/Q4_0/Q4_1/Q4_K blocks then goes into the kernels as stored with no float copy of the weights (no
model); other files are loaded as a model whose tensors the decoder shares or packs.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from llmos import fast, graphs, kernels, quant, registry
from llmos.errors import LlmosError
from llmos.formats import Checkpoint, gguf, quantized, read_checkpoint
from llmos.model import Config, Transformer
from llmos.sampling import SamplingParams
from llmos.tokenizer import Tokenizer

ENGINES = ("auto", "fast", "torch")
PRECISIONS = ("f32", "f16", "bf16", "int8", "int4")
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Runner:
    name: str
    checkpoint: Checkpoint  # config, tokenizer and facts about the file; its state dict is handed to the model
    model: Transformer | None  # None when the fast decoder runs alone (one sequence, no float copy)
    decoder: object | None  # fast.Decoder | graphs.GraphDecoder | None (the PyTorch model path)
    backend: str  # "fast" | "cuda-graph" | "torch"
    defaults: SamplingParams

    @property
    def config(self) -> Config:
        return self.checkpoint.config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.checkpoint.tokenizer

    @property
    def meta(self) -> dict:
        return self.checkpoint.meta

    @property
    def eos_ids(self) -> list[int]:
        return list(self.meta.get("eos_token_ids") or [])



# ----------------------------------------------------------------------------
# The decisions: backend and generation defaults


def backend(engine: str = "auto", device: str = "cpu", *, batch: int = 1, train: bool = False, draft: bool = False,
            gpu_layers=None) -> str:
    """What runs a model: "fast", "cuda-graph" or "torch" (see the module docstring). "auto" asks whether the
    kernels build here (kernels.load() says on stderr why not, once); "fast" refuses where they cannot."""
    if engine not in ENGINES:
        raise LlmosError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    whole_model = train or batch != 1 or draft or gpu_layers is not None
    if engine == "fast" and whole_model:
        what = ("training" if train else "batches" if batch != 1 else "speculative decoding" if draft else "--gpu-layers")
        raise LlmosError(f"--engine fast runs one sequence on the CPU; {what} needs the PyTorch model: drop --engine fast")
    if engine == "torch" or whole_model:
        return "torch"
    if device != "cpu":
        return "cuda-graph"
    if engine == "fast":
        with contextlib.redirect_stderr(io.StringIO()):  # the error below says it all
            ext = kernels.load()
        if ext is None:
            raise LlmosError(f"--engine fast needs the C++ kernels, which could not be built ({kernels.why_not()}); "
                             "install g++ or use --engine torch")
        return "fast"
    return "fast" if kernels.load() is not None else "torch"


def with_overrides(defaults: SamplingParams, **given) -> SamplingParams:
    """`defaults` overridden by the values given (None means not given), checked."""
    params = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    params.validate()
    return params


def generation_defaults(meta: dict) -> SamplingParams:
    """SamplingParams' defaults, overridden by the model's generation_config.json (meta["generation"]):
    its temperature, top_p, top_k, min_p and repetition_penalty, and do_sample=false meaning greedy."""
    generation = meta.get("generation") or {}
    given = {k: generation[k] for k in GENERATION_KEYS if generation.get(k) is not None}
    if generation.get("do_sample") is False:
        given["temperature"] = 0.0  # transformers' greedy decoding
    params = SamplingParams(**given)
    try:
        params.validate()
    except LlmosError as e:
        raise LlmosError(f"{meta.get('path', 'the model')}: generation_config.json: {e}") from None
    return params


# ----------------------------------------------------------------------------
# load: a name to a runner


def load(name, engine: str = "auto", device: str = "cpu", *, precision=None, group_size: int | None = None,
         batch: int = 1, draft: bool = False, gpu_layers=None, tokenizer: bool = True) -> Runner:
    """The runner for a model name (llmos/registry.py explains names).

    precision: f32 | f16 | bf16 (a torch.dtype too), or int8 | int4 (quantized after loading, or a `llmos quantize`
    directory as stored); None: float32 on the CPU, bfloat16 on CUDA. batch > 1, draft and gpu_layers ask for the
    PyTorch model (see backend). tokenizer=True refuses a model without one (a benchmark needs none)."""
    device = check_device(device)
    if isinstance(precision, str) and precision not in PRECISIONS + ("float32", "float16", "bfloat16"):
        raise LlmosError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    kind = backend(engine, device, batch=batch, draft=draft, gpu_layers=gpu_layers)
    path = registry.resolve(name)
    label = str(name or "default")
    runner = None
    if kind == "fast" and batch == 1 and precision is None:
        runner = load_packed(path, label)  # a quantized GGUF: its blocks, no float model
    if runner is None:
        model, ckpt = load_model(path, device, precision, group_size)
        runner = Runner(label, ckpt, model, None, kind, generation_defaults(ckpt.meta))
        if kind != "torch":
            runner.decoder = decoder_for(model, ckpt, kind, engine)
            runner.backend = "torch" if runner.decoder is None else kind
    if tokenizer and runner.tokenizer is None:
        raise LlmosError(f"{runner.meta.get('path', name)}: the model has no tokenizer; put tokenizer.json or tokenizer.model "
                         "(or tokenizer.bin for llama2.c) beside it")
    return runner


def load_packed(path: Path, name: str) -> Runner | None:
    """A runner with the fast decoder alone for a GGUF file of kernel blocks, or None for other files."""
    if path.suffix.lower() != ".gguf":
        return None
    opened = gguf.open_gguf(path)  # parsed once for both: the fields of a 49k vocabulary hold ~64 MB
    ckpt = gguf.read(path, weights=False, opened=opened)
    if not fast.file_quant(ckpt.meta):
        return None
    cfg, weights, _ = fast.pack_gguf(path, opened, tokenizer=False)
    del opened
    quant.release_memory()  # the parsed metadata's heap goes back to the system
    return Runner(name, ckpt, None, fast.Decoder(cfg, weights), "fast", generation_defaults(ckpt.meta))


def decoder_for(model: Transformer, ckpt: Checkpoint | None, kind: str, engine: str = "auto"):
    """The decoder of a loaded model for backend `kind`: the CUDA-graph decoder, or the fast decoder from the
    file's own blocks (a quantized GGUF or `llmos quantize` directory) or sharing the model's float tensors.
    None (with a note) when engine is auto and the kernels cannot take the model's layout."""
    if kind == "cuda-graph":
        return graphs.GraphDecoder(model)
    meta = getattr(ckpt, "meta", None) or {}  # a model built in memory has no file
    path = meta.get("path")
    try:
        if meta.get("format") == "gguf" and fast.file_quant(meta) and path:
            return fast.decoder_from_gguf(path)[0]
        if path and quantized.is_quantized_dir(path):
            return fast.decoder_from_quantized(path)[0]
        return fast.decoder(model, quant=None)
    except LlmosError as e:  # a layout the kernels cannot take: the model path still runs it
        if engine == "fast":
            raise
        print(f"llmos: the fast CPU decoder cannot run this model ({e}); using the slower PyTorch path", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------
# The PyTorch model at a precision


def load_model(path: Path, device: str = "cpu", precision=None, group_size: int | None = None) -> tuple[Transformer, Checkpoint]:
    """(model, checkpoint with an empty state dict) at a precision. Converts and quantizes one tensor at a time
    and drops the float state dict, so the peak is the file as read (llmos.planner counts it so)."""
    if quantized.is_quantized_dir(path):
        stored = json.loads((Path(path) / "config.json").read_text())["quantization_config"].get("scheme")
        if precision in quant.SCHEMES and precision != stored:
            raise LlmosError(f"{path}: quantized to {stored}; it runs as {stored} only (quantize the float model to get {precision})")
        return load_quantized(path, device, None if precision == stored else precision)  # else: the compute dtype
    ckpt = read_checkpoint(path)
    scheme = precision if precision in quant.SCHEMES else None
    if scheme:
        quant.check_scheme(scheme, group_size)
    dtype = parse_dtype("f32" if scheme else precision, device)
    sd = ckpt.state_dict
    for k in list(sd):  # one at a time, so the old copy is freed before the next is made
        sd[k] = sd[k].to(dtype)
    model = build_model(ckpt, device, dtype)
    if scheme:
        ckpt.state_dict = {}  # the model now holds the only reference: quantizing frees each float weight
        del sd
        quant.quantize_model(model, scheme, group_size)
    quant.release_memory()
    return model, ckpt


def load_quantized(path, device: str = "cpu", dtype=None) -> tuple[Transformer, Checkpoint]:
    """(Transformer with Int8/Int4Linear layers, checkpoint) from a `llmos quantize` directory; the packed
    kernels are made for `device`. dtype: compute dtype (default bfloat16)."""
    device = check_device(device)
    dtype = parse_dtype(dtype or "bf16", device)
    ckpt, named, q = quantized.read_quantized(path)
    layers, floats = quantized.split_quantized(named, q, ckpt.config, path)
    with no_init():  # the float weights of swapped layers are never touched, so cost no memory
        model = Transformer(ckpt.config)
    for i, stem in enumerate(list(layers), 1):  # popped: each stored copy is freed once its kernel layout exists
        bias = floats.pop(f"{stem}.bias", None)
        # copies: safetensors hands out views of the mapped file, which would keep every page
        # read (the stored int4 weights too) resident for as long as one view lives
        t = {k: v.to(device, copy=True) for k, v in layers.pop(stem).items()}
        parent, _, leaf = stem.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                quant.make_linear(t, q["scheme"], q.get("group_size"), None if bias is None else bias.to(device, dtype)))
        if i % quant.TRIM_EVERY == 0:
            quant.release_memory(collect=False)
    floats = {k: v.to(device, dtype, copy=True) for k, v in floats.items()}
    missing, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith((".qweight", ".scales", ".scales_and_zeros", ".bias"))]
    assert not missing and not unexpected, (missing, unexpected)  # split_quantized checked the names
    model = model.to(device=device, dtype=dtype).eval()
    del layers, floats, named
    quant.release_memory()
    return model, ckpt


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
        problems = [f"missing {registry.short(missing)}"] * bool(missing) + [f"unexpected {registry.short(unexpected)}"] * bool(unexpected)
        problems += [f"wrong shapes {registry.short(wrong)}"] * bool(wrong)
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
