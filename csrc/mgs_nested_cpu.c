/* The CPU kernels of the nested micro-gated MLP (treeffn_hf/modeling/mgs_kernels_cpu.py loads them
   through ctypes and documents the math). This file is the source of truth: the remote-code bundle
   carries a copy as a Python string, treeffn_hf/modeling/mgs_kernels_cpu_source.py, written by
   `python csrc/embed.py` (tests/test_csrc.py checks that the two agree, compiles every variant with
   -Wall -Wextra -Werror, and runs the kernel tests under AddressSanitizer). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512VNNI__)
#error "needs AVX-512 F, BW, VL and VNNI"
#endif

/* The counting build (-DTREEFFN_COUNT_BYTES, for the tests): every read of a weight tensor marks
   the bytes it touches in a map of that tensor, so the bytes a path reports are held to the bytes
   it read. A read outside every registered tensor counts as stray. */
#ifdef TREEFFN_COUNT_BYTES
#define COUNT_REGIONS 16
static struct { const uint8_t *base; size_t size; uint8_t *map; } count_regions[COUNT_REGIONS];
static int64_t count_stray;
static void touch(const void *p, size_t n) {
    const uint8_t *q = (const uint8_t *)p;
    for (int r = 0; r < COUNT_REGIONS; ++r)
        if (count_regions[r].map && q >= count_regions[r].base && q + n <= count_regions[r].base + count_regions[r].size) {
            memset(count_regions[r].map + (q - count_regions[r].base), 1, n);
            return;
        }
#pragma omp atomic
    count_stray += (int64_t)n;
}
#define TOUCH(p, n) touch((p), (size_t)(n))
void count_register(int region, const void *base, int64_t size) {
    free(count_regions[region].map);
    count_regions[region].base = (const uint8_t *)base; count_regions[region].size = (size_t)size;
    count_regions[region].map = calloc((size_t)size, 1);
    count_stray = 0;
}
/* bytes of `region` touched since it was registered; region -1: the stray bytes */
int64_t count_touched(int region) {
    if (region < 0) return count_stray;
    int64_t total = 0;
    for (size_t i = 0; i < count_regions[region].size; ++i) total += count_regions[region].map[i];
    return total;
}
#else
#define TOUCH(p, n) ((void)0)
#endif

/* Tokens as two int8 planes per group of G columns: x ~ step * (q + r / 256), q = round(x / step)
   with step = the group's largest magnitude / 127, r the rounded residual in steps of step / 256
   (about 16 bits in all). Three layouts:
   - SPLIT (the fused kernel; padded to a multiple of 4 tokens): even (xe, re) and odd (xo, ro)
     columns, so that packed byte b of a row (column 2b in its low nibble, 2b + 1 in its high one)
     meets xe[b] and xo[b];
   - TILED (the scoring GEMM; padded to a multiple of GEMM_TOKENS): in xe, per tile and chunk of
     8 columns, 16 bytes a token, its 8 q then its 8 r, so that one pointer reaches the whole tile;
   - ROWS (the AMX kernel; padded to a multiple of 16): q in xe and r in re, (padded, K) each. */
#define GEMM_TOKENS 8
enum { SPLIT, TILED, ROWS };
typedef struct {
    int n, padded, K, G, groups, half;
    int8_t *xe, *xo, *re, *ro;
    /* per token and group: the step, the exact sum of x, and the sum of the rounded x (the -8
       offset of the weight codes meets the same rounded x as the codes do, so the error is that
       of (code - 8), centred, not of code) */
    float *step, *sum, *qsum;
} Tokens;

/* The two planes of 16 values v (the float32 operations of `quantize_tokens`, in its order). */
static inline void round_planes(__m512 v, __m512 steps, __m512 inverses, __m512i *q, __m512i *r) {
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    *q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverses)), top), bottom);
    const __m512 rest = _mm512_sub_ps(v, _mm512_mul_ps(steps, _mm512_cvtepi32_ps(*q)));
    *r = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(
        _mm512_mul_ps(_mm512_mul_ps(rest, inverses), _mm512_set1_ps(256.f))), top), bottom);
}

