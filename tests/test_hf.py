"""Hugging Face directories in and out, checked against transformers itself.

Tiny random Llama, Qwen2 and Mistral models are saved with `save_pretrained`
(single file and sharded); llmos must read them to the same logits (prefill and
every decode step through the KV cache), and what llmos writes must load in
transformers to the same logits.
"""

import json

import pytest
import torch

from llmos.errors import LlmosError
from llmos.formats import Checkpoint, hf
from llmos.model import Transformer
from conftest import byte_bpe, tiny_config

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-tied-llama3": dict(arch="llama", kv=2, tie=True, rope=LLAMA3),
    "llama-untied": dict(arch="llama", kv=4, tie=False, rope=None),
    "qwen2-gqa-untied": dict(arch="qwen2", kv=2, tie=False, rope=None),
    "qwen2-mqa-tied": dict(arch="qwen2", kv=1, tie=True, rope=None),
    "mistral-gqa": dict(arch="mistral", kv=2, tie=False, rope=None),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}


def make_hf(arch, kv, tie, rope, seed=0, **extra):
    torch.manual_seed(seed)
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[arch])
    rope_parameters = {**(rope or {"rope_type": "default"}), "rope_theta": 10000.0}
    cfg = config_cls(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                     rope_parameters=rope_parameters, bos_token_id=1, eos_token_id=2, **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # make norms and biases matter
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def llmos_model(ckpt: Checkpoint) -> Transformer:
    model = Transformer(ckpt.config).eval()
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=True)
    return model


def assert_same_logits(model, reference, tokens, prefill=5):
    """Prefill `prefill` tokens, then decode the rest one at a time through the cache."""
    cache = model.new_cache(1, len(tokens))
    with torch.no_grad():
        rows = [model(torch.tensor([tokens[:prefill]]), cache)[0]]
        rows += [model(torch.tensor([[t]]), cache)[0] for t in tokens[prefill:]]
    torch.testing.assert_close(torch.cat(rows), reference, atol=1e-4, rtol=0)


TOKENS = [1, 7, 33, 60, 2, 5, 5, 41, 19, 0, 12, 58, 30, 9, 44, 3, 27, 50, 11, 6]


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    model = make_hf(**CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_read_matches_transformers(saved):
    name, model, path = saved
    ckpt = hf.read(path)
    assert ckpt.config.tie_embeddings == CASES[name]["tie"] and ckpt.config.n_kv_heads == CASES[name]["kv"]
    assert ckpt.config.qkv_bias == (CASES[name]["arch"] == "qwen2")
    assert ckpt.tokenizer is None  # no tokenizer files: read succeeds, the caller decides whether it needs one
    assert ckpt.meta["format"] == "hf" and ckpt.meta["tensor_types"] == {"f32": len(ckpt.state_dict)}
    assert ckpt.meta["eos_token_ids"] == [2]
    assert_same_logits(llmos_model(ckpt), hf_logits(model, TOKENS), TOKENS)


def test_read_takes_a_lone_tokenizer_model(tmp_path):
    """Llama 2-style repositories ship a SentencePiece tokenizer.model and no tokenizer.json: read() uses it."""
    from test_tokenizer import train_sentencepiece

    spm = pytest.importorskip("sentencepiece")
    make_hf(**CASES["llama-untied"]).save_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path)))
    tok = hf.read(tmp_path, weights=False).tokenizer
    assert tok is not None and tok.kind == "spm" and tok.encode("Hello  world") == sp.encode("Hello  world", add_bos=True)


def test_llama3_rope_survives_the_round_trip(tmp_path):
    model = make_hf(**CASES["llama-gqa-tied-llama3"])
    model.save_pretrained(tmp_path / "src")
    ckpt = hf.read(tmp_path / "src")
    assert ckpt.config.rope_scaling == LLAMA3 and ckpt.config.rope_theta == 10000.0
    hf.write(ckpt, tmp_path / "out", "f32")
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert reloaded.rope_parameters == {**LLAMA3, "rope_theta": 10000.0}
    # and the scaling changes the logits, so the logit comparisons above would notice it being dropped
    ckpt.config.rope_scaling = None
    assert not torch.allclose(llmos_model(ckpt)(torch.tensor([TOKENS]))[0], hf_logits(model, TOKENS), atol=1e-3)


