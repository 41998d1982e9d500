"""The server's settings: one dataclass, which is also where `llmos serve`'s flags come from (llmos/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from llmos.loader import ENGINES
from llmos.options import option


@dataclass
class ServerConfig:
    """The server's settings; `llmos serve`'s flags are made from these fields (llmos.options.add_flags)."""

    host: str = option("127.0.0.1", "address to bind; any other than loopback needs --api-key")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every route ($LLMOS_API_KEY)")
    max_body_bytes: int = option(2 * 1024 * 1024, "larger request bodies get 413")
    max_tokens: int = option(4096, "most tokens one reply may ask for; also the default when a request gives none")
    max_choices: int = option(8, "n (times the number of prompts, for completions) per request")
    max_pending: int = option(8, "requests running or queued before the server answers 503")
    max_batch: int = option(8, "sequences (choices) each model decodes together")
    # The cache holds max_batch * max_context tokens: SmolLM2-135M in f32 takes ~46 KB a token, 8 x 4096 ~ 1.5 GB.
    max_context: int | None = option(4096, "KV-cache slots per sequence, at most the model's context")
    rate_limit: float = option(600, "requests a minute per API key (or client address); 0 = no limit")
    rate_burst: int = option(60, "requests a client may send at once before the rate applies")
    home: str | None = option(None, "where llmos.db lives ($LLMOS_HOME, else ~/.llmos)")
    # auto | fast: a request with one choice runs on the C++ CPU decoder (llmos/fast) while it is free, the
    # others join the batch; torch: every request joins the batch (llmos.loader.backend decides).
    engine: str = option("auto", "one request at a time on the C++ CPU kernels (fast) or always the batched PyTorch model (torch)",
                         choices=list(ENGINES))
