"""The run file against Hugging Face transformers on the same random weights.

Tiny random configs cover grouped-query attention, tied and untied heads,
Llama-3 and linear rope scaling, and Qwen2's q/k/v biases; logits must agree
within 1e-4 in float32 for the prefill and for every decode step through the cache,
and a row of packed documents (doc_ids) computes each document as if it ran alone.
"""

import pytest
import torch

from llmos.model import Config, Transformer
from conftest import tiny_config

transformers = pytest.importorskip("transformers")

HF_TO_LLMOS = [  # written out here, independently of llmos.formats.hf
    ("model.embed_tokens", "embed"), ("model.layers", "layers"), ("model.norm", "norm"), ("lm_head", "head"),
    ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
    ("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"), ("self_attn.v_proj", "attn.wv"),
    ("self_attn.o_proj", "attn.wo"), ("mlp.gate_proj", "mlp.w1"), ("mlp.up_proj", "mlp.w3"), ("mlp.down_proj", "mlp.w2"),
]

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa-untied": dict(arch="llama", n_heads=4, n_kv_heads=2, tie=False, scaling=None),
    "llama-mha-tied": dict(arch="llama", n_heads=4, n_kv_heads=4, tie=True, scaling=None),
    "llama3-scaling": dict(arch="llama", n_heads=4, n_kv_heads=1, tie=False, scaling=LLAMA3_SCALING),
    "linear-scaling": dict(arch="llama", n_heads=2, n_kv_heads=2, tie=True, scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2-bias-tied": dict(arch="qwen2", n_heads=4, n_kv_heads=2, tie=True, scaling=None),
    "qwen2-bias-untied": dict(arch="qwen2", n_heads=4, n_kv_heads=1, tie=False, scaling=None),
}


def make_pair(arch, n_heads, n_kv_heads, tie, scaling, seed=0):
    theta = 500000.0 if scaling else 10000.0
    cfg = tiny_config(vocab_size=97, hidden_dim=48, n_heads=n_heads, n_kv_heads=n_kv_heads, norm_eps=1e-6,
                      rope_theta=theta, rope_scaling=scaling, tie_embeddings=tie, qkv_bias=arch == "qwen2")
    torch.manual_seed(seed)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tie)
    if arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common, rope_theta=theta)
        hf = transformers.Qwen2ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**common, rope_theta=theta, rope_scaling=scaling)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.eval()
    for name, p in hf.named_parameters():  # make norms and biases matter
        if "norm" in name:
            torch.nn.init.normal_(p, mean=1.0, std=0.3)
        elif name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    state = {}
    for name, tensor in hf.state_dict().items():
        if "rotary" in name or (tie and name == "lm_head.weight"):
            continue
        for old, new in HF_TO_LLMOS:
            name = name.replace(old, new)
        state[name] = tensor
    model = Transformer(cfg).eval()
    model.load_state_dict(state, strict=True)
    return hf, model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_prefill_and_decode(case):
    hf, model = make_pair(**CASES[case])
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (model(tokens) - ref).abs().max().item() < 1e-4
        cache = model.new_cache(batch=2, max_len=64)
        out = model(tokens[:, :25], cache)
        assert (out - ref[:, :25]).abs().max().item() < 1e-4
        for t in range(25, 40):
            step = model(tokens[:, t : t + 1], cache)
            assert (step[:, 0] - ref[:, t]).abs().max().item() < 1e-4, f"decode step {t}"


def test_rope_scaling_changes_logits_beyond_original_context():
    # Guards the test above: if scaling were silently ignored on either side, both would still agree.
    _, scaled = make_pair(**CASES["llama3-scaling"])
    plain_cfg = Config(**{**scaled.cfg.to_dict(), "rope_scaling": None})
    plain = Transformer(plain_cfg).eval()
    plain.load_state_dict(scaled.state_dict())
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (scaled(tokens) - plain(tokens)).abs().max().item() > 1e-3


def test_left_padded_batch_equals_each_row_alone():
    hf, model = make_pair(**CASES["qwen2-bias-untied"])
    short = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    long = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        cache = model.new_cache(batch=2, max_len=32)
        cache.pad[0] = 5
        out = model(batch, cache)
        next_tokens = torch.tensor([[7], [9]])
        step = model(next_tokens, cache)[:, 0]
        alone_short = hf(torch.cat([short, next_tokens[:1]], 1)).logits
        alone_long = hf(torch.cat([long, next_tokens[1:]], 1)).logits
    assert (out[0, 5:] - alone_short[0, :-1]).abs().max().item() < 1e-4
    assert (step[0] - alone_short[0, -1]).abs().max().item() < 1e-4
    assert (step[1] - alone_long[0, -1]).abs().max().item() < 1e-4
    with torch.no_grad():  # last=True: the same final logits through the same cache, nothing else computed
        cache = model.new_cache(batch=2, max_len=32)
        cache.pad[0] = 5
        last = model(batch, cache, last=True)
    assert last.shape == (2, 1, 97) and torch.allclose(last[:, 0], out[:, -1], atol=1e-6) and cache.pos == 11


def test_config_rejects_unknown_keys_and_counts_parameters():
    with pytest.raises(ValueError, match="unknown config keys"):
        Config.from_dict({"dim": 32, "n_layer": 2})
    cfg = tiny_config(vocab_size=97, hidden_dim=48, qkv_bias=True)
    assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())
    tied = Config(**{**cfg.to_dict(), "tie_embeddings": True})
    assert tied.num_params() == sum(p.numel() for p in Transformer(tied).parameters())


# ----------------------------------------------------------------------------
# Packed documents: doc_ids make a row of several documents compute each as if alone


@pytest.mark.parametrize("case", ["llama-gqa-untied", "llama3-scaling", "qwen2-bias-untied"])
def test_packed_row_with_doc_ids_equals_each_document_alone(case):
    hf, model = make_pair(**CASES[case])
    g = torch.Generator().manual_seed(5)
    layouts = [[7, 1, 12, 20], [40]]  # row 0: four documents (one a single token), row 1: one
    docs = [[torch.randint(0, 97, (1, n), generator=g) for n in lengths] for lengths in layouts]
    tokens = torch.cat([torch.cat(row, 1) for row in docs])
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in layouts])
    doc_ids[1] += 3  # only changes between neighbours mark a new document, not the values
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        one_doc = model(tokens[1:], doc_ids=doc_ids[1:]) - model(tokens[1:])  # one document: plain causal attention
        assert one_doc.abs().max().item() < 1e-6
        for r, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc)[0]
                assert (packed[r, start : start + doc.shape[1]] - alone).abs().max().item() < 1e-5
                start += doc.shape[1]
        # transformers finds the same documents from position ids that restart at 0 (padding-free packing)
        positions = torch.cat([torch.arange(n) for n in layouts[0]])[None]
        ref = hf(tokens[:1], position_ids=positions, use_cache=False).logits
        assert (packed[0] - ref[0]).abs().max().item() < 1e-4
        assert (packed[0] - model(tokens[:1])[0]).abs().max().item() > 1e-2  # without doc_ids they do mix
    with pytest.raises(ValueError, match="doc_ids"):
        model(tokens, model.new_cache(2, 64), doc_ids=doc_ids)
