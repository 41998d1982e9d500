"""llama2.c checkpoints: the real stories260K model, and tiny files packed here in every layout.

The references are llama2.c itself: its published story for stories260K, and a numpy port
of run.c's forward pass (interleaved rope pairs, no permutation) on the synthetic weights.
"""

import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from llmos.errors import LlmosError
from llmos.formats import llama2c
from llmos.model import Transformer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = DATA / "models" / "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

P = dict(dim=16, hidden=24, layers=2, heads=4, kv=2, vocab=32, seq=16)


@pytest.fixture
def no_tokenizer(monkeypatch):
    """Weights-only tests: skip the tokenizer, which has tests of its own."""
    monkeypatch.setattr(llama2c, "load_tokenizer", lambda path, tokenizer_path, vocab_size: None)


def greedy(model, first: int, n: int) -> list[int]:
    cache, ids = model.new_cache(1, n + 1), [first]
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids[-1:]]), cache)[0, -1].argmax().item())
    return ids


def load(ckpt) -> Transformer:
    model = Transformer(ckpt.config).eval()
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model


# ----------------------------------------------------------------------------
# stories260K: greedy generation from BOS tells the story llama2.c tells


def decode_llama2c(tok_file: Path, ids: list[int]) -> str:
    """llama2.c's tokenizer.bin: int32 max length, then per token float32 score, int32 length, bytes."""
    data, offset, pieces = tok_file.read_bytes(), 4, []
    while offset < len(data):
        _, n = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + n])
        offset += 8 + n
    raw = b"".join(bytes([int(p[3:5], 16)]) if p.startswith(b"<0x") else p for p in (pieces[i] for i in ids))
    return raw.decode("utf-8", errors="replace").lstrip(" ")  # llama2.c drops the space after BOS


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared data absent")
def test_stories260k_greedy_story(no_tokenizer):
    ckpt = llama2c.read(STORIES / "stories260K.bin")
    assert ckpt.meta["llama2c_version"] == 0 and ckpt.config.n_kv_heads == 4 and ckpt.config.tie_embeddings
    ids = greedy(load(ckpt), 1, 40)
    assert decode_llama2c(STORIES / "tok512.bin", ids[1:]).startswith(STORY)


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared data absent")
def test_stories260k_exported_to_hf_tells_the_same_story_in_transformers(tmp_path, no_tokenizer):
    transformers = pytest.importorskip("transformers")
    from llmos.formats import hf

    ckpt = llama2c.read(STORIES / "stories260K.bin")
    hf.write(ckpt, tmp_path / "hf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False, eos_token_id=None)
    assert out[0].tolist() == greedy(load(ckpt), 1, 40)


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared data absent")
def test_stories260k_tokenizer_found_beside_it():
    pytest.importorskip("llmos.tokenizer")
    ckpt = llama2c.read(STORIES / "stories260K.bin")  # finds tok512.bin
    tok = ckpt.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    ids = greedy(load(ckpt), 1, 40)
    assert tok.decode(ids[1:]).lstrip(" ").startswith(STORY)


# ----------------------------------------------------------------------------
# Synthetic checkpoints packed as llama2.c's export.py packs them


def random_weights(shared: bool, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d, h, L, kvd = P["dim"], P["hidden"], P["layers"], P["kv"] * P["dim"] // P["heads"]
    w = dict(embed=(P["vocab"], d), rms_att=(L, d), wq=(L, d, d), wk=(L, kvd, d), wv=(L, kvd, d), wo=(L, d, d),
             rms_ffn=(L, d), w1=(L, h, d), w2=(L, d, h), w3=(L, h, d), rms_final=(d,), wcls=(P["vocab"], d))
    w = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in w.items()}
    for k in ("rms_att", "rms_ffn", "rms_final"):
        w[k] += 1.0
    if shared:
        w["wcls"] = w["embed"]
    return w


def header(shared: bool, signed_vocab: bool) -> bytes:
    vocab = -P["vocab"] if signed_vocab and not shared else P["vocab"]
    return struct.pack("<7i", P["dim"], P["hidden"], P["layers"], P["heads"], P["kv"], vocab, P["seq"])


def write_legacy(path, w, shared):
    head = P["dim"] // P["heads"]
    freqs = np.outer(np.arange(P["seq"]), 1.0 / 10000 ** (np.arange(0, head, 2) / head))
    order = ["embed", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final"]
    parts = [w[k] for k in order] + [np.cos(freqs), np.sin(freqs)] + ([] if shared else [w["wcls"]])
    path.write_bytes(header(shared, True) + b"".join(np.asarray(a, np.float32).tobytes() for a in parts))


V1_ORDER = ["rms_att", "rms_ffn", "rms_final", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def write_v1(path, w, shared):
    head = struct.pack("<Ii", 0x616B3432, 1) + header(shared, False) + struct.pack("B", shared)
    parts = [w[k] for k in V1_ORDER] + ([] if shared else [w["wcls"]])
    path.write_bytes(head.ljust(256, b"\0") + b"".join(a.tobytes() for a in parts))


def write_v2(path, w, shared, group_size=8):
    """Q8_0 as export.py's version2_export: per matrix its int8 values then its float32 scales."""
    head = struct.pack("<Ii", 0x616B3432, 2) + header(shared, False) + struct.pack("<Bi", shared, group_size)
    body, dequantized = [w[k].tobytes() for k in V1_ORDER[:3]], dict(w)
    for k in V1_ORDER[3:] + ([] if shared else ["wcls"]):
        mats = [w[k]] if k in ("embed", "wcls") else list(w[k])
        out = []
        for m in mats:
            g = m.reshape(-1, group_size)
            scale = (np.abs(g).max(axis=1) / 127.0).astype(np.float32)
            q = np.round(g / scale[:, None]).astype(np.int8)
            body += [q.tobytes(), scale.tobytes()]
            out.append((q.astype(np.float32) * scale[:, None]).reshape(m.shape))
        dequantized[k] = out[0] if k in ("embed", "wcls") else np.stack(out)
    if shared:
        dequantized["wcls"] = dequantized["embed"]
    path.write_bytes(head.ljust(256, b"\0") + b"".join(body))
    return dequantized


def runc_forward(w, tokens) -> np.ndarray:
    """run.c's forward, token by token, in float64: interleaved rope pairs (x[2i], x[2i+1])."""
    d, L, nh, head = P["dim"], P["layers"], P["heads"], P["dim"] // P["heads"]
    kv_mul, kvd = nh // P["kv"], P["kv"] * head
    w = {k: v.astype(np.float64) for k, v in w.items()}
    rms = lambda x, g: g * x / np.sqrt(np.mean(x * x) + 1e-5)  # noqa: E731
    keys, values, logits = np.zeros((L, len(tokens), kvd)), np.zeros((L, len(tokens), kvd)), []
    for pos, token in enumerate(tokens):
        x = w["embed"][token].copy()
        for l in range(L):
            xb = rms(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            for vec in (q, k):
                pairs = vec.reshape(-1, 2).copy()
                angle = pos / 10000 ** ((np.arange(0, len(vec), 2) % head) / head)
                vec[0::2] = pairs[:, 0] * np.cos(angle) - pairs[:, 1] * np.sin(angle)
                vec[1::2] = pairs[:, 0] * np.sin(angle) + pairs[:, 1] * np.cos(angle)
            keys[l, pos], values[l, pos] = k, v
            out = np.zeros(d)
            for h in range(nh):
                kv_slice = slice((h // kv_mul) * head, (h // kv_mul + 1) * head)
                att = keys[l, : pos + 1, kv_slice] @ q[h * head : (h + 1) * head] / np.sqrt(head)
                att = np.exp(att - att.max()) / np.exp(att - att.max()).sum()
                out[h * head : (h + 1) * head] = att @ values[l, : pos + 1, kv_slice]
            x = x + w["wo"][l] @ out
            xb = rms(x, w["rms_ffn"][l])
            hb = w["w1"][l] @ xb
            x = x + w["w2"][l] @ (hb / (1 + np.exp(-hb)) * (w["w3"][l] @ xb))
        logits.append(w["wcls"] @ rms(x, w["rms_final"]))
    return np.stack(logits)


TOKENS = [1, 5, 30, 2, 17, 9, 9, 0, 22, 13, 4, 31]


@pytest.mark.parametrize("version, shared", [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)])
def test_logits_match_runc(tmp_path, no_tokenizer, version, shared):
    w = random_weights(shared)
    path = tmp_path / "model.bin"
    if version == 2:
        w = write_v2(path, w, shared)  # compare against the dequantized weights
    else:
        (write_legacy if version == 0 else write_v1)(path, w, shared)
    ckpt = llama2c.read(path)
    assert ckpt.meta["llama2c_version"] == version and ckpt.config.tie_embeddings == shared
    assert ckpt.meta["file_size"] == path.stat().st_size
    model = load(ckpt)
    cache = model.new_cache(1, len(TOKENS))
    with torch.no_grad():
        prefill = model(torch.tensor([TOKENS[:4]]), cache)[0]
        steps = [model(torch.tensor([[t]]), cache)[0] for t in TOKENS[4:]]
    expected = torch.from_numpy(runc_forward(w, TOKENS)).float()
    torch.testing.assert_close(torch.cat([prefill, *steps]), expected, atol=1e-4, rtol=0)


def hf_permute(w, n_heads):
    """transformers' convert_llama_weights_to_hf.py permute, as llama2.c's export.py copies it."""
    dim1, dim2 = w.shape
    return w.view(dim1, dim2).reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_v1_tensors_equal_the_packed_ones(tmp_path, no_tokenizer):
    w = random_weights(shared=False)
    write_v1(tmp_path / "model.bin", w, shared=False)
    sd = llama2c.read(tmp_path / "model.bin").state_dict
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    expected = {"embed.weight": t["embed"], "norm.weight": t["rms_final"], "head.weight": t["wcls"]}
    for i in range(P["layers"]):
        expected |= {
            f"layers.{i}.attn_norm.weight": t["rms_att"][i], f"layers.{i}.mlp_norm.weight": t["rms_ffn"][i],
            f"layers.{i}.attn.wq.weight": hf_permute(t["wq"][i], P["heads"]),
            f"layers.{i}.attn.wk.weight": hf_permute(t["wk"][i], P["kv"]),
            f"layers.{i}.attn.wv.weight": t["wv"][i], f"layers.{i}.attn.wo.weight": t["wo"][i],
            f"layers.{i}.mlp.w1.weight": t["w1"][i], f"layers.{i}.mlp.w2.weight": t["w2"][i],
            f"layers.{i}.mlp.w3.weight": t["w3"][i],
        }
    assert sd.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("version", [0, 1, 2])
def test_read_without_weights(tmp_path, no_tokenizer, version):
    """weights=False: the same config and meta (tensor counts by type) as a full read, and no tensors."""
    path = tmp_path / "model.bin"
    [write_legacy, write_v1, write_v2][version](path, random_weights(shared=False), shared=False)
    full, light = llama2c.read(path), llama2c.read(path, weights=False)
    assert light.state_dict == {} and light.config == full.config and light.meta == full.meta
    n = 2 + 9 * P["layers"] + 1  # embed, head, 9 a layer, final norm
    assert sum(full.meta["tensor_types"].values()) == len(full.state_dict) == n
    assert full.meta["tensor_types"].get("q8_0", 0) == (2 + 7 * P["layers"] if version == 2 else 0)


# ----------------------------------------------------------------------------
# Bad input and the tokenizer beside the checkpoint


@pytest.mark.parametrize("writer", [write_legacy, write_v1])
def test_truncated_file(tmp_path, no_tokenizer, writer):
    path = tmp_path / "model.bin"
    writer(path, random_weights(shared=True), shared=True)
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LlmosError, match=f"header implies {full} bytes, file has {full - 100}"):
        llama2c.read(path)


@pytest.mark.parametrize("content", [b"", b"hello", b"\x00" * 64, b"GGUF" + b"\x07" * 60])
def test_not_a_checkpoint(tmp_path, no_tokenizer, content):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(LlmosError, match="not a llama2.c checkpoint"):
        llama2c.read(tmp_path / "x.bin")


def test_unknown_version_and_short_header(tmp_path):
    (tmp_path / "x.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 3).ljust(300, b"\0"))
    with pytest.raises(LlmosError, match="version 3"):
        llama2c.read(tmp_path / "x.bin")
    (tmp_path / "x.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1).ljust(100, b"\0"))
    with pytest.raises(LlmosError, match="truncated"):
        llama2c.read(tmp_path / "x.bin")


def test_tokenizer_is_found_beside_the_checkpoint_or_asked_for(tmp_path, monkeypatch):
    write_v1(tmp_path / "model.bin", random_weights(shared=True), shared=True)
    with pytest.raises(LlmosError, match=r"looked for tok32\.bin and tokenizer\.bin"):
        llama2c.read(tmp_path / "model.bin")
    with pytest.raises(LlmosError, match=r"missing\.bin: not found"):
        llama2c.read(tmp_path / "model.bin", tokenizer_path=tmp_path / "missing.bin")
    seen = []
    fake = types.SimpleNamespace(from_llama2c=lambda path, vocab_size: seen.append((Path(path).name, vocab_size)))
    monkeypatch.setattr(llama2c, "Tokenizer", fake)
    for name in ("tokenizer.bin", "tok32.bin"):  # tok{vocab}.bin wins over tokenizer.bin
        (tmp_path / name).write_bytes(b"")
        llama2c.read(tmp_path / "model.bin")
    (tmp_path / "mine.bin").write_bytes(b"")
    llama2c.read(tmp_path / "model.bin", tokenizer_path=tmp_path / "mine.bin")
    assert seen == [("tokenizer.bin", 32), ("tok32.bin", 32), ("mine.bin", 32)]