static void tokens_prepare(Tokens *T, int n, int K, int G, const float *x, int layout) {
    const int tile = GEMM_TOKENS, tiled = layout == TILED;
    T->n = n; T->K = K; T->G = G; T->groups = K / G; T->half = K / 2;
    T->padded = tiled ? (n + tile - 1) / tile * tile : layout == ROWS ? (n + 15) / 16 * 16 : n == 1 ? 1 : (n + 3) / 4 * 4;
    const size_t codes = (size_t)T->padded * T->half, groups = (size_t)T->padded * T->groups;
    T->xe = calloc(layout == SPLIT ? codes : layout == ROWS ? 2 * codes : 4 * codes, 1);
    T->re = layout == TILED ? NULL : calloc(layout == ROWS ? 2 * codes : codes, 1);
    T->xo = layout == SPLIT ? calloc(codes, 1) : NULL; T->ro = layout == SPLIT ? calloc(codes, 1) : NULL;
    T->step = calloc(groups, sizeof(float)); T->sum = calloc(groups, sizeof(float));
    T->qsum = calloc(groups, sizeof(float));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int t = 0; t < n; ++t)
        for (int g = 0; g < T->groups; ++g) {
            const float *xg = x + (size_t)t * K + (size_t)g * G;
            __m512 total = _mm512_setzero_ps(), peak = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 16) {
                const __m512 v = _mm512_loadu_ps(xg + k);
                total = _mm512_add_ps(total, v);
                peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
            }
            const float largest = _mm512_reduce_max_ps(peak);
            const float step = largest > 0.f ? largest / 127.f : 1.f, inverse = 1.f / step;
            const __m512 steps = _mm512_set1_ps(step), inverses = _mm512_set1_ps(inverse);
            const size_t at = (size_t)t * T->groups + g, base = (size_t)t * T->half + (size_t)g * (G / 2);
            __m512i whole = _mm512_setzero_si512(), fine = _mm512_setzero_si512(), q, r;
            if (tiled)
                for (int k = 0; k < G; k += 16) {
                    round_planes(_mm512_loadu_ps(xg + k), steps, inverses, &q, &r);
                    const __m128i q8 = _mm512_cvtepi32_epi8(q), r8 = _mm512_cvtepi32_epi8(r);
                    const int c = (g * G + k) / 8; /* the first of the two chunks */
                    int8_t *dst = T->xe + (((size_t)(t / tile) * (K / 8) + c) * tile + t % tile) * 16;
                    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi64(q8, r8));
                    _mm_storeu_si128((__m128i *)(dst + 16 * tile), _mm_unpackhi_epi64(q8, r8));
                    whole = _mm512_add_epi32(whole, q); fine = _mm512_add_epi32(fine, r);
                }
            else if (layout == ROWS)
                for (int k = 0; k < G; k += 16) {
                    round_planes(_mm512_loadu_ps(xg + k), steps, inverses, &q, &r);
                    _mm_storeu_si128((__m128i *)(T->xe + (size_t)t * K + g * G + k), _mm512_cvtepi32_epi8(q));
                    _mm_storeu_si128((__m128i *)(T->re + (size_t)t * K + g * G + k), _mm512_cvtepi32_epi8(r));
                    whole = _mm512_add_epi32(whole, q); fine = _mm512_add_epi32(fine, r);
                }
            else
                for (int k = 0; k < G; k += 32) { /* 32 columns: 16 even, 16 odd */
                    const __m512 lo = _mm512_loadu_ps(xg + k), hi = _mm512_loadu_ps(xg + k + 16);
                    for (int parity = 0; parity < 2; ++parity) {
                        round_planes(_mm512_permutex2var_ps(lo, parity ? odd : even, hi), steps, inverses, &q, &r);
                        _mm_storeu_si128((__m128i *)((parity ? T->xo : T->xe) + base + k / 2), _mm512_cvtepi32_epi8(q));
                        _mm_storeu_si128((__m128i *)((parity ? T->ro : T->re) + base + k / 2), _mm512_cvtepi32_epi8(r));
                        whole = _mm512_add_epi32(whole, q); fine = _mm512_add_epi32(fine, r);
                    }
                }
            const float q_sum = (float)_mm512_reduce_add_epi32(whole), r_sum = (float)_mm512_reduce_add_epi32(fine);
            T->step[at] = step; T->sum[at] = _mm512_reduce_add_ps(total);
            T->qsum[at] = step * (q_sum + r_sum / 256.f);
        }
}

static void tokens_free(Tokens *T) {
    free(T->xe); free(T->xo); free(T->re); free(T->ro); free(T->step); free(T->sum); free(T->qsum);
}

static inline __m512 bf16_load(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __mmask16 first_lanes(int count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

static inline float bf16_scalar(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* NR rows times NT tokens of a 4-bit matrix whose weight is ((code - 8) * scale + zero) per group
   (scale times `factor`; zeros may be NULL): dst[r * NT + t]. The codes meet both int8 planes of
   the tokens in VNNI dot products (u8 x s8, four products a lane), combined exactly in int32 and
   scaled per group in float32; the zero points meet the tokens' exact float32 sums. */
#define DEFINE_BLOCK(NR, NT)                                                                           \
static inline void block_##NR##x##NT(const Tokens *T, int t0, const uint8_t *const *p,                 \
                                     const uint8_t *const *next, const uint16_t *const *s,             \
                                     const uint16_t *const *z, float factor, float *dst) {             \
    const int gb = T->G / 2, half = T->half, groups = T->groups;                                       \
    const __m512i low = _mm512_set1_epi8(15);                                                          \
    const __mmask16 halves = T->G == 64 ? 0xFF00 : 0; /* groups of 64 fill half a vector each */      \
    const float unit = factor / 256.f; /* d counts steps / 256 */                                     \
    __m512 acc[NR][NT];                                                                                \
    for (int r = 0; r < NR; ++r)                                                                       \
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();                                  \
    for (int b = 0; b < half; b += 64) {                                                               \
        const __mmask64 m = half - b >= 64 ? ~0ULL : (1ULL << (half - b)) - 1;                        \
        const int g0 = b / gb, g1 = gb == 32 && g0 + 1 < groups ? g0 + 1 : g0; /* the vector's groups */ \
        __m512i xl[NT], xh[NT], rl[NT], rh[NT];                                                        \
        for (int t = 0; t < NT; ++t) {                                                                 \
            const size_t at = (size_t)(t0 + t) * half + b;                                             \
            xl[t] = _mm512_maskz_loadu_epi8(m, T->xe + at); xh[t] = _mm512_maskz_loadu_epi8(m, T->xo + at); \
            rl[t] = _mm512_maskz_loadu_epi8(m, T->re + at); rh[t] = _mm512_maskz_loadu_epi8(m, T->ro + at); \
        }                                                                                              \
        for (int r = 0; r < NR; ++r) {                                                                 \
            _mm_prefetch((const char *)(next[r] + b), _MM_HINT_T0);                                    \
            const __m512i v = _mm512_maskz_loadu_epi8(m, p[r] + b);                                    \
            TOUCH(p[r] + b, half - b >= 64 ? 64 : half - b);                                           \
            TOUCH(s[r] + g0, 2); TOUCH(s[r] + g1, 2);                                                  \
            const __m512i wl = _mm512_and_si512(v, low);                                               \
            const __m512i wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                         \
            const float s0 = bf16_scalar(s[r][g0]) * unit, s1 = bf16_scalar(s[r][g1]) * unit;          \
            for (int t = 0; t < NT; ++t) {                                                             \
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wl, xl[t]);                    \
                d = _mm512_dpbusd_epi32(d, wh, xh[t]);                                                 \
                __m512i e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wl, rl[t]);                    \
                e = _mm512_dpbusd_epi32(e, wh, rh[t]);                                                 \
                d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), e); /* 256 q + r, exact in int32 */     \
                /* scale * step of the vector's groups, from scalars: a scratch row written and read  \
                   back with masks would defeat store forwarding */                                   \
                const float *step = T->step + (size_t)(t0 + t) * groups;                               \
                const __m512 scale = _mm512_mask_blend_ps(halves, _mm512_set1_ps(s0 * step[g0]),       \
                                                          _mm512_set1_ps(s1 * step[g1]));              \
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r][t]);                  \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    /* the constant terms, sixteen groups a step: scale * (-8 * sum x~) + zero * sum x */             \
    for (int g0 = 0; g0 < groups; g0 += 16) {                                                          \
        const __mmask16 m = first_lanes(groups - g0);                                                  \
        for (int t = 0; t < NT; ++t) {                                                                 \
            const size_t at = (size_t)(t0 + t) * groups + g0;                                          \
            const __m512 sum = _mm512_maskz_loadu_ps(m, T->sum + at);                                  \
            const __m512 shifted = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, T->qsum + at), _mm512_set1_ps(-8.f * factor)); \
            for (int r = 0; r < NR; ++r) {                                                             \
                acc[r][t] = _mm512_fmadd_ps(bf16_load(m, s[r] + g0), shifted, acc[r][t]);              \
                if (z) acc[r][t] = _mm512_fmadd_ps(bf16_load(m, z[r] + g0), sum, acc[r][t]);           \
                TOUCH(s[r] + g0, 2 * __builtin_popcount(m));                                           \
                if (z) TOUCH(z[r] + g0, 2 * __builtin_popcount(m));                                    \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    for (int r = 0; r < NR; ++r)                                                                       \
        for (int t = 0; t < NT; ++t) dst[r * NT + t] = _mm512_reduce_add_ps(acc[r][t]);                \
}
DEFINE_BLOCK(4, 1)
DEFINE_BLOCK(1, 4)

