"""Weight-only int8/int4: the kernels against the dequantized weight, the error against the float
weight, whole models against their dequantized twins, files round trip, bad input.

    OMP_NUM_THREADS=1 pytest tests/test_quant.py -q
"""

import copy
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from llmos import quant
from llmos.errors import LlmosError
from llmos.formats import Checkpoint
from llmos.model import Config, Transformer
from llmos import loader
from llmos.formats import quantized
from llmos.cli import cmd_quantize
from conftest import load_precision, tiny_config, tiny_model


def tiny(**kw) -> Config:
    return tiny_config(**({"vocab_size": 96, "dim": 64, "hidden_dim": 128} | kw))


def model_of(cfg, seed=0) -> Transformer:
    m = tiny_model(seed, **cfg.to_dict())
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # norms away from 1, so a wrong norm path shows
                p.uniform_(0.5, 1.5)
    return m


def assert_close(a, b, atol, rtol):
    """|a - b| <= atol + rtol |b| everywhere (torch.testing.assert_close costs seconds on first use)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    excess = ((a - b).abs() - atol - rtol * b.abs()).max().item()
    assert excess <= 0, f"off by up to {excess} beyond the tolerance"


def dequantized_twin(model, scheme, group_size=32):
    """The float model whose linear weights are exactly what the quantized kernels multiply by."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in twin.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "head":
                m.weight.copy_(quant.dequantize_weight(quant.quantize_weight(m.weight, scheme, group_size), scheme, group_size))
    return twin


@torch.no_grad()
def greedy(model, prompt, n):
    cache = model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache)[:, -1]
    return out


# ----------------------------------------------------------------------------
# The arithmetic, worked by hand


