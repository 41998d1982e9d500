"""Batch-1 decoding with fixed shapes, so that CUDA records a decode step once and replays it.

    dec = GraphDecoder(model)          # a loaded Transformer on a CUDA device (or the CPU, without a graph)
    logits = dec.prefill(prompt_ids)   # [vocab] float32 after the prompt
    logits = dec.decode(next_id)       # one more token
    dec.reset()

Engine(model, tok, fast=dec) runs single prompts through it, as it does llmos.fast's CPU decoder.

On a GPU a small model's decode step is hundreds of kernel launches of a few microseconds each, so
the launches cost more than the arithmetic. A CUDA graph records them once and replays them with one
call (gpt-fast does the same through torch.compile's "reduce-overhead"). Recording needs every
tensor shape and address fixed across steps, which model.py's KV cache does not give (the keys it
returns grow by one slot per token and the slot number is a Python int). So here:
  - the cache is allocated whole (context limit) and the step writes its key and value at a slot
    held in a tensor (index_copy_), then attends over every slot with the unwritten ones masked;
  - the step reuses model.py's own blocks (Block.forward with this cache object), so the arithmetic
    is the model file's, and tests compare it with the model on the CPU, where no graph is recorded;
  - the prompt is prefilled by model.forward itself, writing into the same buffers.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from llmos.model import KVCache, Transformer, rope_cos_sin


class StaticCache:
    """Keys and values [layers, 1, kv_heads, max_len, head_dim]; `slot` ([1] long) is where the next token goes."""

    def __init__(self, model: Transformer, max_len: int):
        cfg, p = model.cfg, model.embed.weight
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=p.device)
        self.keys = torch.arange(max_len, device=p.device)

    def update(self, layer: int, k, v):
        """Called by Attention.forward for one token: store it, return every slot (the mask hides the future)."""
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]


class GraphDecoder:
    def __init__(self, model: Transformer, max_len: int | None = None, graph: bool | None = None):
        self.model, self.max_len = model, max_len or model.cfg.max_seq_len
        self.cache = StaticCache(model, self.max_len)
        device = self.cache.k.device
        self.graph_wanted = device.type == "cuda" if graph is None else graph
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the step's inputs and output live here
        self.logits = None
        self.graph = None
        self.pos = 0

    def reserve(self, slots: int) -> None:
        """Nothing to do: the cache spans the whole context from the start (fixed shapes for the graph)."""

    def reset(self) -> None:
        self.pos = 0

    @torch.inference_mode()
    def prefill(self, ids) -> torch.Tensor:
        """The prompt through model.forward, writing into the static buffers; logits after its last token."""
        ids = torch.as_tensor(list(ids), dtype=torch.long, device=self.token.device)[None]
        if len(ids[0]) >= self.max_len:
            raise ValueError(f"{len(ids[0])} prompt tokens leave no room in the {self.max_len}-slot cache")
        cache = KVCache.__new__(KVCache)  # the model's cache class over these buffers
        cache.k, cache.v, cache.max_len, cache.pos = self.cache.k, self.cache.v, self.max_len, 0
        cache.pad = torch.zeros(1, dtype=torch.long, device=ids.device)
        logits = self.model(ids, cache, last=True)[0, -1].float()
        self.pos = cache.pos
        return logits

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        if self.pos >= self.max_len:
            raise ValueError(f"the {self.max_len}-slot cache is full")
        self.token.fill_(token)
        self.cache.slot.fill_(self.pos)
        if self.graph_wanted and self.graph is None:
            try:
                self._record()
            except RuntimeError as e:  # an operation CUDA cannot record: run the same step unrecorded
                print(f"llmos: decoding without a CUDA graph ({str(e).splitlines()[0]})", file=sys.stderr)
                self.graph_wanted, self.graph = False, None
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._step()
        self.pos += 1
        return self.logits.clone()

    def _step(self) -> torch.Tensor:
        """One token at slot cache.slot, through the model's own blocks."""
        m, c = self.model, self.cache
        x = m.embed(self.token)
        cos, sin = rope_cos_sin(m.inv_freq.to(x.device), c.slot.view(1, 1), x.dtype)
        mask = (c.keys <= c.slot).view(1, 1, -1)  # [batch, query, key]: the written slots only
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, mask, c, i)
        x = m.norm(x)
        return F.linear(x, m.embed.weight if m.head is None else m.head.weight)[0, -1].float()

    def _record(self) -> None:
        """Warm up on a side stream (allocations and library handles happen outside the graph), then record.
        The warm-up writes this step's own key and value at the current slot, which the replay rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