/* out[t * stride + q] (q = rows[q] when scatter) = row rows[q] (every row when rows is NULL) of
   the 4-bit matrix times token t; R rows. One token: four rows a block (four streams); more:
   four tokens a block. */
static void int4_rows(const Tokens *T, const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                      float factor, const int32_t *rows, int R, float *out, int stride, int scatter, int threads) {
    const int half = T->half, groups = T->groups;
    const int NR = T->n == 1 ? 4 : 1;
    /* prefetch about 4 KB ahead, in whole blocks: short rows need several blocks to cover DRAM latency */
    const int ahead = NR * (4096 / (half * NR) > 1 ? 4096 / (half * NR) : 1);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int q0 = 0; q0 < R; q0 += NR) {
        const uint8_t *p[4], *next[4];
        const uint16_t *s[4], *z[4];
        float dst[16];
        for (int j = 0; j < NR; ++j) {
            const int q = q0 + j < R ? q0 + j : R - 1, r = rows ? rows[q] : q;
            const int qn = q + ahead < R ? q + ahead : q, rn = rows ? rows[qn] : qn;
            p[j] = codes + (size_t)r * half; next[j] = codes + (size_t)rn * half;
            s[j] = scales + (size_t)r * groups; z[j] = zeros ? zeros + (size_t)r * groups : NULL;
        }
        if (NR == 4) {
            block_4x1(T, 0, p, next, s, zeros ? z : NULL, factor, dst);
            for (int j = 0; j < 4 && q0 + j < R; ++j) out[scatter ? rows[q0 + j] : q0 + j] = dst[j];
        } else {
            for (int t0 = 0; t0 < T->padded; t0 += 4) {
                block_1x4(T, t0, p, next, s, zeros ? z : NULL, factor, dst);
                for (int t = t0; t < t0 + 4 && t < T->n; ++t) out[(size_t)t * stride + (scatter ? rows[q0] : q0)] = dst[t - t0];
            }
        }
    }
}

/* e^v in float32: 2^r * e^f with r = round(v / ln 2), |f| <= ln 2 / 2, e^f by its degree-6
   Taylor polynomial (relative error ~1e-7). */
static inline __m512 exp_ps(__m512 v) {
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fmadd_ps(r, _mm512_set1_ps(-0.693145751953125f), v); /* ln 2 in two parts */
    f = _mm512_fmadd_ps(r, _mm512_set1_ps(-1.428606765330187045e-06f), f);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, r);
}

static inline __m512 silu_ps(__m512 v) {
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

/* The predictor's scores |silu(g~) u~| of neurons i..i+15 (`valid` lanes) from one token's coarse
   row: its gate rows at c[i], its up rows at c[I + i]. */
static inline __m512 neuron_scores(const float *c, int i, int I, __mmask16 valid) {
    const __m512 g = _mm512_maskz_loadu_ps(valid, c + i), u = _mm512_maskz_loadu_ps(valid, c + I + i);
    return _mm512_abs_ps(_mm512_mul_ps(silu_ps(g), u));
}

/* Four rows of down (H2, I), float32 or bf16 (WEIGHT, LOAD), times NT tokens of h (padded, I):
   four rows a block so that the prefetcher follows four streams; each weight vector is loaded once
   for the block's tokens. */
#define DEFINE_DOWN_BLOCK(NAME, NT, WEIGHT, LOAD)                                                      \
static inline void NAME(int k0, int I, const void *down, const float *h, float *dst) {                \
    __m512 acc[4][NT];                                                                                 \
    for (int j = 0; j < 4; ++j)                                                                        \
        for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();                                  \
    for (int i = 0; i < I; i += 16) {                                                                  \
        const __mmask16 m = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);      \
        __m512 hv[NT];                                                                                 \
        for (int t = 0; t < NT; ++t) hv[t] = _mm512_maskz_loadu_ps(m, h + (size_t)t * I + i);         \
        for (int j = 0; j < 4; ++j) {                                                                  \
            const WEIGHT *d = (const WEIGHT *)down + (size_t)(k0 + j) * I + i;                         \
            _mm_prefetch((const char *)(d + 4 * (size_t)I), _MM_HINT_T0);                              \
            const __m512 w = LOAD(m, d);                                                               \
            TOUCH(d, sizeof(WEIGHT) * __builtin_popcount(m));                                          \
            for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_fmadd_ps(w, hv[t], acc[j][t]);             \
        }                                                                                              \
    }                                                                                                  \
    for (int j = 0; j < 4; ++j)                                                                        \
        for (int t = 0; t < NT; ++t) dst[j * NT + t] = _mm512_reduce_add_ps(acc[j][t]);                \
}
DEFINE_DOWN_BLOCK(down_f32_1, 1, float, _mm512_maskz_loadu_ps)
DEFINE_DOWN_BLOCK(down_f32_4, 4, float, _mm512_maskz_loadu_ps)
DEFINE_DOWN_BLOCK(down_bf16_1, 1, uint16_t, bf16_load)
DEFINE_DOWN_BLOCK(down_bf16_4, 4, uint16_t, bf16_load)