def test_sharded_safetensors(tmp_path):
    model = make_hf(**CASES["llama-untied"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert_same_logits(llmos_model(hf.read(tmp_path)), hf_logits(model, TOKENS), TOKENS)


def test_pytorch_model_bin(tmp_path):
    model = make_hf(**CASES["qwen2-gqa-untied"])
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(llmos_model(hf.read(tmp_path)), hf_logits(model, TOKENS), TOKENS)


@pytest.mark.parametrize("window, expected", [(8, 8), (None, 64)])
def test_mistral_sliding_window_limits_the_context(tmp_path, window, expected):
    model = make_hf(**CASES["mistral-gqa"], sliding_window=window)
    model.save_pretrained(tmp_path)
    ckpt = hf.read(tmp_path)
    assert ckpt.config.max_seq_len == expected
    tokens = TOKENS[:expected]  # inside the window, attention is exact
    assert_same_logits(llmos_model(ckpt), hf_logits(model, tokens), tokens, prefill=3)


def test_legacy_rope_keys_read_like_transformers():
    """transformers 4 wrote rope_theta and rope_scaling at the top level; 5 nests them in rope_parameters."""
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=61, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    old = {**base, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    new = {**base, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}
    expected = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "architectures"}).rope_parameters
    assert {k: v for k, v in expected.items() if k != "type"} == new["rope_parameters"]  # the reference agrees
    (c_old, _), (c_new, _) = hf.config_from_hf(old, "old"), hf.config_from_hf(new, "new")
    assert c_old == c_new and c_new.rope_theta == 500000.0
    assert c_new.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3", "qwen2-gqa-untied"])
def test_written_directory_loads_in_transformers(tmp_path, name):
    model = make_hf(**CASES[name])
    model.save_pretrained(tmp_path / "src")
    hf.write(hf.read(tmp_path / "src"), tmp_path / "out", "f32")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ("lm_head.weight" in json.dumps(list_tensors(tmp_path / "out"))) != CASES[name]["tie"]
    assert written["architectures"] == [CLASSES[CASES[name]["arch"]][1]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=0, rtol=0)
    resolved = json.loads((tmp_path / "out" / "llmos_config.json").read_text())
    assert resolved == hf.read(tmp_path / "src").config.to_dict()


def list_tensors(path):
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_write_read_round_trip(tmp_path, dtype):
    model = make_hf(**CASES["qwen2-gqa-untied"])
    model.save_pretrained(tmp_path / "src")
    ckpt = hf.read(tmp_path / "src")
    hf.write(ckpt, tmp_path / "out", dtype)
    back = hf.read(tmp_path / "out")
    assert back.config == ckpt.config and back.meta["tensor_types"] == {dtype: len(ckpt.state_dict)}
    assert back.state_dict.keys() == ckpt.state_dict.keys()
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back.state_dict[k], v.to(hf.DTYPES[dtype])), k


def test_sharded_write(tmp_path, monkeypatch):
    model = make_hf(**CASES["llama-untied"])
    model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(hf, "SHARD_BYTES", 20_000)
    hf.write(hf.read(tmp_path / "src"), tmp_path / "out", "f32")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=0, rtol=0)


def test_generation_config_is_read_and_written(tmp_path):
    model = make_hf(**CASES["llama-untied"])
    model.generation_config = transformers.GenerationConfig(eos_token_id=[2, 5], do_sample=True, temperature=0.6,
                                                            top_p=0.9)
    model.save_pretrained(tmp_path / "src")
    ckpt = hf.read(tmp_path / "src")
    assert ckpt.meta["eos_token_ids"] == [2, 5]
    assert ckpt.meta["generation"] == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    hf.write(ckpt, tmp_path / "out", "bf16")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == [2, 5] and gen.temperature == 0.6 and gen.top_p == 0.9


