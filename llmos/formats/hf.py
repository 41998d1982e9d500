"""Hugging Face model directories: config.json, safetensors weights, tokenizer, generation_config.json.

    llmos run path/to/dir                       # read
    llmos export MODEL --to hf OUT --dtype bf16   # write

Reads Llama, Mistral and Qwen2 directories as transformers saves them (model.safetensors,
shards with an index, or pytorch_model.bin) and writes directories transformers and vLLM load:

    config.json             transformers 5 keys (rope_parameters) plus the older rope_theta/rope_scaling
    model.safetensors       or model-0000i-of-0000n.safetensors + index above SHARD_BYTES
    generation_config.json  bos/eos ids and sampling defaults
    llmos_config.json       llmos's resolved Config, for people; reading uses config.json
    tokenizer.json, ...     when the checkpoint has a tokenizer (Tokenizer.save_hf)

Decisions:
- The tokenizer: tokenizer.json, else a SentencePiece tokenizer.model, else vocab.json + merges.txt. A directory
  without any reads with tokenizer None; whoever needs one says so.
- llmos has no sliding-window attention, so a model whose window is shorter than its
  context (Mistral 7B v0.1) gets max_seq_len = the window: exact inside it, refused beyond.
- write() builds `OUT.tmp-<pid>` and renames it to OUT, replacing OUT only when it is empty
  or holds llmos_config.json (an earlier llmos export); anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from llmos.errors import LlmosError
from llmos.files import atomic_write
from llmos.formats.checkpoint import Checkpoint, expected_shapes
from llmos.model import Config
from llmos.tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
DEFAULTS = {  # transformers' defaults for the keys a config.json may leave out
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, max_window_layers=28),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHORT_NAMES = {v: k for k, v in DTYPES.items()}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
SHARD_BYTES = 2 * 1024**3
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")

# ----------------------------------------------------------------------------
# Names: transformers' parameter names ↔ llmos's

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
    "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2",
}
TOP_NAMES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "head"}
HF_LAYER_NAMES, HF_TOP_NAMES = ({v: k for k, v in names.items()} for names in (LAYER_NAMES, TOP_NAMES))


def to_llmos(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")  # kind: weight or bias
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m[2] in LAYER_NAMES:
        return f"layers.{m[1]}.{LAYER_NAMES[m[2]]}.{kind}"
    return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None


def to_hf(name: str) -> str:
    stem, _, kind = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", stem)
    return f"model.layers.{m[1]}.{HF_LAYER_NAMES[m[2]]}.{kind}" if m else f"{HF_TOP_NAMES[stem]}.{kind}"


# ----------------------------------------------------------------------------
# Reading


def read(path, weights: bool = True) -> Checkpoint:
    """weights=False: shapes and dtypes from the files' headers are checked, no tensor is loaded."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LlmosError(f"{path}: no config.json here; pass a Hugging Face model directory")
    hf = read_json(path / "config.json")
    cfg, arch = config_from_hf(hf, path / "config.json")
    tensors, files = load_tensors(path, weights)
    state_dict = match_weights(tensors, cfg, path)
    snap = path.resolve()  # in the Hugging Face cache: .../models--org--name/snapshots/<commit>
    in_cache = snap.parent.name == "snapshots" and snap.parent.parent.name.startswith("models--")
    repo = snap.parent.parent.name.removeprefix("models--").replace("--", "/", 1) if in_cache else None
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    meta = {
        "format": "hf",
        "path": str(path),
        "file_size": sum(f.stat().st_size for f in files),
        "tensor_types": dict(Counter(SHORT_NAMES.get(t.dtype, str(t.dtype)) for t in state_dict.values())),
        "name": repo or snap.name,
        "architecture": arch,
        "eos_token_ids": [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
        "generation": {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None},
    }
    card = (path / "README.md").read_text(errors="replace")[:4000] if (path / "README.md").is_file() else ""
    if m := re.search(r"^license:\s*(\S+)", card, re.M):  # the model card's front matter, as the Hub writes it
        meta["license"] = m[1]
    if repo:
        meta["base_model"] = repo
    return Checkpoint(cfg, state_dict if weights else {}, load_tokenizer(path), meta)


def config_from_hf(hf: dict, where) -> tuple[Config, str]:
    """config.json → (Config, architecture); refuses what llmos would compute differently."""
    name = (hf.get("architectures") or [None])[0]
    kind = ARCHITECTURES.get(name) if name else hf.get("model_type")
    if kind not in DEFAULTS:
        raise LlmosError(f"{where}: architecture {name or hf.get('model_type')!r} is not supported; "
                         f"llmos reads {', '.join(ARCHITECTURES)}")
    c = {**DEFAULTS[kind], **hf}
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias") or (kind != "qwen2" and c.get("attention_bias")):
        raise LlmosError(f"{where}: hidden_act other than silu, MLP biases and output-projection biases are not "
                         "supported; this is not a standard Llama-family checkpoint")
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})  # 5.x keeps theta inside, 4.x beside
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = rope["rope_type"] = rope.get("rope_type") or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or rope_type not in ("default", "linear", "llama3"):
        raise LlmosError(f"{where}: rope {rope} is not supported; llmos supports default, linear and llama3 rope")
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    try:
        cfg = Config(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"),
            hidden_dim=c["intermediate_size"], head_dim=c.get("head_dim"),
            max_seq_len=min(c["max_position_embeddings"], sliding_window(c, kind) or 1 << 62),
            norm_eps=float(c["rms_norm_eps"]), rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2",
        )
    except KeyError as e:
        raise LlmosError(f"{where}: config.json has no {e.args[0]}; the file is incomplete")
    except (ValueError, TypeError) as e:
        raise LlmosError(f"{where}: {e}; the config is inconsistent")
    return cfg, "qwen2" if kind == "qwen2" else "llama"