/* out (n, H2) = h (n, I) @ down (H2, I)^T, h padded to `padded` rows (1, or a multiple of 4).
   The last block of rows overlaps the one before when H2 is not a multiple of 4. */
static void down_project(int n, int padded, int H2, int I, const void *down, int bf16, const float *h, float *out,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < (H2 + 3) / 4; ++b) {
        const int k0 = 4 * b + 4 <= H2 ? 4 * b : H2 - 4, NT = padded == 1 ? 1 : 4;
        float dst[16];
        for (int t0 = 0; t0 < padded; t0 += 4) {
            if (NT == 1) (bf16 ? down_bf16_1 : down_f32_1)(k0, I, down, h, dst);
            else (bf16 ? down_bf16_4 : down_f32_4)(k0, I, down, h + (size_t)t0 * I, dst);
            for (int j = 0; j < 4; ++j)
                for (int t = 0; t < NT && t0 + t < n; ++t) out[(size_t)(t0 + t) * H2 + k0 + j] = dst[j * NT + t];
        }
    }
}

/* One int8 row of down (a neuron's K outputs, a bf16 scale per G of them) into the accumulators
   acc (nt, K) of the tokens, times each token's h: every 64-column piece is converted once and
   meets every token that selected the neuron. */
static inline void down_row_accumulate(int nt, int K, int I, int G, const int8_t *row, const uint16_t *scales,
                                       const float *h, float *acc) {
    for (int k0 = 0; k0 < K; k0 += 64) {
        const float scale = bf16_scalar(scales[k0 / G]);
        __m512 w[4];
        for (int j = 0; j < 4; ++j)
            w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k0 + 16 * j))));
        for (int t = 0; t < nt; ++t) {
            const float a = h[(size_t)t * I] * scale;
            if (a == 0.f) continue; /* token t did not select this neuron */
            const __m512 coefficient = _mm512_set1_ps(a);
            float *o = acc + (size_t)t * K + k0;
            for (int j = 0; j < 4; ++j)
                _mm512_storeu_ps(o + 16 * j, _mm512_fmadd_ps(w[j], coefficient, _mm512_loadu_ps(o + 16 * j)));
        }
    }
}

/* out (n, K) = h (n, I) @ down over the U neurons in `rows` only, down held as int8 rows (I, K);
   K a multiple of 64 (the group size is). Each thread streams whole rows of its share of the union
   (contiguous bytes; the row after next is prefetched, as the gaps between selected rows defeat
   the hardware's stream prefetch) into accumulators of its own, summed at the end. A thread's share
   is a fixed range of neuron indices, not of the union, so a token's sums do not depend on what
   the other tokens of its batch selected (a served batch decodes as each request alone would). */
static void down_rows_project(int n, int K, int I, int G, const int8_t *codes, const uint16_t *scales,
                              const int32_t *rows, int U, const float *h, float *out, int threads) {
    const int groups = K / G;
    float *partial = calloc((size_t)threads * n * K, sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        const int id = omp_get_thread_num(), count = omp_get_num_threads();
        const int lo = (int)((int64_t)I * id / count), hi = (int)((int64_t)I * (id + 1) / count);
        int u0 = 0;
        while (u0 < U && rows[u0] < lo) ++u0; /* rows ascend */
        int u1 = u0;
        while (u1 < U && rows[u1] < hi) ++u1;
        float *acc = partial + (size_t)id * n * K;
        for (int u = u0; u < u1; ++u) {
            const int i = rows[u];
            if (u + 2 < u1)
                for (int k = 0; k < K; k += 64) _mm_prefetch((const char *)(codes + (size_t)rows[u + 2] * K + k), _MM_HINT_T0);
            TOUCH(codes + (size_t)i * K, K);
            TOUCH(scales + (size_t)i * groups, 2 * groups);
            down_row_accumulate(n, K, I, G, codes + (size_t)i * K, scales + (size_t)i * groups, h + i, acc);
        }
    }
    for (size_t e = 0; e < (size_t)n * K; e += 16) { /* n * K is a multiple of 64 */
        __m512 sum = _mm512_loadu_ps(partial + e);
        for (int id = 1; id < threads; ++id) sum = _mm512_add_ps(sum, _mm512_loadu_ps(partial + (size_t)id * n * K + e));
        _mm512_storeu_ps(out + e, sum);
    }
    free(partial);
}

static void coarse_gemm(const Tokens *T, const uint8_t *blocks, const float *scales, const float *zeros, int R,
                        float *coarse, int threads);

/* One nested micro-gated MLP layer, as the Python side prepares it once.
   hi, lo: (2I, K/2) packed codes of [gate; up]; a weight is (hi - 8) * scale + zero + (lo - 8) * scale / 16
   with bf16 scales, zeros (2I, K/G). down: (K, I) in the stock layout, float32, or bf16 when
   down_bf16 (the weights are bf16 values: half the bytes, the same result); or, when down_rows is
   not NULL, int8 rows (I, K), one per neuron, with bf16 scales (I, K/G): only the selected rows are
   read. */