def test_write_refuses_a_foreign_directory_and_replaces_its_own(tmp_path):
    model = make_hf(**CASES["llama-untied"])
    model.save_pretrained(tmp_path / "src")
    ckpt = hf.read(tmp_path / "src")
    with pytest.raises(LlmosError, match="not written by llmos"):
        hf.write(ckpt, tmp_path / "src", "f32")
    with pytest.raises(LlmosError, match="dtype"):
        hf.write(ckpt, tmp_path / "out", "q4")
    hf.write(ckpt, tmp_path / "out", "f32")
    hf.write(ckpt, tmp_path / "out", "f16")  # an earlier llmos export is replaced
    assert hf.read(tmp_path / "out").meta["tensor_types"] == {"f16": len(ckpt.state_dict)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directories left


def test_tokenizer_round_trip(tmp_path):
    tokenizer_mod = pytest.importorskip("llmos.tokenizer")
    # the model's 61 tokens: Llama's <s> and </s>, no byte alphabet
    tok = byte_bpe(["the cat sat on the mat", "a dog ran far away"] * 4, 61, ["<pad>", "<s>", "</s>"], alphabet=False)
    make_hf(**CASES["llama-untied"]).save_pretrained(tmp_path / "src")
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}))
    ckpt = hf.read(tmp_path / "src")
    assert isinstance(ckpt.tokenizer, tokenizer_mod.Tokenizer)
    hf.write(ckpt, tmp_path / "out", "f32")
    back = hf.read(tmp_path / "out")
    text = "the dog sat far away"
    assert back.tokenizer.encode(text) == ckpt.tokenizer.encode(text) == [1] + tok.encode(text).ids
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_read_without_weights(tmp_path, layout, monkeypatch):
    """weights=False: the same config and meta as a full read, an empty state dict, no tensor data read."""
    model = make_hf(**CASES["qwen2-gqa-untied"]).to(torch.bfloat16)
    if layout == "bin":
        model.config.save_pretrained(tmp_path)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
    full = hf.read(tmp_path)
    if layout != "bin":  # safetensors headers only: reading a tensor's data would fail
        monkeypatch.setattr(hf, "safe_open", no_get_tensor(hf.safe_open))
    light = hf.read(tmp_path, weights=False)
    assert light.state_dict == {} and light.config == full.config and light.meta == full.meta
    assert light.meta["tensor_types"] == {"bf16": len(full.state_dict)}
    edit_config(tmp_path, intermediate_size=64)  # and the shapes are still checked against the config
    with pytest.raises(LlmosError, match="does not match"):
        hf.read(tmp_path, weights=False)


def no_get_tensor(real_safe_open):
    class SafeOpen:
        def __init__(self, *args, **kw):
            self.f = real_safe_open(*args, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"read the data of {name}")

    return SafeOpen


def test_expected_shapes_without_building_a_model(tmp_path, monkeypatch):
    """The shapes formats check files against are the model's own, and reading builds no model (on the meta
    device its first use imports torch._dynamo: seconds)."""
    from llmos.formats import expected_shapes

    for kw in (dict(tie_embeddings=True), dict(qkv_bias=True, n_kv_heads=1), dict(head_dim=16)):
        cfg = tiny_config(vocab_size=61, hidden_dim=48, **kw)
        assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    make_hf(**CASES["qwen2-gqa-untied"]).save_pretrained(tmp_path)
    monkeypatch.setattr(Transformer, "__init__", lambda *a, **kw: pytest.fail("built a Transformer"))
    assert len(hf.read(tmp_path).state_dict) == 3 + 2 * 12  # embed, norm, head; 9 weights and 3 biases a layer


