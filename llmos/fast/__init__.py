"""Fast batch-1 CPU decoding: the model's weights packed for C++ kernels, a static KV cache, one call per token.

    from llmos.fast import decoder
    dec = decoder(model, quant="int4")          # a loaded Transformer; quant: None, "bf16", "int8", "int4", "q4_1"
    logits = dec.prefill(prompt_ids)            # [vocab] float32, for the last prompt token
    logits = dec.decode(next_id)                # one more token; dec.pos counts the cache slots used
    dec.reset()                                 # a new sequence

    dec = decoder_from_gguf("model.Q4_0.gguf")  # GGUF Q8_0 / Q4_0 / Q4_1 blocks go into the kernels as they are

Applied from outside: model.py stays the readable reference and is never changed; this file reads its
weights and computes the same function (tests/test_fast.py checks logits and greedy tokens against it).

How a token is computed. `decode` is one call into llmos/kernels/decode.cpp, which runs every layer
(RMSNorm, q/k/v, rope, attention over the cache, output projection, SwiGLU) inside one OpenMP region,
so a token costs a few dozen thread barriers instead of ~400 PyTorch operations. `prefill` runs here in
PyTorch, one layer at a time over all prompt tokens, with the kernels' batched products for quantized
weights and torch's scaled_dot_product_attention. Without a C++ compiler both run here in PyTorch
(slower, same arithmetic for float weights).

Weight formats (Weight.fmt), the blocks of 32 inputs as llama.cpp defines them:

    f32, bf16   float rows; activations stay float32
    q8          int8 and one scale per block:                   w = d * q            (GGUF Q8_0)
    q4          4-bit and a scale (+ offset) per block:         w = d * (q + koff) + m
                  GGUF Q4_0: koff -8, no m;  GGUF Q4_1: koff 0, m;  llmos int4 (quant.py): koff -8, m = zero

`quant="int8"` makes Q8_0 blocks and `"int4"` Q4_1 blocks (asymmetric, like llmos.quant's int4), bit-identical
to llama.cpp's quantizers; `"q4_0"` the symmetric blocks (11% fewer bytes, and much less accurate: on the
bundled SmolLM2 perplexity rose 23% with Q4_0 and 0.2% with Q4_1, bench/results/quant_ppl_fast.json).
The output head of a quantized model is Q8_0 (like llama.cpp keeps the output at higher precision), the embedding table stays as loaded.
A model already swapped by llmos.quant (Int8Linear / Int4Linear) is packed from its stored integers,
with its bfloat16 scales kept as they are. Activations meeting a quantized weight are quantized to int8
per block of 32 (llama.cpp's Q8 activations): against the reference model with the same (dequantized)
weights the logits differ by 1-3% of their spread on random tiny models and by RMS 6% (KL 0.004 nats)
on SmolLM2-135M, whose activation outliers make the rounding noisier; float formats agree to ~1e-5.

Three parts: blocks.py (the weight formats and their quantizers), packing.py (a model's or a file's weights
gathered into those formats) and runtime.py (the Decoder); the C++ kernels are llmos/kernels.
"""

from llmos.fast.blocks import (BF16, BLOCK_TYPES, F32, Q4, Q8, QUANTIZERS, REQUANTIZED, Weight, float_weight,
                               from_gguf_blocks, natural_to_pi, pack_q4, pi_to_natural, q4_from_ints, q4_k_blocks,
                               quantize_q4_0, quantize_q4_1, quantize_q8_0, quantize_rows, unpack_q4,
                               unpack_torch_int4_cpu)
from llmos.fast.packing import (LINEARS, QUANTS, file_quant, from_quant_module, from_quant_tensors, pack_gguf,
                                pack_model, pack_quantized)
from llmos.fast.runtime import (BF16_PREFILL_MIN, PREFILL_CHUNK, Decoder, bf16_prefill, decoder, decoder_from_gguf,
                                decoder_from_quantized)