typedef struct {
    int64_t K, I, G;
    const uint8_t *hi, *lo;
    const uint16_t *scales, *zeros;
    const void *down;
    int64_t down_bf16;
    float threshold;
    /* for the scoring GEMM: hi repacked in blocks of 16 rows (`coarse_gemm`), rows padded to R, a
       multiple of 16; scales and zeros as float32 (groups, R) */
    const uint8_t *hi_blocks;
    const float *scales_t, *zeros_t;
    int64_t R;
    /* for the AMX kernel, NULL until it first runs: gate and up each padded to Ip rows (a multiple
       of 32), their nibbles unpacked in 1 KB tiles (row block, 64 columns: byte 64 kk + 4 j + b is
       column 4 kk + b of row j), the scales and zeros as float32 (groups, 2 Ip), and down as bf16
       tiles (16 outputs, 32 neurons: element 32 kk + 2 j + b is neuron 2 kk + b of output j) */
    const uint8_t *hi_tiles, *lo_tiles;
    const float *scales_amx, *zeros_amx;
    const uint16_t *down_tiles;
    int64_t Ip;
    const int8_t *down_rows;
    const uint16_t *down_row_scales;
} Layer;

/* The layer on n fp32 tokens x (n, K), threshold selection: writes out (n, K) and, when not
   NULL, counts[t] (neurons token t computes) and scores (n, I). Returns the neurons computed,
   summed over tokens. */
int mgs_nested_forward(const Layer *L, int n, const float *x, float *out, int32_t *counts, float *scores,
                       int threads) {
    const int K = (int)L->K, I = (int)L->I, G = (int)L->G;
    const uint8_t *hi = L->hi, *lo = L->lo;
    const uint16_t *scales = L->scales, *zeros = L->zeros;
    const float threshold = L->threshold;
    const int R = (int)L->R;
    Tokens T;
    tokens_prepare(&T, n, K, G, x, SPLIT);
    float *coarse = malloc(sizeof(float) * (size_t)n * R);
    if (n >= GEMM_TOKENS) { /* the scoring GEMM; fewer tokens read the rows in four streams, faster there */
        Tokens tiles;
        tokens_prepare(&tiles, n, K, G, x, TILED);
        coarse_gemm(&tiles, L->hi_blocks, L->scales_t, L->zeros_t, R, coarse, threads);
        tokens_free(&tiles);
    } else
        int4_rows(&T, hi, scales, zeros, 1.f, NULL, 2 * I, coarse, R, 0, threads);

    /* scores and selection, sixteen neurons a step; the union of the tokens' selections */
    const int blocks = (I + 15) / 16;
    __mmask16 *chosen = calloc((size_t)n * blocks, sizeof(__mmask16));
    int32_t *rows = malloc(sizeof(int32_t) * 2 * (size_t)(blocks * 16));
    int U = 0, selected = 0;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int k = 0; k < blocks; ++k) {
        const int i = 16 * k;
        const __mmask16 valid = first_lanes(I - i);
        __mmask16 any = 0;
        for (int t = 0; t < n; ++t) {
            const __m512 score = neuron_scores(coarse + (size_t)t * R, i, I, valid);
            if (scores) _mm512_mask_storeu_ps(scores + (size_t)t * I + i, valid, score);
            const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, score, _mm512_set1_ps(threshold), _CMP_GT_OQ);
            chosen[(size_t)t * blocks + k] = m;
            selected += __builtin_popcount(m);
            any |= m;
        }
        _mm512_mask_compressstoreu_epi32(rows + U, any, _mm512_add_epi32(lane, _mm512_set1_epi32(i)));
        U += __builtin_popcount(any);
    }
    for (int q = 0; q < U; ++q) rows[U + q] = rows[q] + I; /* their up_proj rows */

    /* the low nibbles of the union's rows, written in place: fine[t, row] */
    float *fine = calloc((size_t)n * 2 * I, sizeof(float));
    if (U) int4_rows(&T, lo, scales, NULL, 1.f / 16.f, rows, 2 * U, fine, 2 * I, 1, threads);
    float *h = calloc((size_t)T.padded * I, sizeof(float));
    for (int t = 0; t < n; ++t) {
        const float *c = coarse + (size_t)t * R, *f = fine + (size_t)t * 2 * I;
        for (int k = 0; k < blocks; ++k) {
            const int i = 16 * k;
            const __mmask16 m = chosen[(size_t)t * blocks + k];
            if (!m) continue;
            const __m512 g = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + i), _mm512_maskz_loadu_ps(m, f + i));
            const __m512 u = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + I + i), _mm512_maskz_loadu_ps(m, f + I + i));
            _mm512_mask_storeu_ps(h + (size_t)t * I + i, m, _mm512_mul_ps(silu_ps(g), u));
        }
    }
    if (L->down_rows)
        down_rows_project(n, K, I, G, L->down_rows, L->down_row_scales, rows, U, h, out, threads);
    else
        down_project(n, T.padded, K, I, L->down, (int)L->down_bf16, h, out, threads);
    if (counts)
        for (int t = 0; t < n; ++t) {
            counts[t] = 0;
            for (int k = 0; k < blocks; ++k) counts[t] += __builtin_popcount(chosen[(size_t)t * blocks + k]);
        }
    free(coarse); free(chosen); free(rows); free(fine); free(h);
    tokens_free(&T);
    return selected;
}

/* bf16 <-> float32 for the bf16 entry point. The rounding is to nearest even, NaN to the quiet
   NaN 0x7FC0, as PyTorch's `.to(torch.bfloat16)`, so a bf16 model's layer gives the bits the
   float32 entry point's output rounded by PyTorch would. AVX-512F only: no AVX512-BF16 needed. */
static void bf16_to_float(size_t count, const uint16_t *src, float *dst) {
    size_t e = 0;
    for (; e + 16 <= count; e += 16) _mm512_storeu_ps(dst + e, bf16_load(0xFFFF, src + e));
    for (; e < count; ++e) dst[e] = bf16_scalar(src[e]);
}