def test_model_card_keeps_the_license(tmp_path):
    """The license travels in the card's front matter, as the Hub writes and reads it (huggingface_hub parses it)."""
    from huggingface_hub import metadata_load

    model = make_hf(**CASES["llama-untied"])
    model.save_pretrained(tmp_path / "src")
    ckpt = hf.read(tmp_path / "src")
    assert "license" not in ckpt.meta
    hf.write(ckpt, tmp_path / "plain", "f32")  # a card with the name only
    assert metadata_load(tmp_path / "plain" / "README.md") == {"tags": ["llmos"]}
    ckpt.meta |= {"license": "apache-2.0", "name": "Tiny Llama: 2 layers", "path": "/models/tiny.Q8_0.gguf"}
    hf.write(ckpt, tmp_path / "out", "f32")
    card = (tmp_path / "out" / "README.md").read_text()
    assert metadata_load(tmp_path / "out" / "README.md") == {"license": "apache-2.0", "tags": ["llmos"]}
    assert "# Tiny Llama: 2 layers" in card and "Converted by llmos from tiny.Q8_0.gguf" in card
    assert hf.read(tmp_path / "out").meta["license"] == "apache-2.0"
    ckpt.meta["license"] = "https://example.com/license: see terms"  # not a license id: 'other', text in the body
    hf.write(ckpt, tmp_path / "out", "f32")
    assert metadata_load(tmp_path / "out" / "README.md")["license"] == "other"
    assert "License: https://example.com/license: see terms" in (tmp_path / "out" / "README.md").read_text()


def test_a_cached_repository_is_named_by_its_id(tmp_path):
    snapshot = tmp_path / "models--org--tiny-llama" / "snapshots" / "0123abcd"
    make_hf(**CASES["llama-untied"]).save_pretrained(snapshot)
    ckpt = hf.read(snapshot)
    assert ckpt.meta["name"] == ckpt.meta["base_model"] == "org/tiny-llama"
    hf.write(ckpt, tmp_path / "out", "f32")
    from huggingface_hub import metadata_load

    assert metadata_load(tmp_path / "out" / "README.md")["base_model"] == "org/tiny-llama"


# ----------------------------------------------------------------------------
# Bad input: one-line LlmosErrors


@pytest.fixture
def good_dir(tmp_path):
    make_hf(**CASES["llama-untied"]).save_pretrained(tmp_path)
    return tmp_path


def edit_config(path, **changes):
    c = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**c, **changes}))


def test_missing_directory(tmp_path):
    with pytest.raises(LlmosError, match="no config.json"):
        hf.read(tmp_path / "nope")


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LlmosError, match="truncated or corrupt"):
        hf.read(good_dir)


def test_garbage_safetensors(good_dir):
    (good_dir / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(LlmosError, match="truncated or corrupt"):
        hf.read(good_dir)


def test_config_disagreeing_with_weights(good_dir):
    edit_config(good_dir, intermediate_size=64)
    shape_error = r"mlp\.(gate|up|down)_proj\.weight is \[\d+, \d+\] but the weights have .* does not match"
    with pytest.raises(LlmosError, match=shape_error):
        hf.read(good_dir)


def test_config_with_more_layers_than_weights(good_dir):
    edit_config(good_dir, num_hidden_layers=3)
    with pytest.raises(LlmosError, match="missing tensor model.layers.2"):
        hf.read(good_dir)


def test_config_with_fewer_layers_than_weights(good_dir):
    edit_config(good_dir, num_hidden_layers=1)
    with pytest.raises(LlmosError, match="unexpected tensor model.layers.1"):
        hf.read(good_dir)


def test_unsupported_architecture(good_dir):
    edit_config(good_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(LlmosError, match="GPT2LMHeadModel"):
        hf.read(good_dir)


def test_unsupported_rope_type(good_dir):
    edit_config(good_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(LlmosError, match="yarn"):
        hf.read(good_dir)


def test_no_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(LlmosError, match="no model.safetensors"):
        hf.read(good_dir)