def test_int8_by_hand():
    w = torch.tensor([[-1.27, 0.5, 1.27, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = quant.quantize_weight(w, "int8")
    assert t["qweight"].dtype == torch.int8 and t["scales"].dtype == torch.bfloat16
    # scale = 1.27 / 127 = 0.01, rounded to bfloat16 0.010009765625; 0.5 / that = 49.95 -> 50
    assert t["scales"][0].item() == 0.010009765625
    assert t["qweight"][0].tolist() == [-127, 50, 127, 0]
    assert t["qweight"][1].tolist() == [0, 0, 0, 0]  # an all-zero row stays zero (no division by zero)
    assert torch.equal(quant.dequantize_weight(t, "int8")[1], torch.zeros(4))


def test_int4_by_hand():
    # One group spanning 0 .. 3.75 in steps of 0.25: scale 0.25, zero (the value of q = 8) 2.0, exact.
    w = (torch.arange(32) % 16 * 0.25)[None].repeat(16, 1)
    t = quant.quantize_weight(w, "int4", 32)
    assert t["qweight"].shape == (16, 16) and t["qweight"].dtype == torch.uint8
    assert t["scales"][0, 0].item() == 0.25 and t["zeros"][0, 0].item() == 2.0
    assert quant.unpack_int4(t["qweight"])[0].tolist() == list(range(16)) * 2
    assert torch.equal(quant.dequantize_weight(t, "int4", 32), w)


def test_int4_packing_layout():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert quantized.pack_int4(q).tolist() == [[0x12, 0xF0]]  # column 2j in the high nibble
    r = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quantized.pack_int4(r)), r)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantization_error_within_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3  # rows of different ranges
    t8 = quant.quantize_weight(w, "int8")
    step8 = t8["scales"].float()[:, None]
    assert ((w - quant.dequantize_weight(t8, "int8")).abs() <= step8 * 0.5 * (1 + 2**-7)).all()
    t4 = quant.quantize_weight(w, "int4", group_size)
    err = (w - quant.dequantize_weight(t4, "int4", group_size)).reshape(48, -1, group_size).abs()
    s, z = t4["scales"].float()[..., None], t4["zeros"].float()[..., None]
    # half a step, plus what rounding the scale and zero to bfloat16 moves the grid's ends
    assert (err <= 0.5 * s + (z.abs() + 8 * s) * 2**-8).all()
    assert err.mean() < 0.3 * s.mean()  # and not everything at the bound


# ----------------------------------------------------------------------------
# Modules against the float reference


@pytest.mark.parametrize("scheme,group_size,shape", [
    ("int8", None, (48, 64)), ("int8", None, (5, 36)),  # 36: not a multiple of 8, no kernel
    ("int4", 32, (48, 128)), ("int4", 64, (48, 128)), ("int4", 128, (32, 128)),
    ("int4", 32, (40, 64)),  # 40 rows: not a multiple of 16, our own packing
])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_dequantized_weight(scheme, group_size, shape, bias):
    torch.manual_seed(1)
    w, b = torch.randn(*shape), torch.randn(shape[0]) if bias else None
    t = quant.quantize_weight(w, scheme, group_size or 32)
    layer = quant.make_linear(t, scheme, group_size, b)
    x = torch.randn(2, 3, shape[1])
    ref = F.linear(x, quant.dequantize_weight(t, scheme, group_size or 32), b)
    assert layer(x).shape == (2, 3, shape[0])
    assert_close(layer(x), ref, atol=2e-5, rtol=1e-5)
    # against the original float weight: the error is the quantization error and no more
    exact = F.linear(x, w, b)
    step = t["scales"].float().max().item()
    assert (layer(x) - exact).abs().max() <= 0.6 * step * x.abs().sum(-1).max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_activations(scheme):
    torch.manual_seed(2)
    w, x = torch.randn(64, 128), torch.randn(4, 128)
    t = quant.quantize_weight(w, scheme, 32)
    layer = quant.make_linear({k: v for k, v in t.items()}, scheme, 32).to(torch.bfloat16)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = x.to(torch.bfloat16).float() @ quant.dequantize_weight(t, scheme, 32).T
    assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_kernel_layout_chosen():
    t8 = quant.quantize_weight(torch.randn(16, 64), "int8")
    assert quant.Int8Linear(t8).kernel == quant.HAS_INT8_CPU
    assert quant.Int4Linear(quant.quantize_weight(torch.randn(32, 64), "int4", 32), 32).layout == (
        "cpu" if quant.HAS_INT4_CPU else "ref")
    assert quant.Int4Linear(quant.quantize_weight(torch.randn(24, 64), "int4", 32), 32).layout == "ref"


# ----------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_model_equals_its_dequantized_twin(scheme, kw):
    float_model = model_of(tiny(**kw))
    twin = dequantized_twin(float_model, scheme)
    q = quant.quantize_model(copy.deepcopy(float_model), scheme, 32 if scheme == "int4" else None, dtype=torch.float32)
    n_swapped = sum(isinstance(m, (quant.Int8Linear, quant.Int4Linear)) for m in q.modules())
    assert n_swapped == 7 * 2 and quant.quantization_of(q)["scheme"] == scheme
    tokens = torch.tensor([[1, 5, 9, 33, 2, 70, 4]])
    with torch.no_grad():
        assert_close(q(tokens), twin(tokens), atol=1e-4, rtol=1e-4)
        # and near the float model: quantization moves logits, it does not scramble them
        ref = float_model(tokens)
        assert (q(tokens) - ref).abs().max() < {"int8": 0.005, "int4": 0.05}[scheme] * ref.abs().max()
    prompt = [3, 14, 15, 92, 65]
    assert greedy(q, prompt, 12) == greedy(twin, prompt, 12)


def test_bfloat16_model_runs_and_stays_close():
    float_model = model_of(tiny())
    q = quant.quantize_model(copy.deepcopy(float_model), "int4", 32)  # default: bfloat16 compute
    assert q.embed.weight.dtype == torch.bfloat16 and q.new_cache(1, 4).k.dtype == torch.bfloat16
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        ref = float_model(tokens)
        assert (q(tokens).float() - ref).abs().max() < 0.05 * ref.abs().max()


# ----------------------------------------------------------------------------
# Files


def write_float_dir(tmp_path, cfg, seed=0):
    from llmos.formats import hf

    m = model_of(cfg, seed)
    out = tmp_path / "float"
    hf.write(Checkpoint(cfg, m.state_dict(), None, {"eos_token_ids": [2]}), out, "f32")
    return m, out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_load_round_trip_is_exact(tmp_path, scheme):
    cfg = tiny(qkv_bias=True)
    m = model_of(cfg)
    tensors = quant.quantize_state_dict(m.state_dict(), cfg, scheme, 32, dtype=torch.float32)
    info = {"scheme": scheme, "group_size": 32 if scheme == "int4" else None}
    quantized.write_quantized(Checkpoint(cfg, {}, None, {"eos_token_ids": [2]}), tensors, tmp_path / "q", info)
    assert quantized.is_quantized_dir(tmp_path / "q")
    ckpt, named, q = quantized.read_quantized(tmp_path / "q")
    assert q["scheme"] == scheme and ckpt.config == cfg and ckpt.meta["eos_token_ids"] == [2]
    assert named.keys() == tensors.keys()
    assert all(torch.equal(named[k], tensors[k]) and named[k].dtype == tensors[k].dtype for k in tensors)

    loaded, _ = loader.load_quantized(tmp_path / "q", dtype="f32")
    direct = quant.quantize_model(copy.deepcopy(m), scheme, info["group_size"], dtype=torch.float32)
    tokens = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens), direct(tokens))
    # the float view (for show and export) holds exactly the dequantized weights
    flat = quantized.read_dequantized(tmp_path / "q")
    w = flat.state_dict["layers.1.mlp.w2.weight"]
    assert torch.equal(w, quant.dequantize_weight(quant.quantize_weight(m.layers[1].mlp.w2.weight, scheme, 32), scheme, 32))
    assert flat.meta["quantization"]["scheme"] == scheme and flat.meta["tensor_types"][scheme] == 14
    header_only = quantized.read_dequantized(tmp_path / "q", weights=False)  # for llmos show: no tensor read
    assert header_only.state_dict == {} and header_only.meta["tensor_types"] == flat.meta["tensor_types"]