static void float_to_bf16(size_t count, const float *src, uint16_t *dst) {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0x7FC0);
    for (size_t e = 0; e < count; e += 16) {
        const __mmask16 m = first_lanes((int)(count - e < 16 ? count - e : 16));
        const __m512 v = _mm512_maskz_loadu_ps(m, src + e);
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(half, lsb)), 16);
        rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
        _mm256_mask_storeu_epi16(dst + e, m, _mm512_cvtepi32_epi16(rounded));
    }
}

/* `mgs_nested_forward` on bf16 tokens, writing bf16: a bf16 model's decode step calls the layer
   without two PyTorch conversions around it (about 5 us a layer, a tenth of its time). */
int mgs_nested_forward_bf16(const Layer *L, int n, const uint16_t *x, uint16_t *out, int32_t *counts, float *scores,
                            int threads) {
    const size_t count = (size_t)n * L->K;
    float *xf = calloc(count, sizeof(float)), *of = malloc(sizeof(float) * count); /* calloc: GCC cannot see the copy fill it */
    bf16_to_float(count, x, xf);
    const int selected = mgs_nested_forward(L, n, xf, of, counts, scores, threads);
    float_to_bf16(count, of, out);
    free(xf); free(of);
    return selected;
}

/* coarse (n, R) = the high-nibble matrix (R rows, a multiple of 16) times the tokens (the
   tiled layout), without horizontal sums: the lanes are 16 rows and the tokens' four-byte groups are
   broadcast. `blocks` holds 64 bytes per 16 rows and 8 columns: byte 4j + b has column 8c + b of
   row j in its low nibble and column 8c + 4 + b in its high one. Per group of G columns the
   int32 sums of both planes are combined exactly, then scaled in float32. Tiles of GEMM_TOKENS
   tokens (fewer pad them with zeros). */
typedef int32_t __attribute__((may_alias)) word; /* four int8 read as one, for broadcasts */
static void coarse_gemm(const Tokens *T, const uint8_t *blocks, const float *scales, const float *zeros, int R,
                        float *coarse, int threads) {
    const int G = T->G, groups = T->groups, chunks = T->K / 8;
    const int row_blocks = R / 16, token_tiles = T->padded / GEMM_TOKENS;
    const __m512i low = _mm512_set1_epi8(15);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int task = 0; task < row_blocks * token_tiles; ++task) {
        const int rb = task / token_tiles, t0 = task % token_tiles * GEMM_TOKENS;
        const uint8_t *w = blocks + (size_t)rb * chunks * 64;
        const int8_t *tile = T->xe + (size_t)(t0 / GEMM_TOKENS) * chunks * GEMM_TOKENS * 16;
        __m512 acc[GEMM_TOKENS];
        #pragma GCC unroll 8
        for (int t = 0; t < GEMM_TOKENS; ++t) acc[t] = _mm512_setzero_ps();
        for (int g = 0; g < groups; ++g) {
            __m512i dq[GEMM_TOKENS], dr[GEMM_TOKENS];
            #pragma GCC unroll 8
            for (int t = 0; t < GEMM_TOKENS; ++t) dq[t] = dr[t] = _mm512_setzero_si512();
            for (int c = g * G / 8; c < (g + 1) * G / 8; ++c) {
                const __m512i v = _mm512_loadu_si512(w + (size_t)c * 64);
                TOUCH(w + (size_t)c * 64, 64);
                const __m512i wl = _mm512_and_si512(v, low);
                const __m512i wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                #pragma GCC unroll 8
                for (int t = 0; t < GEMM_TOKENS; ++t) {
                    const word *qr = (const word *)(tile + ((size_t)c * GEMM_TOKENS + t) * 16);
                    dq[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dq[t], wl, _mm512_set1_epi32(qr[0])),
                                                wh, _mm512_set1_epi32(qr[1]));
                    dr[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dr[t], wl, _mm512_set1_epi32(qr[2])),
                                                wh, _mm512_set1_epi32(qr[3]));
                }
            }
            const __m512 s = _mm512_loadu_ps(scales + (size_t)g * R + 16 * rb);
            TOUCH(scales + (size_t)g * R + 16 * rb, 64);
            #pragma GCC unroll 8
            for (int t = 0; t < GEMM_TOKENS; ++t) {
                const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(dq[t], 8), dr[t]));
                const float unit = T->step[(size_t)(t0 + t) * groups + g] / 256.f;
                acc[t] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(unit)), acc[t]);
            }
        }
        for (int g = 0; g < groups; ++g) { /* the constant terms: scale * (-8 * sum x~) + zero * sum x */
            const __m512 s = _mm512_loadu_ps(scales + (size_t)g * R + 16 * rb);
            const __m512 z = _mm512_loadu_ps(zeros + (size_t)g * R + 16 * rb);
            TOUCH(zeros + (size_t)g * R + 16 * rb, 64);
            #pragma GCC unroll 8
            for (int t = 0; t < GEMM_TOKENS; ++t) {
                const size_t at = (size_t)(t0 + t) * groups + g;
                acc[t] = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.f * T->qsum[at]), acc[t]);
                acc[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(T->sum[at]), acc[t]);
            }
        }
        for (int t = 0; t < GEMM_TOKENS && t0 + t < T->n; ++t)
            _mm512_storeu_ps(coarse + (size_t)(t0 + t) * R + 16 * rb, acc[t]);
    }
}

/* The predictor's scores |silu(g~) u~| of n fp32 tokens x (n, K) into scores (n, I), through
   the scoring GEMM (the layer's other work is left to the caller's GEMMs). */
void mgs_nested_scores(const Layer *L, int n, const float *x, float *scores, int threads) {
    const int K = (int)L->K, I = (int)L->I, R = (int)L->R;
    Tokens T;
    tokens_prepare(&T, n, K, (int)L->G, x, TILED);
    float *coarse = malloc(sizeof(float) * (size_t)n * R);
    coarse_gemm(&T, L->hi_blocks, L->scales_t, L->zeros_t, R, coarse, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < n; ++t) {
        const float *c = coarse + (size_t)t * R;
        for (int i = 0; i < I; i += 16) {
            const __mmask16 valid = first_lanes(I - i);
            _mm512_mask_storeu_ps(scores + (size_t)t * I + i, valid, neuron_scores(c, i, I, valid));
        }
    }
    free(coarse);
    tokens_free(&T);
}