def sliding_window(c: dict, kind: str) -> int | None:
    """The attention window transformers would use (Mistral always, Qwen2 on its sliding layers)."""
    if kind == "qwen2" and c.get("use_sliding_window"):
        n, first = c["num_hidden_layers"], c.get("max_window_layers") or 0
        types = c.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return c.get("sliding_window") if "sliding_attention" in types else None
    return c.get("sliding_window") if kind == "mistral" else None


def load_tensors(path: Path, weights: bool = True) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of the directory's weight files, by transformers name, in their stored dtype.
    weights=False: meta-device stand-ins of the same shape and dtype, from the safetensors headers."""
    index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (path / n).is_file()), None)
    if index:
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
    else:
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
    if not names:
        raise LlmosError(f"{path}: no model.safetensors, shard index or pytorch_model.bin; the weights are missing")
    tensors, files = {}, [path / n for n in names]
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(f, framework="pt") as sf:
                    tensors.update({k: sf.get_tensor(k) if weights else stand_in(sf.get_slice(k)) for k in sf.keys()})
            else:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except FileNotFoundError:
            raise LlmosError(f"{f}: missing, though {index.name} names it; download the model again")
        except Exception as e:  # safetensors, pickle and zip each raise their own type for a damaged file
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LlmosError(f"{f}: cannot read weights ({why}); the file is truncated or corrupt, download it again")
    return tensors, files


def read_tensor_file(file) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file that is not a whole model (a reward head, an embedding model)."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise LlmosError(f"{file}: missing; the model folder is incomplete") from None
    except Exception as e:  # safetensors raises its own type for a damaged file
        raise LlmosError(f"{file}: cannot read weights ({str(e).strip() or type(e).__name__}); the file is truncated or corrupt") from None


def write_tensor_file(file, tensors: dict[str, torch.Tensor]) -> None:
    """One .safetensors file of float32 CPU tensors, written atomically."""
    flat = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(file, lambda f: f.write(save(flat, metadata={"format": "pt"})))


def stand_in(t) -> torch.Tensor:
    """A safetensors slice as an empty meta tensor: its shape and dtype, no data read."""
    return torch.empty(t.get_shape(), dtype=SAFETENSORS_DTYPES.get(t.get_dtype(), torch.uint8), device="meta")


def match_weights(tensors: dict, cfg: Config, where) -> dict[str, torch.Tensor]:
    """Rename to llmos names and check every tensor against the shapes the config implies."""
    expected = expected_shapes(cfg)
    state_dict = {}
    for hf_name, t in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a buffer transformers recomputes; a head tied to the embedding
        name = to_llmos(hf_name)
        if name not in expected:
            raise LlmosError(f"{where}: unexpected tensor {hf_name}; the config does not describe it, "
                             "so the config does not match the weights")
        if tuple(t.shape) != expected[name]:
            raise LlmosError(f"{where}: config.json implies {hf_name} is {list(expected[name])} but the weights "
                             f"have {list(t.shape)}; the config does not match the weights")
        if not t.is_floating_point():
            raise LlmosError(f"{where}: {hf_name} is {t.dtype}; quantized Hugging Face checkpoints are not supported")
        state_dict[name] = t
    missing = sorted(expected.keys() - state_dict.keys())
    if missing:
        raise LlmosError(f"{where}: missing tensor {to_hf(missing[0])} ({len(missing)} missing in all); "
                         "the weights are incomplete or the config does not match them")
    return state_dict


def load_tokenizer(path: Path):
    """tokenizer.json, a SentencePiece tokenizer.model (Llama 2-style repositories ship only that) or
    vocab.json + merges.txt, as Tokenizer.from_hf_dir reads them; None when the directory has none."""
    names = ("tokenizer.json", "tokenizer.model")
    if not (any((path / n).is_file() for n in names) or (path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
        return None
    return Tokenizer.from_hf_dir(path)


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LlmosError(f"{file}: not valid JSON ({e}); the download is incomplete or the file was edited")


# ----------------------------------------------------------------------------
# Writing


def write(ckpt: Checkpoint, out_dir, dtype: str = "bf16") -> None:
    if dtype not in DTYPES:
        raise LlmosError(f"dtype {dtype!r} cannot be written to a Hugging Face directory; use {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "llmos_config.json").is_file())):
        raise LlmosError(f"{out}: already exists and was not written by llmos; choose another output path or remove it")
    tmp, old = out.with_name(f"{out.name}.tmp-{os.getpid()}"), out.with_name(f"{out.name}.old-{os.getpid()}")
    tmp.mkdir(parents=True)  # a failed write removes it, so it cannot be left over from this process
    try:
        write_files(ckpt, tmp, DTYPES[dtype])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)  # the earlier export goes only once the new one is complete
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_files(ckpt: Checkpoint, out: Path, dtype: torch.dtype) -> None:
    cfg, tok, meta = ckpt.config, ckpt.tokenizer, ckpt.meta
    eos_ids = list(meta.get("eos_token_ids") or (tok.eos_ids if tok else []))
    bos, pad = (tok.bos_id, tok.pad_id) if tok else (None, None)
    eos = tok.eos_id if tok and tok.eos_id is not None else next(iter(eos_ids), None)
    save_weights({to_hf(k): v for k, v in ckpt.state_dict.items()}, out, dtype)
    dump(out / "config.json", config_to_hf(cfg, dtype, bos, eos, pad))
    gen = {"bos_token_id": bos, "eos_token_id": eos_ids or eos, "pad_token_id": pad}
    dump(out / "generation_config.json", {**gen, **meta.get("generation", {})})
    dump(out / "llmos_config.json", cfg.to_dict())
    if meta.get("license") or meta.get("name"):
        (out / "README.md").write_text(model_card(meta))
    if tok is not None:
        tok.save_hf(out)


def model_card(meta: dict) -> str:
    """A minimal model card: front matter the Hub (and read() above) takes the license from, and the source.
    The Hub wants a license id there; other license text (a URL, a sentence) goes as `other` plus the text."""
    lic, name, base = str(meta.get("license") or "").strip(), meta.get("name"), meta.get("base_model")
    is_id = re.fullmatch(r"[\w.+-]+", lic)
    front = [f"license: {lic if is_id else 'other'}"] * bool(lic)
    body = [f"# {name}", ""] * bool(name) + [f"Converted by llmos from {Path(meta.get('path') or 'a checkpoint').name}."]
    if lic and not is_id:
        body += ["", f"License: {lic}"]
    if base:  # set when the source came from the Hugging Face cache: a repository id, as the Hub wants
        front.append(f"base_model: {base}")
    return "\n".join(["---", *front, "tags:", "- llmos", "---", "", *body]) + "\n"


def config_to_hf(cfg: Config, dtype: torch.dtype, bos, eos, pad) -> dict:
    arch = "qwen2" if cfg.qkv_bias else "llama"
    scaling = dict(cfg.rope_scaling or {})
    scaling["rope_type"] = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    hf = dict(
        architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], model_type=arch,
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={**scaling, "rope_theta": cfg.rope_theta},  # transformers 5
        rope_theta=cfg.rope_theta,  # transformers 4 and the tools built on it
        rope_scaling=scaling if scaling["rope_type"] != "default" else None,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        dtype=str(dtype).removeprefix("torch."), torch_dtype=str(dtype).removeprefix("torch."), use_cache=True,
    )
    if arch == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def save_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> None:
    """One model.safetensors, or shards of at most SHARD_BYTES with the index transformers reads."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # copy=True: tensors that share storage (views of one buffer) cannot be saved as they are
        save_file({n: tensors[n].detach().to("cpu", dtype, copy=True).contiguous() for n in names},
                  out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(t.numel() * dtype.itemsize for t in tensors.values())
        dump(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def dump(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")
