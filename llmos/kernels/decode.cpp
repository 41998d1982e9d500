// Fast batch-1 CPU decoding for llmos: quantized matrix-vector kernels and a whole-token decode step.
//
// Built on first use by llmos/kernels/__init__.py (torch.utils.cpp_extension.load, -O3 -march=native
// -fopenmp); the Python side is llmos/fast.py. One call of Model::decode runs every layer of one token
// inside one OpenMP parallel region: no Python, no allocation, no dispatcher between the operations.
//
// Weight formats (one Mat per weight matrix [N, K], rows contiguous):
//   F32   float rows
//   BF16  bfloat16 rows, activations stay float32
//   Q8    int8 rows in "pair-interleaved" order (below) + one scale per block of 32 inputs
//         w = d * q                                     (GGUF Q8_0; llmos int8 per channel)
//   Q4    4-bit rows in GGUF Q4_0 nibble order + a scale d and optional offset m per block of 32
//         w = d * (q + koff) + m    koff = -8, no m:    GGUF Q4_0
//                                   koff =  0, m:       GGUF Q4_1
//                                   koff = -8, m:       llmos int4 ((q - 8) * scale + zero)
//   Scales and offsets are float16 (GGUF) or bfloat16 (llmos quant.py), so every file loads exactly.
//
// Activations that meet a quantized matrix are quantized to int8 per block of 32 (llama.cpp's Q8
// activations): x ≈ xd * xq with xd = max|x| / 127, and xs = xd * sum(xq) for the offset terms.
// One block dot product is then an integer sum:
//   Σ_i w_i x_i ≈ d * xd * Σ q_i xq_i  +  (koff * d + m) * xs
//
// Pair-interleaved order. With AVX2 one 32-byte load of a Q4 row holds two blocks b, b+1 (16 bytes
// each); its low nibbles are elements 0..15 of both blocks and its high nibbles elements 16..31.
// Activations (and Q8 weights) are stored in the matching order, per pair of blocks:
//   [b: 0..15 | b+1: 0..15 | b: 16..31 | b+1: 16..31]
// so both halves multiply with plain loads, the two int16 products add before widening, and the
// four int32 lanes of each 128-bit half belong to one block: one fused multiply-add applies both
// blocks' scales. A last unpaired block (odd K/32) stays in natural order.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // only what is used: compiles in 15% less time than ATen.h
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LLMOS_SCALAR)
#include <immintrin.h>
#define LLMOS_AVX2 1
#define LLMOS_PREFETCH g_prefetch
#else
#define LLMOS_AVX2 0
#endif

namespace {

// Knobs for tests and benchmarks (set_prefetch, set_scalar, set_rows); the defaults are the measured best.
int64_t g_prefetch = 2048;  // bytes ahead in a weight row (distance sweep in /work/notes/fast_decode.md)
bool g_scalar = false;      // route quantized products through qdot_scalar, the reference arithmetic
int64_t g_rows = 0;         // rows per decode tile: 0 = by format and width (see gemv_rows)

enum Fmt { F32 = 0, BF16 = 1, Q8 = 2, Q4 = 3 };

// ----------------------------------------------------------------------------
// Scalars: float16 / bfloat16 → float32

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float f16_to_f32(uint16_t h) {
#if LLMOS_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000 | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) {  // subnormal: renormalize
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        u = sign | ((112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

inline float scale_at(const uint16_t* p, int64_t i, bool bf) { return bf ? bf16_to_f32(p[i]) : f16_to_f32(p[i]); }

// Position of element e (0..31) of block b in pair-interleaved order, for a row of nb blocks.
inline int64_t pi_index(int64_t b, int e, int64_t nb) {
    if ((nb & 1) && b == nb - 1) return 32 * b + e;  // the unpaired last block
    return 64 * (b >> 1) + (e < 16 ? 0 : 32) + (b & 1) * 16 + (e & 15);
}

// ----------------------------------------------------------------------------
// Weights and activations

struct Mat {
    int fmt = F32;
    int64_t N = 0, K = 0, nb = 0;
    const uint8_t* w = nullptr;
    int64_t row_bytes = 0;
    const uint16_t* d = nullptr;  // [N, nb]
    const uint16_t* m = nullptr;  // [N, nb] or null
    bool bf16_scales = false;
    float koff = 0.f;
    const float* bias = nullptr;  // [N] or null (float32)
    std::vector<at::Tensor> keep;
};

// Int8 activations of T rows of width K: q [T, K] (pair-interleaved), d and s [T, nbp] zero-padded
// to a multiple of 8 blocks so that 8 scales always load at once.
struct Act {
    int64_t K = 0, nb = 0, nbp = 0;
    std::vector<int8_t> q;
    std::vector<float> d, s, ps;  // ps [T, nb/2, 8]: each pair's scales spread over its lanes (tiles of C > 1)
    void resize(int64_t T, int64_t K_) {
        K = K_;
        nb = K / 32;
        nbp = (nb + 7) / 8 * 8;
        if ((int64_t)q.size() < T * K) q.resize(T * K);
        if ((int64_t)d.size() < T * nbp) {
            d.assign(T * nbp, 0.f);
            s.assign(T * nbp, 0.f);
            ps.assign(T * nbp * 4, 0.f);
        }
    }
    const int8_t* qrow(int64_t t) const { return q.data() + t * K; }
    const float* drow(int64_t t) const { return d.data() + t * nbp; }
    const float* srow(int64_t t) const { return s.data() + t * nbp; }
    const float* psrow(int64_t t) const { return ps.data() + t * nbp * 4; }
};

// Blocks [b0, b1) of a row of K floats (K % 32 == 0) into pair-interleaved int8, scales and scaled sums.
void quantize_blocks(const float* x, int64_t K, int64_t b0, int64_t b1, int8_t* q, float* d, float* s) {
    const int64_t nb = K / 32;
    for (int64_t b = b0; b < b1; b++) {
        const float* xb = x + 32 * b;
        int8_t tmp[32];
        float amax = 0.f;
#if LLMOS_AVX2
        const __m256 signbit = _mm256_set1_ps(-0.0f);
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        amax = _mm_cvtss_f32(m4);
        const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid)),
                i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
        s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
        const int isum = _mm_cvtsi128_si32(s4);
        // int32 → int8 in element order: packs work per 128-bit lane, a permute undoes the interleave
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)tmp, p);
#else
        for (int e = 0; e < 32; e++) amax = std::max(amax, std::fabs(xb[e]));
        const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int isum = 0;
        for (int e = 0; e < 32; e++) {
            tmp[e] = (int8_t)std::nearbyint(xb[e] * id);
            isum += tmp[e];
        }
#endif
        d[b] = dd;
        s[b] = dd * (float)isum;
        if ((nb & 1) && b == nb - 1) {
            std::memcpy(q + 32 * b, tmp, 32);
        } else {
            int8_t* base = q + 64 * (b >> 1) + (b & 1) * 16;
            std::memcpy(base, tmp, 16);
            std::memcpy(base + 32, tmp + 16, 16);
        }
    }
}