/* ---- The prefill kernel: the same layer on AMX tiles (Sapphire Rapids and later) ----
   Compiled where -march=native enables AMX; `amx_enable` asks Linux for the tile state (granted
   per process) and says whether the functions below can run. The math is the fused kernel's: the
   tokens' two int8 planes meet the unpacked nibbles in int8 tile products (exact int32 sums, per
   group of G columns, scaled in float32), and down_proj (bf16 values) meets h split into three
   bf16 parts (h1 + h2 + h3 holds float32's 24 bits) in bf16 tile products that accumulate in
   float32: the fused kernel's products, summed in another order. */
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* eight tiles of 16 rows of 64 bytes, in the calling thread (the configuration is per thread) */
static void tiles_configure(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int i = 0; i < 8; ++i) { config.colsb[i] = 64; config.rows[i] = 16; }
    _tile_loadconfig(&config);
}

int amx_enable(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* AMX_BLOCKS blocks of 16 neurons a task: each int8 tile of the tokens, loaded once, meets the
   gate and up rows of all of them (the tile loads, not the products, bound this loop). */
#define AMX_BLOCKS 8

/* For 16 tokens (block tb) and `count` <= AMX_BLOCKS blocks of 16 neurons from nb0 (the AMX
   operands' padded layout: Ip rows of gate, then Ip of up): acc[j] = the coarse (high-nibble) and
   fine (low-nibble) sums [token][row] of row block j, the gate blocks first, then the up blocks.
   Per 64 columns, 4 products per row block (both token planes, both nibbles), their int32 sums
   combined exactly per group of G columns, then scaled in float32 as the fused kernel does. */
static void amx_gate_up(const Layer *L, const Tokens *T, int tb, int nb0, int count,
                        float (*acc)[2][16][16], int32_t (*partial)[2][16][16]) {
    const int K = (int)L->K, G = (int)L->G, groups = K / G, sub = G / 64, chunks = K / 64, Ip = (int)L->Ip;
    int32_t sums[4][16][16] __attribute__((aligned(64)));
    const int8_t *q = T->xe + (size_t)tb * 16 * K, *r = T->re + (size_t)tb * 16 * K;
    memset(acc, 0, sizeof(float) * 2 * count * 2 * 256);
    for (int k = 0; k < chunks; ++k) {
        const int g = k / sub, first = k % sub == 0, last = k % sub == sub - 1;
        _tile_loadd(0, q + 64 * k, K);
        _tile_loadd(1, r + 64 * k, K);
        for (int j = 0; j < 2 * count; ++j) {
            const int rb = j < count ? nb0 + j : Ip / 16 + nb0 + j - count;
            _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
            _tile_loadd(2, L->hi_tiles + ((size_t)rb * chunks + k) * 1024, 64);
            _tile_loadd(3, L->lo_tiles + ((size_t)rb * chunks + k) * 1024, 64);
            _tile_dpbsud(4, 0, 2); _tile_dpbsud(5, 1, 2); _tile_dpbsud(6, 0, 3); _tile_dpbsud(7, 1, 3);
            _tile_stored(4, sums[0], 64); _tile_stored(5, sums[1], 64);
            _tile_stored(6, sums[2], 64); _tile_stored(7, sums[3], 64);
            const __m512 s = _mm512_loadu_ps(L->scales_amx + (size_t)g * 2 * Ip + 16 * rb);
            const __m512 s16 = _mm512_mul_ps(s, _mm512_set1_ps(1.f / 16.f));
            for (int t = 0; t < 16; ++t) {
                __m512i dh = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[0][t]), 8),
                                              _mm512_load_si512(sums[1][t]));
                __m512i dl = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[2][t]), 8),
                                              _mm512_load_si512(sums[3][t]));
                if (!first) {
                    dh = _mm512_add_epi32(dh, _mm512_load_si512(partial[j][0][t]));
                    dl = _mm512_add_epi32(dl, _mm512_load_si512(partial[j][1][t]));
                }
                if (!last) {
                    _mm512_store_si512(partial[j][0][t], dh);
                    _mm512_store_si512(partial[j][1][t], dl);
                    continue;
                }
                const __m512 unit = _mm512_set1_ps(T->step[(size_t)(tb * 16 + t) * groups + g] / 256.f);
                _mm512_store_ps(acc[j][0][t], _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_mul_ps(s, unit),
                                                              _mm512_load_ps(acc[j][0][t])));
                _mm512_store_ps(acc[j][1][t], _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_mul_ps(s16, unit),
                                                              _mm512_load_ps(acc[j][1][t])));
            }
        }
    }
    for (int j = 0; j < 2 * count; ++j) { /* the constant terms, as the fused kernel adds them */
        const int rb = j < count ? nb0 + j : Ip / 16 + nb0 + j - count;
        for (int g = 0; g < groups; ++g) {
            const __m512 s = _mm512_loadu_ps(L->scales_amx + (size_t)g * 2 * Ip + 16 * rb);
            const __m512 z = _mm512_loadu_ps(L->zeros_amx + (size_t)g * 2 * Ip + 16 * rb);
            for (int t = 0; t < 16; ++t) {
                const size_t at = (size_t)(tb * 16 + t) * groups + g;
                const float shifted = -8.f * T->qsum[at];
                __m512 c = _mm512_fmadd_ps(s, _mm512_set1_ps(shifted), _mm512_load_ps(acc[j][0][t]));
                _mm512_store_ps(acc[j][0][t], _mm512_fmadd_ps(z, _mm512_set1_ps(T->sum[at]), c));
                _mm512_store_ps(acc[j][1][t], _mm512_fmadd_ps(s, _mm512_set1_ps(shifted / 16.f), _mm512_load_ps(acc[j][1][t])));
            }
        }
    }
}

