"""The fixed-shape decoder for CUDA graphs (llmos/graphs.py) against the model file.

On the CPU no graph is recorded, so these check the arithmetic of the static cache, the slot tensor and
the mask over unwritten slots: logits equal model.forward over the whole sequence, and the engine on
the decoder gives the model path's tokens. With CUDA, the recorded graph's replays equal the
unrecorded steps.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from llmos.engine import Engine, SamplingParams
from llmos.graphs import GraphDecoder
from llmos.model import Transformer
from conftest import tiny_model, tokenizer

CONFIGS = [
    dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96),
    dict(dim=48, n_layers=3, n_heads=3, n_kv_heads=1, hidden_dim=64, tie_embeddings=False, qkv_bias=True,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}),
]


def build(i: int, dtype=torch.float64, vocab: int = 97) -> Transformer:
    model = tiny_model(i, vocab_size=vocab, max_seq_len=40, **CONFIGS[i]).to(dtype)
    with torch.no_grad():
        model.embed.weight.mul_(20)
    return model


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_prefill_and_steps_equal_full_forwards(i):
    model = build(i)
    dec = GraphDecoder(model, graph=False)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(i)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0].float()
    for run in range(2):  # a reset reuses the buffers: stale slots of the first run must stay masked
        dec.reset()
        got = [dec.prefill(ids[: 7 + run])]
        got += [dec.decode(t) for t in ids[7 + run :]]
        assert dec.pos == len(ids)
        assert torch.allclose(torch.stack(got), full[6 + run :], atol=1e-9, rtol=0)
    dec.reset()
    dec.prefill(ids[:3])
    dec.cache.k[:, :, :, 3:] = 1e3  # garbage in slots not yet written must not leak into attention
    with torch.no_grad():
        assert torch.allclose(dec.decode(ids[3]), model(torch.tensor([ids[:4]]))[0, -1].float(), atol=1e-9)


def test_engine_on_the_decoder_gives_the_model_paths_tokens():
    tok = tokenizer()
    model = build(0, torch.float32, tok.vocab_size)
    plain, graphed = Engine(model, tok), Engine(model, tok, fast=GraphDecoder(model, graph=False))
    for prompt in ["hello there", "a", "the cat sat on the mat"]:
        ids = tok.encode(prompt)
        for params in (SamplingParams(temperature=0, max_new_tokens=12),
                       SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=12, logprobs=2)):
            a, b = plain.generate(ids, params), graphed.generate(ids, params)
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            if params.logprobs:
                assert [round(x.logprob, 4) for x in a.logprobs] == [round(x.logprob, 4) for x in b.logprobs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_equal_unrecorded_steps():
    model = build(1, torch.float32).cuda()
    ids = list(range(5, 30))
    eager, graphed = GraphDecoder(model, graph=False), GraphDecoder(model, graph=True)
    a = [eager.prefill(ids[:5])] + [eager.decode(t) for t in ids[5:]]
    b = [graphed.prefill(ids[:5])] + [graphed.decode(t) for t in ids[5:]]
    assert graphed.graph is not None
    assert torch.allclose(torch.stack(a), torch.stack(b), atol=1e-5)