void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) { quantize_blocks(x, K, 0, K / 32, q, d, s); }

void quantize_rows(const float* x, int64_t T, int64_t K, Act& a, bool pair_scales = false, int nthreads = 1) {
    a.resize(T, K);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T > 16 && nthreads > 1)
    for (int64_t t = 0; t < T; t++) {
        float* d = a.d.data() + t * a.nbp;
        quantize_row(x + t * K, K, a.q.data() + t * K, d, a.s.data() + t * a.nbp);
        if (pair_scales) {
            float* ps = a.ps.data() + t * a.nbp * 4;
            for (int64_t p = 0; p < a.nb / 2; p++)
                for (int l = 0; l < 8; l++) ps[8 * p + l] = d[2 * p + l / 4];
        }
    }
}

// ----------------------------------------------------------------------------
// Float rows: y[r] = w_r · x

#if LLMOS_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bfloat16 → float32: the 16 bits become the high half
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// W is float (f32 rows) or uint16_t (bf16 rows); four accumulators, each 32 inputs prefetched a line at a time.
template <typename W>
float dot_float_row(const W* w, const float* x, int64_t K) {
    int64_t i = 0;
    float r = 0.f;
#if LLMOS_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= K; i += 32) {
        for (int64_t b = 0; b < 32 * (int64_t)sizeof(W); b += 64) _mm_prefetch((const char*)(w + i) + b + LLMOS_PREFETCH, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= K; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    r = _mm_cvtss_f32(h);
#endif
    for (; i < K; i++) r += to_f32(w[i]) * x[i];
    return r;
}

float dot_f32(const float* w, const float* x, int64_t K) { return dot_float_row(w, x, K); }
float dot_bf16(const uint16_t* w, const float* x, int64_t K) { return dot_float_row(w, x, K); }

// ----------------------------------------------------------------------------
// Quantized rows × int8 activations: a tile of R weight rows × C activation rows.
// out[c * ldo + r] = Σ over blocks (d xd Σ q xq + (koff d + m) xs)

// The exact arithmetic, element by element; also the path of builds without AVX2 and the
// unpaired last block of the AVX2 path. Returns the sum over blocks [b0, nb).
float qdot_scalar(const Mat& W, int64_t row, const int8_t* xq, const float* xd, const float* xs, int64_t b0) {
    const int64_t nb = W.nb;
    const uint8_t* wr = W.w + row * W.row_bytes;
    const uint16_t* dr = W.d + row * nb;
    const uint16_t* mr = W.m ? W.m + row * nb : nullptr;
    float total = 0.f;
    for (int64_t b = b0; b < nb; b++) {
        int isum = 0;
        for (int e = 0; e < 32; e++) {
            int q;
            if (W.fmt == Q8) {
                q = (int8_t)wr[pi_index(b, e, nb)];
            } else {
                const uint8_t byte = wr[16 * b + (e & 15)];
                q = e < 16 ? (byte & 15) : (byte >> 4);
            }
            isum += q * xq[pi_index(b, e, nb)];
        }
        const float d = scale_at(dr, b, W.bf16_scales);
        float c = W.koff * d;
        if (mr) c += scale_at(mr, b, W.bf16_scales);
        total += d * xd[b] * (float)isum + (W.fmt == Q4 ? c * xs[b] : 0.f);
    }
    return total;
}

// Prefill: activations of a tile of TC rows packed so that one pointer walks them. Per pair of blocks,
// for each row: 64 bytes of int8 then the pair's 8 lane scales (96 bytes); per group of 8 blocks, for
// each row: the 8 scaled sums xs.
constexpr int TC = 6;

struct ActTiles {
    int64_t npair = 0, ngroup = 0, ntile = 0;
    std::vector<uint8_t> pairs;  // [ntile, npair, TC, 96]
    std::vector<float> sums;     // [ntile, ngroup, TC, 8]
    void pack(const Act& A, int64_t T, int nthreads) {
        npair = A.nb / 2;
        ngroup = A.nbp / 8;
        ntile = T / TC;
        pairs.resize(ntile * npair * TC * 96);
        sums.resize(ntile * ngroup * TC * 8);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (ntile > 4 && nthreads > 1)
        for (int64_t tile = 0; tile < ntile; tile++)
            for (int c = 0; c < TC; c++) {
                const int64_t t = tile * TC + c;
                for (int64_t p = 0; p < npair; p++) {
                    uint8_t* dst = pairs.data() + ((tile * npair + p) * TC + c) * 96;
                    std::memcpy(dst, A.qrow(t) + 64 * p, 64);
                    std::memcpy(dst + 64, A.psrow(t) + 8 * p, 32);
                }
                for (int64_t g = 0; g < ngroup; g++)
                    std::memcpy(sums.data() + ((tile * ngroup + g) * TC + c) * 8, A.srow(t) + 8 * g, 32);
            }
    }
};

#if LLMOS_AVX2
inline __m256 scales8(const uint16_t* p, bool bf) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// 8 scales from p; only the first n (even) are read, the rest are zero: a row's last group of blocks
// loads without touching memory past the row.
inline __m256 scales8_partial(const uint16_t* p, int64_t n, bool bf) {
    alignas(16) static const int32_t masks[5][4] = {{0, 0, 0, 0}, {-1, 0, 0, 0}, {-1, -1, 0, 0}, {-1, -1, -1, 0}, {-1, -1, -1, -1}};
    const __m128i h = _mm_maskload_epi32((const int*)p, _mm_load_si128((const __m128i*)masks[n / 2]));
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

inline float hsum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}


// Integer dot products of one pair of blocks: lanes 0-3 sum block b's products, lanes 4-7 block b+1's
// (see "Pair-interleaved order"). lo/hi: the weights' elements 0..15 / 16..31 of both blocks, xlo/xhi
// the activations' in the same order. With VNNI (AVX512-VNNI + VL, or AVX-VNNI) each half is one
// dpbusd; without, maddubs + madd. The integers are the same: no int16 sum can saturate here (Q4:
// 2 x 15 x 127; Q8: 2 x 127 x 127, as Q8_0 weights stay within +-127).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMOS_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
#define LLMOS_VNNI 1
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
#define LLMOS_VNNI 0
#endif

// Q4: weights are unsigned (0..15) and multiply the signed activations directly.
inline __m256i pair_dot_q4(__m256i lo, __m256i hi, __m256i xlo, __m256i xhi) {
#if LLMOS_VNNI
    const __m256i z = _mm256_setzero_si256();  // two independent products: no 2 x 5-cycle chain
    return _mm256_add_epi32(dpbusd(z, lo, xlo), dpbusd(z, hi, xhi));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones);
#endif
}