def test_quantize_command_and_load_precision(tmp_path, capsys):
    m, src = write_float_dir(tmp_path, tiny())
    out = tmp_path / "q4"
    assert cmd_quantize(Namespace(model=str(src), out=str(out), to="int4", group_size=64)) == 0
    assert "groups of 64" in capsys.readouterr().out
    model, tok, ckpt = load_precision(str(out))
    assert quant.quantization_of(model) == {"scheme": "int4", "group_size": 64}
    assert model.embed.weight.dtype == torch.bfloat16 and tok is None
    # quantizing in memory after loading the float directory gives the same model
    again, _, _ = load_precision(str(src), "int4", group_size=64)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
    floaty, _, _ = load_precision(str(src), "bf16")
    assert floaty.embed.weight.dtype == torch.bfloat16 and quant.quantization_of(floaty) is None
    # a quantized directory is refused as a source, and cannot be loaded at another precision
    with pytest.raises(LlmosError, match="already quantized"):
        cmd_quantize(Namespace(model=str(out), out=str(tmp_path / "again"), to="int8", group_size=None))
    with pytest.raises(LlmosError, match="quantized to int4; it runs as int4 only"):
        load_precision(str(out), "int8")


def test_existing_foreign_output_is_refused(tmp_path):
    _, src = write_float_dir(tmp_path, tiny())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(LlmosError, match="already exists and was not written by llmos"):
        cmd_quantize(Namespace(model=str(src), out=str(tmp_path / "taken"), to="int8", group_size=None))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------
# Bad input


def test_already_quantized_model():
    q = quant.quantize_model(model_of(tiny()), "int8")
    with pytest.raises(LlmosError, match="already quantized to int8"):
        quant.quantize_model(q, "int4")


def test_group_size_that_does_not_divide_names_the_layer():
    cfg = tiny(dim=96, n_heads=6, n_kv_heads=2, hidden_dim=192)  # 96 = 3 x 32: not a multiple of 64
    with pytest.raises(LlmosError) as e:
        quant.quantize_model(model_of(cfg), "int4", 64)
    msg = str(e.value)
    assert "layers.0.attn.wq" in msg and "width 96" in msg and "group size 64" in msg and "--group-size 32" in msg
    assert "\n" not in msg
    with pytest.raises(LlmosError, match="layers.0.attn.wq: input width 96"):
        quant.quantize_state_dict(model_of(cfg).state_dict(), cfg, "int4", 128)


def test_unsupported_group_size_and_scheme():
    with pytest.raises(LlmosError, match="group size 48 is not supported; use 32, 64 or 128"):
        quant.quantize_model(model_of(tiny()), "int4", 48)
    with pytest.raises(LlmosError, match="unknown quantization 'int3'"):
        quant.quantize_model(model_of(tiny()), "int3")
    with pytest.raises(LlmosError, match="unknown precision 'q4'"):
        load_precision("whatever", "q4")
