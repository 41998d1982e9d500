"""GPU layer offload (llmos/offload.py).

Without a GPU the placement hooks are exercised on the CPU: the "offloaded" layers go to
device="cpu" in float64, so every hook has to move the activations' dtype (a float32 input to a
float64 layer fails otherwise), and the split model must compute what the unsplit one does.
References: the unsplit model's logits, the engine's and the batching scheduler's outputs on it,
and hand-computed layer counts. Tests that need CUDA are skipped without it.
"""

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from llmos.batching import Scheduler
from llmos.cli import main
from llmos.engine import Engine, SamplingParams
from llmos.errors import LlmosError
from llmos.model import Transformer
from llmos.offload import LayerStack, choose_layers, place
from conftest import tiny_config, tiny_model, word_tokenizer

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
V = 64
TOK = word_tokenizer(V)
SHAPE = dict(vocab_size=V, n_layers=3)
CFG = tiny_config(**SHAPE)


@pytest.fixture(scope="module")
def model():
    return tiny_model(**SHAPE)


def split(model, n=2, dtype=torch.float64):
    return place(copy.deepcopy(model), n, device="cpu", dtype=dtype)


# ----------------------------------------------------------------------------
# How many layers fit: pure arithmetic


def test_choose_layers():
    # 10 GB free, 1 GB reserved: 9 GB for layers of 1 GB weights + 0.5 GB KV cache each → 6 of 32.
    assert choose_layers(10e9, 1e9, 0.5e9, 2e9, 1e9, 32) == 6
    # All 4 layers (4 x 1.5 GB) and the 2 GB embedding/head fit in 9 GB → all.
    assert choose_layers(10e9, 1e9, 0.5e9, 2e9, 1e9, 4) == 4
    # The layers fit but not the head with them: all but one layer, so the head stays on the CPU.
    assert choose_layers(7.5e9, 1e9, 0.5e9, 2e9, 1e9, 4) == 3
    # Less free than reserved, or less than a layer: none.
    assert choose_layers(0.5e9, 1e9, 0.5e9, 2e9, 1e9, 32) == 0
    assert choose_layers(2.4e9, 1e9, 0.5e9, 2e9, 1e9, 32) == 0
    assert choose_layers(2.5e9, 1e9, 0.5e9, 2e9, 1e9, 32) == 1


# ----------------------------------------------------------------------------
# Placement and hooks, on the CPU


def test_split_model_computes_what_the_whole_one_does(model):
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        # The first layer stays, the last two become float64: dtype moves both ways through the hooks.
        m = split(model)
        assert [next(b.parameters()).dtype for b in m.layers] == [torch.float32, torch.float64, torch.float64]
        assert m.embed.weight.dtype == m.norm.weight.dtype == torch.float32
        got = m(tokens)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
        # Through the KV cache: one tensor per layer, in the layer's dtype.
        cache = m.new_cache(2, 20)
        assert isinstance(cache.k, LayerStack) and [t.dtype for t in cache.k.layers] == [torch.float32, torch.float64, torch.float64]
        logits = [m(tokens[:, :5], cache)[:, -1]] + [m(tokens[:, i : i + 1], cache)[:, -1] for i in range(5, 9)]
        assert torch.allclose(torch.stack(logits, 1), want[:, 4:], atol=1e-5)
        # The unsplit model is untouched, and a model placed whole has no hooks and its own cache.
        assert model.layers[2].attn.wq.weight.dtype == torch.float32 and "new_cache" not in vars(model)
        whole = split(model, n=3)
        assert "new_cache" not in vars(whole) and whole.embed.weight.dtype == torch.float64


def test_engine_and_scheduler_run_on_a_split_model(model):
    m = split(model, n=1, dtype=None)  # same dtype: outputs must equal the unsplit model's exactly
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 8, 5)]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    want = [Engine(model, TOK).generate(p, params).token_ids for p in prompts]
    assert [c.token_ids for c in Engine(m, TOK).generate_batch(prompts, params)] == want
    # The server's scheduler: windows, shifts and row moves on the per-layer cache.
    sched = Scheduler(Engine(m, TOK), max_batch=2)
    requests = [sched.submit(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=4))]
    sched.step()
    requests += [sched.submit(p, params) for p in prompts[1:]]
    while sched.step():
        pass
    got = [[p.token_id for p in r if p.token_id is not None] for r in requests]
    assert got == [want[0][:4]] + want[1:]


def test_bad_layer_counts(model):
    with pytest.raises(LlmosError, match="--gpu-layers must be"):
        split(model, n=-1)
    code = main(["run", "default", "hi", "--gpu-layers", "many"])
    assert code == 2


# ----------------------------------------------------------------------------
# The command line without a GPU: one error line, before any model is loaded


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("argv", [
    ["run", "no-such-model", "hi", "--gpu-layers", "8"],
    ["run", "no-such-model", "hi", "--gpu-layers", "auto"],
    ["serve", "no-such-model", "--gpu-layers", "8", "--port", "0"],
])
def test_gpu_layers_without_a_gpu_is_an_error(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip() == "error: --gpu-layers needs a CUDA GPU and none was found; drop --gpu-layers to run on the CPU"
    with pytest.raises(LlmosError, match="needs a CUDA GPU"):
        place(Transformer(CFG), 1)


# ----------------------------------------------------------------------------
# On a GPU (untested on hardware while writing: no GPU was available)


@needs_cuda
def test_cuda_offload_matches_the_cpu(model):
    tokens = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
        m = place(copy.deepcopy(model), 2, device="cuda", dtype=torch.float32)
        assert m.layers[0].attn.wq.weight.device.type == "cpu" and m.layers[2].attn.wq.weight.device.type == "cuda"
        assert torch.allclose(m(tokens), want, atol=1e-4)
        half = place(copy.deepcopy(model), 2, device="cuda")  # bf16 (or f16) on the GPU
        assert torch.allclose(half(tokens), want, atol=0.1)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert Engine(m, TOK).generate([1, 2, 3], params).token_ids == Engine(model, TOK).generate([1, 2, 3], params).token_ids


@needs_cuda
def test_cuda_auto_puts_a_tiny_model_wholly_on_the_gpu(model, capsys):
    m = place(copy.deepcopy(model), "auto", device="cuda")
    assert m.embed.weight.device.type == "cuda" and "3 of 3 layers" in capsys.readouterr().err