// Q8: signed x signed as |w| x (x with w's sign).
inline __m256i pair_dot_q8(__m256i lo, __m256i hi, __m256i xlo, __m256i xhi) {
    const __m256i ulo = _mm256_sign_epi8(lo, lo), slo = _mm256_sign_epi8(xlo, lo);
    const __m256i uhi = _mm256_sign_epi8(hi, hi), shi = _mm256_sign_epi8(xhi, hi);
#if LLMOS_VNNI
    const __m256i z = _mm256_setzero_si256();
    return _mm256_add_epi32(dpbusd(z, ulo, slo), dpbusd(z, uhi, shi));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ulo, slo), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(uhi, shi), ones));
#endif
}

alignas(32) const int32_t kPairIdx[4][8] = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7}};

// out[r0 .. r0+R) = rows r0.. of W times activation row t (decode). Each row's bytes are unpacked
// and consumed at once, so four rows fit the 16 vector registers.
template <int R, int FMT, bool HASM>
void qgemv(const Mat& W, int64_t r0, const Act& A, int64_t t, float* out) {
    const int64_t nb = W.nb, npair = nb / 2, ngroup = (npair * 2 + 7) / 8;
    const bool bf = W.bf16_scales;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256 koff = _mm256_set1_ps(W.koff);
    const uint8_t* w0 = W.w + r0 * W.row_bytes;
    const int8_t* xq = A.qrow(t);
    // Prefetch what the next tile of R rows will read at the same place, or (one row at a time)
    // LLMOS_PREFETCH bytes further along the row: rows are contiguous, so either is the stream ahead.
    const int64_t pf_weights = R > 1 ? R * W.row_bytes : LLMOS_PREFETCH;
    const int64_t pf_scales = R > 1 ? R * nb : LLMOS_PREFETCH / 16;
    // One accumulator per row: its 8 lanes sum to the dot product, so the offset terms (per group
    // of 8 blocks) and the block products (per pair) share it.
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroup; g++) {
        const int64_t b0 = 8 * g, nblk = std::min<int64_t>(8, 2 * npair - b0);
        const __m256 xd = _mm256_loadu_ps(A.drow(t) + b0);
        __m256 dw[R];  // d * xd of the group's blocks, per row
        for (int r = 0; r < R; r++) {
            const uint16_t* dp = W.d + (r0 + r) * nb + b0;
            const uint16_t* mp = HASM ? W.m + (r0 + r) * nb + b0 : nullptr;
            if (LLMOS_PREFETCH) {  // the next tile's scales
                _mm_prefetch((const char*)(dp + pf_scales), _MM_HINT_T0);
                if (HASM) _mm_prefetch((const char*)(mp + pf_scales), _MM_HINT_T0);
            }
            const __m256 d = nblk == 8 ? scales8(dp, bf) : scales8_partial(dp, nblk, bf);
            if (FMT == Q4) {
                __m256 cw = _mm256_mul_ps(koff, d);
                if (HASM) cw = _mm256_add_ps(cw, nblk == 8 ? scales8(mp, bf) : scales8_partial(mp, nblk, bf));
                acc[r] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(A.srow(t) + b0), acc[r]);
            }
            dw[r] = _mm256_mul_ps(d, xd);
        }
        for (int j = 0; j < nblk / 2; j++) {
            const int64_t b = b0 + 2 * j;
            const __m256i xlo = _mm256_loadu_si256((const __m256i*)(xq + 32 * b));
            const __m256i xhi = _mm256_loadu_si256((const __m256i*)(xq + 32 * b + 32));
            const __m256i idx = _mm256_load_si256((const __m256i*)kPairIdx[j]);
            for (int r = 0; r < R; r++) {
                const uint8_t* wp = w0 + r * W.row_bytes;
                // Decode streams weights from DRAM at a few instructions per byte: without prefetching
                // ahead the out-of-order window covers too few cache lines to reach the bandwidth.
                if (LLMOS_PREFETCH) _mm_prefetch((const char*)(wp + (FMT == Q4 ? 16 : 32) * b + pf_weights), _MM_HINT_T0);
                __m256i p;
                if (FMT == Q4) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(wp + 16 * b));
                    p = pair_dot_q4(_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), xlo, xhi);
                } else {
                    p = pair_dot_q8(_mm256_loadu_si256((const __m256i*)(wp + 32 * b)),
                                    _mm256_loadu_si256((const __m256i*)(wp + 32 * b + 32)), xlo, xhi);
                }
                acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dw[r], idx), _mm256_cvtepi32_ps(p), acc[r]);
            }
        }
    }
    if (R == 4 && !(nb & 1)) {  // four rows' sums at once (the "% R" keeps R < 4's dead copy in bounds)
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1 % R]), _mm256_hadd_ps(acc[2 % R], acc[3 % R]));
        _mm_storeu_ps(out + r0, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        return;
    }
    for (int r = 0; r < R; r++) {
        float v = hsum(acc[r]);
        if (nb & 1) v += qdot_scalar(W, r0 + r, A.qrow(t), A.drow(t), A.srow(t), nb - 1);
        out[r0 + r] = v;
    }
}

template <int R>
void qgemv_any(const Mat& W, int64_t r0, const Act& A, int64_t t, float* out) {
    if (W.fmt == Q8) qgemv<R, Q8, false>(W, r0, A, t, out);
    else if (W.m) qgemv<R, Q4, true>(W, r0, A, t, out);
    else qgemv<R, Q4, false>(W, r0, A, t, out);
}