/* The layer on n fp32 tokens (n > 0) on AMX tiles, as `mgs_nested_forward`: writes out (n, K) and,
   when not NULL, counts and scores. Needs the AMX operands (hi_tiles, lo_tiles, down_tiles). */
int mgs_nested_forward_amx(const Layer *L, int n, const float *x, float *out, int32_t *counts, float *scores,
                           int threads) {
    const int K = (int)L->K, I = (int)L->I, Ip = (int)L->Ip, G = (int)L->G;
    Tokens T;
    tokens_prepare(&T, n, K, G, x, ROWS);
    const int tblocks = T.padded / 16, nblocks = Ip / 16, chunks = Ip / 32;
    const size_t plane = (size_t)T.padded * Ip;
    uint16_t *h = aligned_alloc(64, sizeof(uint16_t) * 3 * plane);
    __mmask16 *chosen = malloc(sizeof(__mmask16) * (size_t)T.padded * nblocks);
    const float threshold = L->threshold;
#pragma omp parallel num_threads(threads)
    {
        tiles_configure();
        float acc[2 * AMX_BLOCKS][2][16][16] __attribute__((aligned(64)));
        int32_t partial[2 * AMX_BLOCKS][2][16][16] __attribute__((aligned(64)));
        const int tasks = (nblocks + AMX_BLOCKS - 1) / AMX_BLOCKS;
#pragma omp for schedule(static) collapse(2)
        for (int task = 0; task < tasks; ++task)
            for (int tb = 0; tb < tblocks; ++tb) {
                const int nb0 = task * AMX_BLOCKS, count = nblocks - nb0 < AMX_BLOCKS ? nblocks - nb0 : AMX_BLOCKS;
                amx_gate_up(L, &T, tb, nb0, count, acc, partial);
                for (int j = 0; j < count; ++j) {
                    const int nb = nb0 + j, i = 16 * nb;
                    const __mmask16 neurons = i < I ? first_lanes(I - i) : 0;
                    for (int t = 0; t < 16; ++t) {
                        const int token = tb * 16 + t;
                        const __mmask16 valid = token < n ? neurons : 0;
                        const __m512 cg = _mm512_load_ps(acc[j][0][t]), cu = _mm512_load_ps(acc[count + j][0][t]);
                        const __m512 score = _mm512_abs_ps(_mm512_mul_ps(silu_ps(cg), cu));
                        if (scores && valid) _mm512_mask_storeu_ps(scores + (size_t)token * I + i, valid, score);
                        const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, score, _mm512_set1_ps(threshold), _CMP_GT_OQ);
                        chosen[(size_t)token * nblocks + nb] = m;
                        const __m512 g = _mm512_add_ps(cg, _mm512_load_ps(acc[j][1][t]));
                        const __m512 u = _mm512_add_ps(cu, _mm512_load_ps(acc[count + j][1][t]));
                        __m512 rest = _mm512_maskz_mul_ps(m, silu_ps(g), u);
                        for (int part = 0; part < 3; ++part) { /* h = h1 + h2 + h3, each bf16 */
                            const __m256bh b = _mm512_cvtneps_pbh(rest);
                            _mm256_storeu_si256((__m256i *)(h + part * plane + (size_t)token * Ip + i), (__m256i)b);
                            rest = _mm512_sub_ps(rest, _mm512_cvtpbh_ps(b));
                        }
                    }
                }
            }
        /* out = h @ down^T: 16 tokens x 64 outputs a task, the three parts of h against each bf16 tile */
#pragma omp for schedule(static) collapse(2)
        for (int tb = 0; tb < tblocks; ++tb)
            for (int cq = 0; cq < K / 64; ++cq) {
                float result[4][16][16] __attribute__((aligned(64)));
                _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
                const uint16_t *rows = h + (size_t)tb * 16 * Ip;
                const uint16_t *w = L->down_tiles + (size_t)4 * cq * chunks * 512;
                for (int c = 0; c < chunks; ++c) {
                    _tile_loadd(0, rows + 32 * c, 2 * Ip);
                    _tile_loadd(1, rows + plane + 32 * c, 2 * Ip);
                    _tile_loadd(2, rows + 2 * plane + 32 * c, 2 * Ip);
#define DOWN_TILE(j, acc) /* tile numbers are immediates */            \
                    _tile_loadd(3, w + ((size_t)(j) * chunks + c) * 512, 64); \
                    _tile_dpbf16ps(acc, 0, 3); _tile_dpbf16ps(acc, 1, 3); _tile_dpbf16ps(acc, 2, 3);
                    DOWN_TILE(0, 4) DOWN_TILE(1, 5) DOWN_TILE(2, 6) DOWN_TILE(3, 7)
#undef DOWN_TILE
                }
                _tile_stored(4, result[0], 64); _tile_stored(5, result[1], 64);
                _tile_stored(6, result[2], 64); _tile_stored(7, result[3], 64);
                for (int t = 0; t < 16 && tb * 16 + t < n; ++t)
                    for (int j = 0; j < 4; ++j)
                        _mm512_storeu_ps(out + (size_t)(tb * 16 + t) * K + 64 * cq + 16 * j, _mm512_load_ps(result[j][t]));
            }
        _tile_release();
    }
    int selected = 0;
    for (int t = 0; t < n; ++t) {
        int count = 0;
        for (int b = 0; b < nblocks; ++b) count += __builtin_popcount(chosen[(size_t)t * nblocks + b]);
        if (counts) counts[t] = count;
        selected += count;
    }
    free(h); free(chosen);
    tokens_free(&T);
    return selected;
}
#else
int amx_enable(void) { return -1; }
int mgs_nested_forward_amx(const Layer *L, int n, const float *x, float *out, int32_t *counts, float *scores,
                           int threads) {
    (void)L; (void)n; (void)x; (void)out; (void)counts; (void)scores; (void)threads;
    return -1;
}
#endif