// out[(t0 + c) * ldo + r] for the TC rows of one packed tile and weight row r.
template <int FMT, bool HASM>
void qrow_tile(const Mat& W, int64_t r, const ActTiles& X, int64_t tile, const Act& A, float* out, int64_t ldo) {
    const int64_t nb = W.nb, npair = nb / 2, ngroup = (npair * 2 + 7) / 8;
    const bool bf = W.bf16_scales;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256 koff = _mm256_set1_ps(W.koff);
    const uint8_t* wp = W.w + r * W.row_bytes;
    const uint16_t* dp = W.d + r * nb;
    const uint16_t* mp = HASM ? W.m + r * nb : nullptr;
    const uint8_t* P = X.pairs.data() + tile * X.npair * TC * 96;
    const float* S = X.sums.data() + tile * X.ngroup * TC * 8;
    __m256 acc[TC];
    for (int c = 0; c < TC; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ngroup; g++) {
        const int64_t b0 = 8 * g, nblk = std::min<int64_t>(8, 2 * npair - b0);
        const uint16_t *dg = dp + b0, *mg = HASM ? mp + b0 : nullptr;
        const __m256 dw = nblk == 8 ? scales8(dg, bf) : scales8_partial(dg, nblk, bf);
        if (FMT == Q4) {
            __m256 cw = _mm256_mul_ps(koff, dw);
            if (HASM) cw = _mm256_add_ps(cw, nblk == 8 ? scales8(mg, bf) : scales8_partial(mg, nblk, bf));
            const float* sg = S + g * TC * 8;
            for (int c = 0; c < TC; c++) acc[c] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(sg + 8 * c), acc[c]);
        }
        for (int j = 0; j < nblk / 2; j++) {
            const int64_t b = b0 + 2 * j;
            __m256i wlo, whi;
            if (FMT == Q4) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(wp + 16 * b));
                wlo = _mm256_and_si256(v, low4);
                whi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            } else {
                wlo = _mm256_loadu_si256((const __m256i*)(wp + 32 * b));
                whi = _mm256_loadu_si256((const __m256i*)(wp + 32 * b + 32));
            }
            const __m256 dwp = _mm256_permutevar8x32_ps(dw, _mm256_load_si256((const __m256i*)kPairIdx[j]));
            const uint8_t* pp = P + (b / 2) * TC * 96;
            for (int c = 0; c < TC; c++) {
                const __m256i xlo = _mm256_loadu_si256((const __m256i*)(pp + 96 * c));
                const __m256i xhi = _mm256_loadu_si256((const __m256i*)(pp + 96 * c + 32));
                const __m256i q = FMT == Q4 ? pair_dot_q4(wlo, whi, xlo, xhi) : pair_dot_q8(wlo, whi, xlo, xhi);
                const __m256 scale = _mm256_mul_ps(dwp, _mm256_loadu_ps((const float*)(pp + 96 * c + 64)));
                acc[c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(q), acc[c]);
            }
        }
    }
    for (int c = 0; c < TC; c++) {
        const int64_t t = tile * TC + c;
        float v = hsum(acc[c]);
        if (nb & 1) v += qdot_scalar(W, r, A.qrow(t), A.drow(t), A.srow(t), nb - 1);
        out[t * ldo + r] = v;
    }
}

#endif

// ----------------------------------------------------------------------------
// Rows [r0, r1) of y = W x for one activation row (decode). x is float; xa its int8 form.

void gemv_rows(const Mat& W, const float* x, const Act& xa, float* y, int64_t r0, int64_t r1) {
    if (W.fmt == F32) {
        for (int64_t r = r0; r < r1; r++) y[r] = dot_f32((const float*)(W.w + r * W.row_bytes), x, W.K);
    } else if (W.fmt == BF16) {
        for (int64_t r = r0; r < r1; r++) y[r] = dot_bf16((const uint16_t*)(W.w + r * W.row_bytes), x, W.K);
    } else if (g_scalar || !LLMOS_AVX2) {
        for (int64_t r = r0; r < r1; r++) y[r] = qdot_scalar(W, r, xa.qrow(0), xa.drow(0), xa.srow(0), 0);
    } else {
#if LLMOS_AVX2
        // Rows one at a time stream from DRAM best (one sequential stream per thread: 8-12 GB/s per
        // thread vs 6-9 for four rows at once); four at a time compute faster (30 vs 22 G weights/s on
        // 576-wide Q4 rows), which wins where Q4 rows are short and compute, not memory, is the limit.
        const int64_t rows = g_rows ? g_rows : (W.fmt == Q4 && W.K <= 1024 ? 4 : 1);
        int64_t r = r0;
        if (rows == 4)
            for (; r + 4 <= r1; r += 4) qgemv_any<4>(W, r, xa, 0, y);
        if (rows == 2)
            for (; r + 2 <= r1; r += 2) qgemv_any<2>(W, r, xa, 0, y);
        for (; r < r1; r++) qgemv_any<1>(W, r, xa, 0, y);
#endif
    }
    if (W.bias)
        for (int64_t r = r0; r < r1; r++) y[r] += W.bias[r];
}

// Y [T, N] = X [T, K] W^T for quantized W (prefill): threads split the rows, tiles reuse each loaded
// weight block for several activation rows.
void gemm_q(const Mat& W, const Act& A, const ActTiles& X, int64_t T, float* Y, int nthreads) {
    const int64_t N = W.N;
    const int64_t chunk = 16;  // rows per task: their weights stay in L1/L2 while all T activation rows pass
    const int64_t ntask = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t task = 0; task < ntask; task++) {
        const int64_t r0 = task * chunk, r1 = std::min(N, r0 + chunk);
#if LLMOS_AVX2
        for (int64_t tile = 0; tile < X.ntile; tile++)
            for (int64_t r = r0; r < r1; r++) {
                if (W.fmt == Q8) qrow_tile<Q8, false>(W, r, X, tile, A, Y, N);
                else if (W.m) qrow_tile<Q4, true>(W, r, X, tile, A, Y, N);
                else qrow_tile<Q4, false>(W, r, X, tile, A, Y, N);
            }
        for (int64_t t = X.ntile * TC; t < T; t++)  // the last rows that fill no tile, one at a time
            for (int64_t r = r0; r < r1; r++) qgemv_any<1>(W, r, A, t, Y + t * N);
#else
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = r0; r < r1; r++) Y[t * N + r] = qdot_scalar(W, r, A.qrow(t), A.drow(t), A.srow(t), 0);
#endif
        if (W.bias)
            for (int64_t t = 0; t < T; t++)
                for (int64_t r = r0; r < r1; r++) Y[t * N + r] += W.bias[r];
    }
}

// ----------------------------------------------------------------------------
// Elementwise pieces

#if LLMOS_AVX2
// exp for x <= 88.7 (Cephes expf polynomial; about 2 ulp)
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.37f)), _mm256_set1_ps(-87.33f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// y = x / rms(x) * w, in float32 like model.RMSNorm
void rmsnorm(const float* x, const float* w, float* y, int64_t n, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / std::sqrt((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * inv);
}

// x [hd] rotated by the angles of one position ("rotate half": channel i pairs with i + hd/2)
void rope(float* x, const float* cos, const float* sin, int64_t hd) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i] + a * sin[i];
    }
}

// h[i] = silu(g[i]) * u[i] for i in [i0, i1)
void swiglu(const float* g, const float* u, float* h, int64_t i0, int64_t i1) {
    int64_t i = i0;
#if LLMOS_AVX2
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (; i + 8 <= i1; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < i1; i++) h[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// Softmax over s[0..n) in place.
void softmax(float* s, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = std::max(mx, s[i]);
    float sum = 0.f;
    int64_t i = 0;
#if LLMOS_AVX2
    __m256 vs = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(mx);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    sum = hsum(vs);
#endif
    for (; i < n; i++) {
        s[i] = std::exp(s[i] - mx);
        sum += s[i];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

// out [hd] += p * v [hd]
inline void axpy(float* out, const float* v, float p, int64_t hd) {
    int64_t i = 0;
#if LLMOS_AVX2
    const __m256 vp = _mm256_set1_ps(p);
    for (; i + 8 <= hd; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
    for (; i < hd; i++) out[i] += p * v[i];
}

// Rows [r0, r1) of a thread's share of n rows, boundaries on multiples of `align`.
inline void share(int64_t n, int nt, int tid, int64_t align, int64_t& r0, int64_t& r1) {
    const int64_t units = (n + align - 1) / align;
    r0 = std::min(n, units * tid / nt * align);
    r1 = std::min(n, units * (tid + 1) / nt * align);
}

Mat make_mat(int fmt, int64_t N, int64_t K, at::Tensor w, c10::optional<at::Tensor> d, c10::optional<at::Tensor> m,
             bool bf16_scales, double koff, c10::optional<at::Tensor> bias) {
    Mat M;
    M.fmt = fmt;
    M.N = N;
    M.K = K;
    M.nb = K / 32;
    TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous CPU tensors");
    const int64_t bytes[] = {4 * K, 2 * K, K, K / 2};
    M.row_bytes = bytes[fmt];
    TORCH_CHECK(w.nbytes() == (size_t)(N * M.row_bytes), "weight of ", w.nbytes(), " bytes for a [", N, ", ", K,
                "] matrix of format ", fmt);
    M.w = (const uint8_t*)w.data_ptr();
    M.keep.push_back(w);
    if (fmt >= Q8) {
        TORCH_CHECK(K % 32 == 0, "quantized matrices need K % 32 == 0");
        TORCH_CHECK(d.has_value() && d->is_contiguous() && d->nbytes() == (size_t)(N * M.nb * 2), "bad scales");
        M.d = (const uint16_t*)d->data_ptr();
        M.keep.push_back(*d);
        if (m.has_value()) {
            TORCH_CHECK(m->is_contiguous() && m->nbytes() == (size_t)(N * M.nb * 2), "bad offsets");
            M.m = (const uint16_t*)m->data_ptr();
            M.keep.push_back(*m);
        }
        M.bf16_scales = bf16_scales;
        M.koff = (float)koff;
    }
    if (bias.has_value()) {
        TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bad bias");
        M.bias = bias->data_ptr<float>();
        M.keep.push_back(*bias);
    }
    return M;
}

}  // namespace

// ----------------------------------------------------------------------------
// The model: every weight, the static KV cache and the scratch buffers of one decode step

struct Model {
    int64_t dim, n_layers, n_heads, n_kv, hd, hidden, vocab, max_len;
    float eps;
    int nthreads;
    std::vector<Mat> mats;  // per layer: wq wk wv wo w1 w3 w2; then head; then embed
    std::vector<at::Tensor> norms;  // per layer: attn_norm, mlp_norm; then the final norm (float32)
    at::Tensor cos, sin;  // [max_len, hd/2]
    at::Tensor kc, vc;  // [n_layers, n_kv, max_len, hd]
    // scratch
    std::vector<float> x, q, k, v, att, g, u, h, scores;
    Act a_att, a_hidden;
    std::vector<std::vector<float>> priv_x;  // per thread: the normalized residual stream
    std::vector<Act> priv_a;                 // per thread: its int8 form

    Model(int64_t dim_, int64_t n_layers_, int64_t n_heads_, int64_t n_kv_, int64_t hd_, int64_t hidden_,
          int64_t vocab_, double eps_, at::Tensor cos_, at::Tensor sin_, at::Tensor kc_, at::Tensor vc_,
          std::vector<at::Tensor> norms_, int64_t nthreads_)
        : dim(dim_), n_layers(n_layers_), n_heads(n_heads_), n_kv(n_kv_), hd(hd_), hidden(hidden_), vocab(vocab_),
          eps((float)eps_), nthreads((int)nthreads_), norms(norms_), cos(cos_), sin(sin_), kc(kc_), vc(vc_) {
        TORCH_CHECK((int64_t)norms.size() == 2 * n_layers + 1, "norms");
        set_cache(kc, vc, cos, sin);
        x.resize(dim);
        q.resize(n_heads * hd); k.resize(n_kv * hd); v.resize(n_kv * hd); att.resize(n_heads * hd);
        g.resize(std::max(hidden, dim)); u.resize(hidden); h.resize(hidden);
    }

    // A new (larger) cache and rope table: the decoder grows them as the sequence does.
    void set_cache(at::Tensor kc_, at::Tensor vc_, at::Tensor cos_, at::Tensor sin_) {
        for (const at::Tensor& t : {kc_, vc_, cos_, sin_})
            TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), "cache and rope tables must be contiguous float32 CPU tensors");
        TORCH_CHECK(kc_.dim() == 4 && kc_.size(0) == n_layers && kc_.size(1) == n_kv && kc_.size(3) == hd && vc_.sizes() == kc_.sizes(), "cache shape");
        max_len = kc_.size(2);
        TORCH_CHECK(cos_.size(0) >= max_len && cos_.size(1) == hd / 2 && sin_.sizes() == cos_.sizes(), "rope table too small");
        kc = kc_; vc = vc_; cos = cos_; sin = sin_;
        scores.assign(n_heads * max_len, 0.f);
    }

    int64_t add(int64_t fmt, int64_t N, int64_t K, at::Tensor w, c10::optional<at::Tensor> d,
                c10::optional<at::Tensor> m, bool bf16_scales, double koff, c10::optional<at::Tensor> bias) {
        mats.push_back(make_mat((int)fmt, N, K, w, d, m, bf16_scales, koff, bias));
        return (int64_t)mats.size() - 1;
    }

    const Mat& mat(int64_t layer, int which) const { return mats[layer * 7 + which]; }
    const Mat& head() const { return mats[n_layers * 7]; }
    const Mat& embed() const { return mats[n_layers * 7 + 1]; }
    const float* norm(int64_t i) const { return norms[i].data_ptr<float>(); }

    void embed_row(int64_t token, float* out) const {
        const Mat& E = embed();
        const uint8_t* row = E.w + token * E.row_bytes;
        if (E.fmt == F32) {
            std::memcpy(out, row, dim * 4);
        } else if (E.fmt == BF16) {
            for (int64_t i = 0; i < dim; i++) out[i] = bf16_to_f32(((const uint16_t*)row)[i]);
        } else {
            for (int64_t b = 0; b < E.nb; b++) {
                const float d = scale_at(E.d + token * E.nb, b, E.bf16_scales);
                const float m = E.m ? scale_at(E.m + token * E.nb, b, E.bf16_scales) : 0.f;
                for (int e = 0; e < 32; e++) {
                    float q;
                    if (E.fmt == Q8) q = (float)(int8_t)row[pi_index(b, e, E.nb)];
                    else q = (float)(e < 16 ? row[16 * b + e] & 15 : row[16 * b + e - 16] >> 4) + E.koff;
                    out[32 * b + e] = d * q + m;
                }
            }
        }
    }

    // One token at slot `pos` → logits [vocab]. Slots before pos must hold this sequence's keys/values.
    //
    // One parallel region, five barriers per layer. Each thread normalizes (and quantizes) the residual
    // stream into its own buffers instead of waiting for one thread to do it; q/k/v rows are shared out
    // by whole heads, so the thread that computed a key head also rotates and stores it; attention and
    // SwiGLU threads quantize their own blocks of the next product's input.
    at::Tensor decode(int64_t token, int64_t pos) {
        TORCH_CHECK(pos >= 0 && pos < max_len, "position ", pos, " outside the cache of ", max_len);
        TORCH_CHECK(token >= 0 && token < vocab, "token ", token, " outside the vocabulary");
        at::Tensor logits = at::empty({vocab}, at::kFloat);
        float* out = logits.data_ptr<float>();
        float* K_ = kc.data_ptr<float>();
        float* V_ = vc.data_ptr<float>();
        const float* cs = cos.data_ptr<float>() + pos * (hd / 2);
        const float* sn = sin.data_ptr<float>() + pos * (hd / 2);
        const int64_t groups = n_heads / n_kv, T = pos + 1;
        const float scale = 1.f / std::sqrt((float)hd);
        const int64_t nq = n_heads * hd, nkv = n_kv * hd;
        // Attention heads per share, so that a thread's output is whole blocks of 32 (each block has its own
        // places in the pair-interleaved int8 layout, so threads quantize their blocks independently).
        // A quantized Wo has n_heads * hd % 32 == 0, so n_heads is a multiple of this unit.
        int64_t head_unit = 1;
        while ((head_unit * hd) % 32 && n_heads % (2 * head_unit) == 0) head_unit *= 2;
        if ((int)priv_x.size() < nthreads) {
            priv_x.resize(nthreads);
            priv_a.resize(nthreads);
        }
        a_att.resize(1, nq);
        a_hidden.resize(1, hidden);
        embed_row(token, x.data());

#pragma omp parallel num_threads(nthreads)
        {
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            std::vector<float>& xn = priv_x[tid];
            Act& xa = priv_a[tid];
            xn.resize(dim);
            int64_t r0, r1;
            auto norm_input = [&](const float* w, bool quantize) {  // every thread, its own copy
                rmsnorm(x.data(), w, xn.data(), dim, eps);
                if (quantize) {
                    xa.resize(1, dim);
                    quantize_row(xn.data(), dim, xa.q.data(), xa.d.data(), xa.s.data());
                }
            };
            for (int64_t l = 0; l < n_layers; l++) {
                const Mat &Wq = mat(l, 0), &Wk = mat(l, 1), &Wv = mat(l, 2), &Wo = mat(l, 3), &W1 = mat(l, 4),
                          &W3 = mat(l, 5), &W2 = mat(l, 6);
                float* kl = K_ + l * n_kv * max_len * hd;
                float* vl = V_ + l * n_kv * max_len * hd;
                norm_input(norm(2 * l), Wq.fmt >= Q8 || Wk.fmt >= Q8 || Wv.fmt >= Q8);
                // q, k, v by whole heads; keys rotated and both stored by the thread that made them
                share(n_heads + 2 * n_kv, nt, tid, 1, r0, r1);
                for (int64_t u = r0; u < r1; u++) {
                    if (u < n_heads) {
                        gemv_rows(Wq, xn.data(), xa, q.data(), u * hd, (u + 1) * hd);
                    } else if (u < n_heads + n_kv) {
                        const int64_t j = u - n_heads;
                        gemv_rows(Wk, xn.data(), xa, k.data(), j * hd, (j + 1) * hd);
                        rope(k.data() + j * hd, cs, sn, hd);
                        std::memcpy(kl + (j * max_len + pos) * hd, k.data() + j * hd, hd * 4);
                    } else {
                        const int64_t j = u - n_heads - n_kv;
                        gemv_rows(Wv, xn.data(), xa, v.data(), j * hd, (j + 1) * hd);
                        std::memcpy(vl + (j * max_len + pos) * hd, v.data() + j * hd, hd * 4);
                    }
                }
#pragma omp barrier
                // attention: heads split between threads
                share(n_heads / head_unit, nt, tid, 1, r0, r1);
                for (int64_t hh = r0 * head_unit; hh < r1 * head_unit; hh++) {
                    float* qh = q.data() + hh * hd;
                    rope(qh, cs, sn, hd);
                    const float* kh = kl + (hh / groups) * max_len * hd;
                    const float* vh = vl + (hh / groups) * max_len * hd;
                    float* s = scores.data() + hh * max_len;
                    for (int64_t t = 0; t < T; t++) s[t] = dot_f32(kh + t * hd, qh, hd) * scale;
                    softmax(s, T);
                    float* o = att.data() + hh * hd;
                    std::fill(o, o + hd, 0.f);
                    for (int64_t t = 0; t < T; t++) axpy(o, vh + t * hd, s[t], hd);
                }
                if (Wo.fmt >= Q8)
                    quantize_blocks(att.data(), nq, r0 * head_unit * hd / 32, r1 * head_unit * hd / 32,
                                    a_att.q.data(), a_att.d.data(), a_att.s.data());
#pragma omp barrier
                // x += Wo att: each thread adds its own rows
                share(dim, nt, tid, 4, r0, r1);
                gemv_rows(Wo, att.data(), a_att, g.data(), r0, r1);
                for (int64_t i = r0; i < r1; i++) x[i] += g[i];
#pragma omp barrier
                norm_input(norm(2 * l + 1), W1.fmt >= Q8 || W3.fmt >= Q8);
                // gate and up for the same rows, then silu(g) * u and its int8 blocks, per thread
                share(hidden, nt, tid, 32, r0, r1);
                gemv_rows(W1, xn.data(), xa, g.data(), r0, r1);
                gemv_rows(W3, xn.data(), xa, u.data(), r0, r1);
                swiglu(g.data(), u.data(), h.data(), r0, r1);
                if (W2.fmt >= Q8 && hidden % 32 == 0)
                    quantize_blocks(h.data(), hidden, r0 / 32, (r1 + 31) / 32, a_hidden.q.data(), a_hidden.d.data(),
                                    a_hidden.s.data());
#pragma omp barrier
                share(dim, nt, tid, 4, r0, r1);
                gemv_rows(W2, h.data(), a_hidden, g.data(), r0, r1);
                for (int64_t i = r0; i < r1; i++) x[i] += g[i];
#pragma omp barrier
            }
            const Mat& H = head();
            norm_input(norm(2 * n_layers), H.fmt >= Q8);
            share(vocab, nt, tid, 4, r0, r1);
            gemv_rows(H, xn.data(), xa, out, r0, r1);
        }
        return logits;
    }

    // [X W_i^T for i in idx]: X [T, K] float, one product per matrix (prefill: the kernels for quantized
    // weights). Matrices sharing an input (q/k/v, gate/up) share its int8 form, made once.
    std::vector<at::Tensor> linear_many(std::vector<int64_t> idx, at::Tensor X) {
        TORCH_CHECK(X.dim() == 2, "linear: X must be 2-D");
        X = X.to(at::kFloat).contiguous();
        const int64_t T = X.size(0), K = X.size(1);
        Act A;
        ActTiles tiles;
        bool quantized = false;
        std::vector<at::Tensor> out;
        for (int64_t i : idx) {
            const Mat& W = mats.at(i);
            TORCH_CHECK(W.K == K, "linear: X must be [T, ", W.K, "]");
            if (W.fmt >= Q8 && !g_scalar && !quantized) {
                quantize_rows(X.data_ptr<float>(), T, K, A, true, nthreads);
#if LLMOS_AVX2
                tiles.pack(A, T, nthreads);
#endif
                quantized = true;
            }
            out.push_back(linear_with(W, X, A, tiles));
        }
        return out;
    }

    at::Tensor linear(int64_t i, at::Tensor X) { return linear_many({i}, X)[0]; }

    // Matrix i as bfloat16 [N, K] in natural order: each weight computed in float32 exactly as the
    // kernels compute it (d * (q + koff) + m), then rounded to nearest even. For prefill of long prompts
    // on CPUs whose bfloat16 matrix units (AMX, AVX512-BF16) outrun the int8 kernels (llmos/fast.py).
    at::Tensor dequant_bf16(int64_t i) {
        const Mat& W = mats.at(i);
        TORCH_CHECK(W.fmt >= Q8, "dequant_bf16: matrix ", i, " is not quantized");
        at::Tensor out = at::empty({W.N, W.K}, at::kBFloat16);
        uint16_t* o = (uint16_t*)out.data_ptr();
        const int64_t nb = W.nb;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t r = 0; r < W.N; r++) {
            const uint8_t* wr = W.w + r * W.row_bytes;
            uint16_t* orow = o + r * W.K;
            for (int64_t b = 0; b < nb; b++) {
                const float d = scale_at(W.d + r * nb, b, W.bf16_scales);
                const float m = W.m ? scale_at(W.m + r * nb, b, W.bf16_scales) : 0.f;
                float v[32];
                if (W.fmt == Q8) {
                    for (int e = 0; e < 32; e++) v[e] = d * (float)(int8_t)wr[pi_index(b, e, nb)];
                } else {  // as fast.Weight.dequantize: d * (q + koff) + m
                    const uint8_t* q = wr + 16 * b;
                    for (int e = 0; e < 16; e++) {
                        v[e] = d * ((float)(q[e] & 15) + W.koff) + m;
                        v[e + 16] = d * ((float)(q[e] >> 4) + W.koff) + m;
                    }
                }
                for (int e = 0; e < 32; e++) {  // float32 → bfloat16, round to nearest even
                    uint32_t u;
                    std::memcpy(&u, &v[e], 4);
                    orow[32 * b + e] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
                }
            }
        }
        return out;
    }

    at::Tensor linear_with(const Mat& W, at::Tensor X, const Act& A, const ActTiles& tiles) {
        const int64_t T = X.size(0);
        at::Tensor Y = at::empty({T, W.N}, at::kFloat);
        float* y = Y.data_ptr<float>();
        const float* xp = X.data_ptr<float>();
        if (W.fmt >= Q8 && !g_scalar) {
            gemm_q(W, A, tiles, T, y, nthreads);
        } else if (W.fmt >= Q8) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
            for (int64_t t = 0; t < T; t++) {
                Act A;
                quantize_rows(xp + t * W.K, 1, W.K, A);
                gemv_rows(W, nullptr, A, y + t * W.N, 0, W.N);
            }
        } else {
            Act none;
#pragma omp parallel for num_threads(nthreads) schedule(static)
            for (int64_t t = 0; t < T; t++) gemv_rows(W, xp + t * W.K, none, y + t * W.N, 0, W.N);
        }
        return Y;
    }

    // Seconds of this thread's CPU time for `iters` products of matrix i with one vector (kernel benchmarks).
    double bench_gemv(int64_t i, int64_t iters) {
        const Mat& W = mats.at(i);
        std::vector<float> xv(W.K), y(W.N);
        for (int64_t j = 0; j < W.K; j++) xv[j] = std::sin(0.1f * j);
        Act A;
        quantize_rows(xv.data(), 1, W.K, A);
        timespec t0, t1;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
        for (int64_t it = 0; it < iters; it++) gemv_rows(W, xv.data(), A, y.data(), 0, W.N);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
        return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    }

    at::Tensor embed_rows(at::Tensor ids) {
        ids = ids.to(at::kLong).contiguous();
        at::Tensor X = at::empty({ids.numel(), dim}, at::kFloat);
        const int64_t* p = ids.data_ptr<int64_t>();
        for (int64_t t = 0; t < ids.numel(); t++) {
            TORCH_CHECK(p[t] >= 0 && p[t] < vocab, "token ", p[t], " outside the vocabulary");
            embed_row(p[t], X.data_ptr<float>() + t * dim);
        }
        return X;
    }
};

// Test hooks: the activation quantizer as the kernels see it.
std::vector<at::Tensor> quantize_act(at::Tensor x) {
    x = x.to(at::kFloat).contiguous();
    const int64_t T = x.size(0), K = x.size(1);
    TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
    Act A;
    quantize_rows(x.data_ptr<float>(), T, K, A);
    at::Tensor q = at::empty({T, K}, at::kChar), d = at::empty({T, K / 32}, at::kFloat), s = at::empty({T, K / 32}, at::kFloat);
    std::memcpy(q.data_ptr(), A.q.data(), T * K);
    for (int64_t t = 0; t < T; t++) {
        std::memcpy(d.data_ptr<float>() + t * (K / 32), A.drow(t), (K / 32) * 4);
        std::memcpy(s.data_ptr<float>() + t * (K / 32), A.srow(t), (K / 32) * 4);
    }
    return {q, d, s};
}

// Read bandwidth in bytes/s: the best of `reps` passes of `nthreads` threads, each streaming its share of
// buf the way the decode kernels stream weights (32-byte loads, software prefetch ahead). The ceiling of
// batch-1 decoding is this divided by the bytes a token reads.
double read_bandwidth(const at::Tensor& buf, int64_t reps, int64_t nthreads) {
    const uint8_t* p = buf.data_ptr<uint8_t>();
    const int64_t n = buf.numel() / 1024 * 1024;
    double best = 0;
    volatile int64_t sink = 0;
    for (int64_t rep = 0; rep < reps; rep++) {
        const double t0 = omp_get_wtime();
        int64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
        {
            const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            const int64_t per = n / nt / 1024 * 1024, a = id * per, b = id == nt - 1 ? n : a + per;
#if LLMOS_AVX2
            __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
            for (int64_t i = a; i < b; i += 128) {
                _mm_prefetch((const char*)(p + i) + g_prefetch, _MM_HINT_T0);
                _mm_prefetch((const char*)(p + i) + g_prefetch + 64, _MM_HINT_T0);
                acc0 = _mm256_add_epi8(acc0, _mm256_load_si256((const __m256i*)(p + i)));
                acc1 = _mm256_add_epi8(acc1, _mm256_load_si256((const __m256i*)(p + i + 32)));
                acc2 = _mm256_add_epi8(acc2, _mm256_load_si256((const __m256i*)(p + i + 64)));
                acc3 = _mm256_add_epi8(acc3, _mm256_load_si256((const __m256i*)(p + i + 96)));
            }
            const __m256i acc = _mm256_add_epi8(_mm256_add_epi8(acc0, acc1), _mm256_add_epi8(acc2, acc3));
            total += _mm256_extract_epi64(acc, 0) + _mm256_extract_epi64(acc, 3);
#else
            int64_t t = 0;
            for (int64_t i = a; i < b; i += 8) t += *(const int64_t*)(p + i);
            total += t;
#endif
        }
        sink = sink + total;
        best = std::max(best, (double)n / (omp_get_wtime() - t0));
    }
    return best;
}

void set_prefetch(int64_t bytes) { g_prefetch = bytes; }
void set_scalar(bool on) { g_scalar = on; }
void set_rows(int64_t r) { g_rows = r; }

std::string simd() {
#if LLMOS_AVX2 && LLMOS_VNNI  // (an undefined LLMOS_VNNI reads as 0 here)
    return "avx2+vnni";
#else
    return LLMOS_AVX2 ? "avx2" : "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    py::class_<Model>(m, "Model")
        .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor,
                      at::Tensor, at::Tensor, std::vector<at::Tensor>, int64_t>())
        .def("add", &Model::add)
        .def("set_cache", &Model::set_cache)
        .def("decode", &Model::decode, py::call_guard<py::gil_scoped_release>())
        .def("linear", &Model::linear, py::call_guard<py::gil_scoped_release>())
        .def("linear_many", &Model::linear_many, py::call_guard<py::gil_scoped_release>())
        .def("embed_rows", &Model::embed_rows)
        .def("dequant_bf16", &Model::dequant_bf16, py::call_guard<py::gil_scoped_release>())
        .def("bench_gemv", &Model::bench_gemv)
        .def_readwrite("nthreads", &Model::nthreads);
    m.def("quantize_act", &quantize_act);
    m.def("simd", &simd);
    m.def("read_bandwidth", &read_bandwidth);
    m.def("set_prefetch", &set_prefetch);
    m.def("set_scalar", &set_scalar);
    m.def("set_rows", &set_rows);
}
