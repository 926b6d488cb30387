/* int8 weights times int8-quantized activations on AVX2 (the dot product of llama.cpp's Q8_0 format).
 *
 * Why hand-written: torch's int8 CPU kernel (aten::_weight_int8pack_mm) converts every weight to bf16 and
 * multiplies in floating point; without AVX-512 that is limited by arithmetic, not by memory (4096 x 11008, one
 * row, 2 threads: 5.6 ms, 8 GB/s on a bus that reads 16 GB/s), and torchao has no CPU kernel of its own. Here
 * each row of activations is quantized to int8 in blocks of 32 (one fp32 scale each), and 32 weight bytes are
 * multiplied and summed in three integer instructions (sign, maddubs, madd), exactly, in int32.
 *
 *   y[m, n] = ws[n] * sum_b xs[m, b] * sum_{i in block b} w[n, i] * xq[m, i]
 *
 * Weights: int8 [N, K] row-major (K a multiple of 16), one bf16 scale per row (weights/quant.py's int8 layout,
 * unchanged). Activations: fp32 [M, K], quantized by q8_quantize into blocks of 32 (a last block of 16 when
 * K % 32 == 16). Built by kernels/native.py with -mavx2 -mfma -fopenmp and called from Python through ctypes.
 *
 * Threads: the *_many functions split the output rows over OpenMP threads. The library is linked against
 * libgomp.so.1, which torch has already loaded, so these are torch's own OpenMP threads: a pool of our own ran
 * beside torch's, whose threads spin for a while after each torch op, and two ranks' worth of threads fought
 * over the cores (int8 at one rank with 2 threads decoded no faster than with 1).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_sums.h"

/* Bytes ahead in the weight rows that are prefetched. The hardware prefetcher alone left one thread at about half
 * the bus on this session's host (AMD EPYC, Zen 1; 4096 x 11008 int8: 4.1 GB/s, 6.9 with PF; int4 improved by
 * 15-20 % with PF4, measured with several distances). */
#define PF 1024
#define PF4 4096
/* The same for the 256-bit decoding at group sizes of 64 and more (int4_decode256): 16 KiB ahead, 8 rows of 4096
 * columns; 4096 x 44032, G = 64, 2 threads: 5.3-6.3 ms at 16384 and 8192, 6.7 at 4096 (AMD EPYC Zen 3,
 * 4 December 2026). */
#define PF4W 16384

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The 32 products w[i] * x[i] summed in pairs of four into 8 int32 lanes. maddubs wants one unsigned operand:
 * |x| times w with x's sign moved onto w. |products| <= 2 * 127 * 127 fits its int16 pairs. */
static inline __m256 dot32(const int8_t *w, const int8_t *x) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline float dot16(const int8_t *w, const int8_t *x) {
    __m128i wv = _mm_loadu_si128((const __m128i *)w);
    __m128i xv = _mm_loadu_si128((const __m128i *)x);
    __m128i p = _mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(xv, xv), _mm_sign_epi8(wv, xv)), _mm_set1_epi16(1));
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4e));
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xb1));
    return (float)_mm_cvtsi128_si32(p);
}

int64_t q8_blocks(int64_t k) { return (k + 31) / 32; }

/* x [m, k] fp32 -> xq [m, blocks * 32] int8 (zero-padded), xs [m, blocks] fp32: x ~ xq * xs per block,
 * round to nearest (even), |xq| <= 127. Whole blocks of 32 in AVX2 (the same products x * (127 / amax) and the same
 * rounding as lrintf: cvtps2dq rounds to nearest even, as lrintf does in the default mode); a last part block in C.
 * In AVX2 a call of 4096 columns took 2 us, where the scalar loop took 12 (3 December 2026). */
static inline void quantize_block32(const float *x, int8_t *q, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_loadu_ps(x), b = _mm256_loadu_ps(x + 8), c = _mm256_loadu_ps(x + 16), d = _mm256_loadu_ps(x + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, c), _mm256_andnot_ps(sign, d)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float amax = _mm_cvtss_f32(m4);
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m256 v = _mm256_set1_ps(id);
    __m256i ia = _mm256_cvtps_epi32(_mm256_mul_ps(a, v)), ib = _mm256_cvtps_epi32(_mm256_mul_ps(b, v));
    __m256i ic = _mm256_cvtps_epi32(_mm256_mul_ps(c, v)), idd = _mm256_cvtps_epi32(_mm256_mul_ps(d, v));
    /* packs work within 128-bit lanes: the permute puts the four groups of 8 back in order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(ia, ib), _mm256_packs_epi32(ic, idd));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    *scale = amax / 127.0f;
}

void q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xs) {
    int64_t nb = q8_blocks(k), full = k / 32;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        int8_t *qr = xq + r * nb * 32;
        for (int64_t b = 0; b < full; b++) quantize_block32(xr + b * 32, qr + b * 32, xs + r * nb + b);
        if (full < nb) {
            int64_t lo = full * 32, n = k - lo;
            float amax = 0.0f;
            for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(xr[lo + i]));
            float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t i = 0; i < n; i++) qr[lo + i] = (int8_t)lrintf(xr[lo + i] * id);
            for (int64_t i = n; i < 32; i++) qr[lo + i] = 0;
            xs[r * nb + full] = d;
        }
    }
}

/* y[r * ldy + n] for rows n in [n0, n1) and every activation row r < m. */
void q8_matmul_int8(const int8_t *w, const uint16_t *ws, int64_t k, int64_t n0, int64_t n1,
                    const int8_t *xq, const float *xs, int64_t m, float *y, int64_t ldy) {
    int64_t nb = q8_blocks(k), full = k / 32;
    int tail = (int)(k % 32); /* 0 or 16 */
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        float s = bf16_to_f32(ws[n]);
        for (int64_t r = 0; r < m; r++) {
            const int8_t *xr = xq + r * nb * 32;
            const float *sr = xs + r * nb;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            int64_t b = 0;
            for (; b + 1 < full; b += 2) {
                _mm_prefetch((const char *)(wr + b * 32 + PF), _MM_HINT_T0);
                acc0 = _mm256_fmadd_ps(dot32(wr + b * 32, xr + b * 32), _mm256_set1_ps(sr[b]), acc0);
                acc1 = _mm256_fmadd_ps(dot32(wr + b * 32 + 32, xr + b * 32 + 32), _mm256_set1_ps(sr[b + 1]), acc1);
            }
            if (b < full) acc0 = _mm256_fmadd_ps(dot32(wr + b * 32, xr + b * 32), _mm256_set1_ps(sr[b]), acc0);
            float total = hsum8(_mm256_add_ps(acc0, acc1));
            if (tail) total += dot16(wr + full * 32, xr + full * 32) * sr[full];
            y[r * ldy + n] = total * s;
        }
    }
}

/* Per activation row and group of `group` columns: sum over its blocks of xs[b] * sum(xq in b), the factor of the
 * int4 zero points (below). xg [m, k / group]. */
void q8_group_sums(const int8_t *xq, const float *xs, int64_t m, int64_t k, int64_t group, float *xg) {
    int64_t nb = q8_blocks(k), groups = k / group, per = group / 32;
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.0f;
            for (int64_t b = g * per; b < (g + 1) * per; b++) {
                int32_t sum = 0;
                for (int i = 0; i < 32; i++) sum += xq[r * nb * 32 + b * 32 + i];
                t += xs[r * nb + b] * (float)sum;
            }
            xg[r * groups + g] = t;
        }
}

/* int4 weights, rows layout: row n is k / 2 bytes, block b of 32 columns is 16 bytes whose low nibbles are
 * columns 32b .. 32b+15 and high nibbles 32b+16 .. 32b+31 (q in [0, 15]); a bf16 (scale, zero) pair per group of
 * `group` columns (a multiple of 32) at sz + g * sz_g + n * sz_n (the split stores them row by row: sz_g = 2), and
 * w = (q - 8) * scale + zero. So
 *   y[r, n] = sum_g scale_g * sum_{b in g} xs[b] * dot(q_b, xq_b)  +  sum_g (zero_g - 8 scale_g) * xg[r, g]
 * where the dot products are exact in int32 (maddubs: unsigned q times signed x). */
/* One block: 16 weight bytes against the block's 32 activations, as 4 int32 lanes of exact partial sums. In 128-bit
 * halves, not one 256-bit register: on Zen 1 every 256-bit instruction runs as two 128-bit ones anyway, and joining
 * the two nibble halves into one register (vinserti128) was an extra instruction per block; 4096 x 44032, G = 64, one
 * thread: 20.5 ms as one register, 15.5 ms in halves (2 December 2026). Each maddubs pair is at most
 * 2 * 15 * 127, so the int16 sum of the two halves cannot overflow. */
static inline __m128i nib_dot(const uint8_t *w, __m128i xlo, __m128i xhi, __m128i low4, __m128i ones) {
    __m128i raw = _mm_loadu_si128((const __m128i *)w);
    __m128i p = _mm_add_epi16(_mm_maddubs_epi16(_mm_and_si128(raw, low4), xlo),
                              _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), xhi));
    return _mm_madd_epi16(p, ones);
}

static inline float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Prefill: weight row n against activation rows r0 .. r0 + R - 1 (R <= 4, a constant where it is called, so the
 * loops over j unroll): each block's nibbles are unpacked once for the R rows, not once per row. */
static inline __attribute__((always_inline)) void int4_row_by_rows(
        const uint8_t *w0, const uint16_t *sz, int64_t sz_g, int64_t groups, int64_t per, int64_t nb,
        const int8_t *xq, const float *xs, const float *xg, int64_t r0, const int R, float *y, int64_t ldy,
        int64_t n) {
    const __m128i low4 = _mm_set1_epi8(0x0f), ones = _mm_set1_epi16(1);
    __m128 acc[4];
    float z[4];
    for (int j = 0; j < R; j++) { acc[j] = _mm_setzero_ps(); z[j] = 0.0f; }
    for (int64_t g = 0; g < groups; g++) {
        float s = bf16_to_f32(sz[g * sz_g]), zs = bf16_to_f32(sz[g * sz_g + 1]) - 8.0f * s;
        for (int j = 0; j < R; j++) z[j] += zs * xg[(r0 + j) * groups + g];
        for (int64_t b = g * per; b < (g + 1) * per; b++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(w0 + b * 16));
            __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            for (int j = 0; j < R; j++) {
                const int8_t *xr = xq + (r0 + j) * nb * 32 + b * 32;
                __m128i p = _mm_add_epi16(_mm_maddubs_epi16(lo, _mm_loadu_si128((const __m128i *)xr)),
                                          _mm_maddubs_epi16(hi, _mm_loadu_si128((const __m128i *)(xr + 16))));
                acc[j] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(p, ones)),
                                      _mm_set1_ps(s * xs[(r0 + j) * nb + b]), acc[j]);
            }
        }
    }
    for (int j = 0; j < R; j++) y[(r0 + j) * ldy + n] = hsum4(acc[j]) + z[j];
}

void q8_matmul_int4(const uint8_t *w, const uint16_t *sz, int64_t sz_g, int64_t sz_n, int64_t group, int64_t k,
                    int64_t n0, int64_t n1, const int8_t *xq, const float *xs, const float *xg, int64_t m,
                    float *y, int64_t ldy) {
    int64_t nb = q8_blocks(k), groups = k / group, per = group / 32, half = k / 2;
    if (m > 1) {  /* the row's 16 * k / 32 bytes stay in L1 while the activation rows pass over them */
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *w0 = w + n * half;
            const uint16_t *s0 = sz + n * sz_n;
            int64_t r = 0;
            for (; r + 4 <= m; r += 4) int4_row_by_rows(w0, s0, sz_g, groups, per, nb, xq, xs, xg, r, 4, y, ldy, n);
            switch (m - r) {
            case 3: int4_row_by_rows(w0, s0, sz_g, groups, per, nb, xq, xs, xg, r, 3, y, ldy, n); break;
            case 2: int4_row_by_rows(w0, s0, sz_g, groups, per, nb, xq, xs, xg, r, 2, y, ldy, n); break;
            case 1: int4_row_by_rows(w0, s0, sz_g, groups, per, nb, xq, xs, xg, r, 1, y, ldy, n); break;
            default: break;
            }
        }
        return;
    }
    /* Decoding (one activation row): two weight rows at a time, each activation block loaded once for both. */
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m128i ones = _mm_set1_epi16(1);
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) {
        const uint8_t *w0 = w + n * half, *w1 = w0 + half;
        __m128 acc0 = _mm_setzero_ps(), acc1 = _mm_setzero_ps();
        float z0 = 0.0f, z1 = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *p0 = sz + g * sz_g + n * sz_n, *p1 = p0 + sz_n;
            float s0 = bf16_to_f32(p0[0]), s1 = bf16_to_f32(p1[0]);
            z0 += (bf16_to_f32(p0[1]) - 8.0f * s0) * xg[g];
            z1 += (bf16_to_f32(p1[1]) - 8.0f * s1) * xg[g];
            for (int64_t b = g * per; b < (g + 1) * per; b++) {
                if ((b & 3) == 0) { /* one prefetch per 64-byte line */
                    _mm_prefetch((const char *)(w0 + b * 16 + PF4), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w1 + b * 16 + PF4), _MM_HINT_T0);
                }
                __m128i xlo = _mm_loadu_si128((const __m128i *)(xq + b * 32));
                __m128i xhi = _mm_loadu_si128((const __m128i *)(xq + b * 32 + 16));
                acc0 = _mm_fmadd_ps(_mm_cvtepi32_ps(nib_dot(w0 + b * 16, xlo, xhi, low4, ones)),
                                    _mm_set1_ps(s0 * xs[b]), acc0);
                acc1 = _mm_fmadd_ps(_mm_cvtepi32_ps(nib_dot(w1 + b * 16, xlo, xhi, low4, ones)),
                                    _mm_set1_ps(s1 * xs[b]), acc1);
            }
        }
        y[n] = hsum4(acc0) + z0;
        y[n + 1] = hsum4(acc1) + z1;
    }
    if (n < n1)  /* an odd last row: the same sums, one row */
        int4_row_by_rows(w + n * half, sz + n * sz_n, sz_g, groups, per, nb, xq, xs, xg, 0, 1, y, ldy, n);
}


/* Decoding (and below, prefill) at group sizes that are multiples of 64, in 256-bit registers: 32 weight bytes (two blocks of one group) a
 * step, in half the instructions of nib_dot's 128-bit halves, and without the vinserti128 that made one 256-bit
 * register slower on Zen 1 (above): the activations are laid out to match the weight bytes instead. On Zen 3 the
 * halves ran short of the bus for want of instructions: 4096 x 44032, G = 64, 2 threads, interleaved: 6.5-8.1 ms
 * in halves, 5.3-6.3 here (12-16 GB/s -> 16-19 against a bus of 24-28; 4 December 2026). The activations are
 * rearranged once per call (int4_pairs_prepare): for blocks 2p and 2p + 1,
 * xq2[p] = [xq_2p[0:16], xq_2p+1[0:16], xq_2p[16:32], xq_2p+1[16:32]] (the low nibbles of the 32 bytes, then the high
 * ones) and xs2[p] = [xs_2p x 4, xs_2p+1 x 4] (the scales of the 8 int32 lanes of the pair's dot products). */
static void int4_pairs_prepare(const int8_t *xq, const float *xs, int64_t nb, int8_t *xq2, float *xs2) {
    for (int64_t p = 0; p < nb / 2; p++) {
        const int8_t *a = xq + 2 * p * 32, *b = a + 32;
        int8_t *o = xq2 + p * 64;
        memcpy(o, a, 16);
        memcpy(o + 16, b, 16);
        memcpy(o + 32, a + 16, 16);
        memcpy(o + 48, b + 16, 16);
        for (int i = 0; i < 4; i++) {
            xs2[p * 8 + i] = xs[2 * p];
            xs2[p * 8 + 4 + i] = xs[2 * p + 1];
        }
    }
}

static inline __m256i nib_dot256(const uint8_t *w, __m256i xlo, __m256i xhi, __m256i low4, __m256i ones) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)w);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(raw, low4), xlo),
                                 _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), xhi));
    return _mm256_madd_epi16(p, ones);
}

/* A bf16 (scale, zero) pair as one 32-bit word (scale in the low half): the scale in every lane of a register. */
static inline __m256 int4_scale8(const uint16_t *pair) {
    uint32_t u;
    memcpy(&u, pair, sizeof u);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi32((int)u), 16));
}

/* sum_g (zero_g - 8 scale_g) * xg[g] of one row whose pairs are sz[2g], sz[2g + 1]: 8 groups a step. */
static inline float int4_zero_term(const uint16_t *sz, int64_t groups, const float *xg) {
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256i pr = _mm256_loadu_si256((const __m256i *)(sz + 2 * g));
        __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pr, 16)), z = _mm256_castsi256_ps(_mm256_and_si256(pr, hi16));
        acc = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z), _mm256_loadu_ps(xg + g), acc);
    }
    float t = hsum8(acc);
    for (; g < groups; g++) t += (bf16_to_f32(sz[2 * g + 1]) - 8.0f * bf16_to_f32(sz[2 * g])) * xg[g];
    return t;
}

/* R (1 or 2) weight rows from n against the rearranged activations; each pair's activations loaded once for both. */
static inline __attribute__((always_inline)) void int4_rows256(const uint8_t *w, const uint16_t *sz, int64_t sz_n,
        int64_t groups, int64_t pairs, int64_t half, const int8_t *xq2, const float *xs2, const float *xg, const int R,
        float *y, int64_t n) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const uint8_t *wr[2] = {w + n * half, w + (n + 1) * half};
    const uint16_t *sr[2] = {sz + n * sz_n, sz + (n + 1) * sz_n};
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t p = 0;
    for (int64_t g = 0; g < groups; g++) {
        __m256 t[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t e = 0; e < pairs; e++, p++) {
            if ((p & 1) == 0) /* one prefetch per 64-byte line */
                for (int j = 0; j < R; j++) _mm_prefetch((const char *)(wr[j] + p * 32 + PF4W), _MM_HINT_T0);
            __m256i xlo = _mm256_loadu_si256((const __m256i *)(xq2 + p * 64));
            __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq2 + p * 64 + 32));
            __m256 xs = _mm256_loadu_ps(xs2 + p * 8);
            for (int j = 0; j < R; j++) {
                __m256 d = _mm256_cvtepi32_ps(nib_dot256(wr[j] + p * 32, xlo, xhi, low4, ones));
                t[j] = _mm256_fmadd_ps(d, xs, t[j]);
            }
        }
        for (int j = 0; j < R; j++) acc[j] = _mm256_fmadd_ps(t[j], int4_scale8(sr[j] + 2 * g), acc[j]);
    }
    for (int j = 0; j < R; j++) y[n + j] = hsum8(acc[j]) + int4_zero_term(sr[j], groups, xg);
}

/* Prefill in 256-bit registers: weight row n against activation rows r0 .. r0 + R - 1 (R <= 4, a constant where it
 * is called), each pair of blocks' nibbles unpacked once for the R rows, as int4_row_by_rows does with 128-bit halves
 * (which group size 32 keeps): 16 rows of 11008 x 4096, G = 64, 2 threads, interleaved: 21.5 -> 16.0 ms; 4 rows
 * 5.3-5.5 -> 4.0-4.5 (AMD EPYC Zen 3, 4 December 2026). The rows' rearranged activations are
 * xq2 + r * nb * 32 and xs2 + r * nb * 4 (int4_pairs_prepare of each row), their group sums xg + r * groups. */
static inline __attribute__((always_inline)) void int4_row256_by_rows(const uint8_t *w0, const uint16_t *s0,
        int64_t groups, int64_t pairs, int64_t nb, const int8_t *xq2, const float *xs2, const float *xg, int64_t r0,
        const int R, float *y, int64_t ldy, int64_t n) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int j = 0; j < R; j++) acc[j] = _mm256_setzero_ps();
    int64_t p = 0;
    for (int64_t g = 0; g < groups; g++) {
        __m256 t[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t e = 0; e < pairs; e++, p++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(w0 + p * 32));
            __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            for (int j = 0; j < R; j++) {
                const int8_t *xr = xq2 + (r0 + j) * nb * 32 + p * 64;
                __m256i d = _mm256_madd_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32)))),
                    ones);
                __m256 xs = _mm256_loadu_ps(xs2 + (r0 + j) * nb * 4 + p * 8);
                t[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs, t[j]);
            }
        }
        __m256 sv = int4_scale8(s0 + 2 * g);
        for (int j = 0; j < R; j++) acc[j] = _mm256_fmadd_ps(t[j], sv, acc[j]);
    }
    for (int j = 0; j < R; j++)
        y[(r0 + j) * ldy + n] = hsum8(acc[j]) + int4_zero_term(s0, groups, xg + (r0 + j) * groups);
}

static void int4_prefill256(const uint8_t *w, const uint16_t *sz, int64_t group, int64_t k, int64_t n0, int64_t n1,
                            const int8_t *xq2, const float *xs2, const float *xg, int64_t m, float *y, int64_t ldy) {
    int64_t groups = k / group, pairs = group / 64, half = k / 2, sz_n = 2 * groups, nb = q8_blocks(k);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w0 = w + n * half;
        const uint16_t *s0 = sz + n * sz_n;
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) int4_row256_by_rows(w0, s0, groups, pairs, nb, xq2, xs2, xg, r, 4, y, ldy, n);
        switch (m - r) {
        case 3: int4_row256_by_rows(w0, s0, groups, pairs, nb, xq2, xs2, xg, r, 3, y, ldy, n); break;
        case 2: int4_row256_by_rows(w0, s0, groups, pairs, nb, xq2, xs2, xg, r, 2, y, ldy, n); break;
        case 1: int4_row256_by_rows(w0, s0, groups, pairs, nb, xq2, xs2, xg, r, 1, y, ldy, n); break;
        default: break;
        }
    }
}

static void int4_decode256(const uint8_t *w, const uint16_t *sz, int64_t group, int64_t k, int64_t n0, int64_t n1,
                           const int8_t *xq2, const float *xs2, const float *xg, float *y) {
    int64_t groups = k / group, pairs = group / 64, half = k / 2, sz_n = 2 * groups;
    int64_t n = n0;
    if (pairs == 1) { /* G = 64, the default: the loop over a group's pairs unrolled (in cache, one thread: 5 %) */
        for (; n + 1 < n1; n += 2) int4_rows256(w, sz, sz_n, groups, 1, half, xq2, xs2, xg, 2, y, n);
    } else {
        for (; n + 1 < n1; n += 2) int4_rows256(w, sz, sz_n, groups, pairs, half, xq2, xs2, xg, 2, y, n);
    }
    if (n < n1) int4_rows256(w, sz, sz_n, groups, pairs, half, xq2, xs2, xg, 1, y, n);
}

/* The same products for `count` (<= MANY) matrices that share one input (q/k/v, gate/up): the output rows of all
 * of them split over `threads` OpenMP threads in chunks of 16 rows, in one parallel region. One call for the three
 * of an attention block, not three: the activations are quantized once, and the threads are started once. Matrix j
 * is w[j] (n[j] rows), its scales ws[j] (int8) or (scale, zero) pairs sz[j] (int4), its output y[j] [m, n[j]]. */
#define MANY 8

/* first[j]: the first chunk of 16 rows of matrix j (first[count]: all of them, returned); q8_avx512.c uses these
 * two as well. */
int64_t q8_many_chunks(int count, const int64_t *n, int64_t *first) {
    first[0] = 0;
    for (int j = 0; j < count; j++) first[j + 1] = first[j] + (n[j] + 15) / 16;
    return first[count];
}

int q8_many_matrix(int64_t c, const int64_t *first) { /* the matrix chunk c is in */
    int j = 0;
    while (c >= first[j + 1]) j++;
    return j;
}

void q8_matmul_int8_many(int count, const int8_t *const *w, const uint16_t *const *ws, const int64_t *n, int64_t k,
                         const int8_t *xq, const float *xs, int64_t m, float *const *y, int threads) {
    int64_t first[MANY + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        q8_matmul_int8(w[j], ws[j], k, a, b, xq, xs, m, y[j], n[j]);
    }
}

void q8_matmul_int4_many(int count, const uint8_t *const *w, const uint16_t *const *sz, const int64_t *n,
                         int64_t group, int64_t k, const int8_t *xq, const float *xs, const float *xg, int64_t m,
                         const int8_t *xq2, const float *xs2, float *const *y, int threads) {
    int64_t first[MANY + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        if (xq2 && m == 1)
            int4_decode256(w[j], sz[j], group, k, a, b, xq2, xs2, xg, y[j]);
        else if (xq2)
            int4_prefill256(w[j], sz[j], group, k, a, b, xq2, xs2, xg, m, y[j], n[j]);
        else
            q8_matmul_int4(w[j], sz[j], 2, 2 * (k / group), group, k, a, b, xq, xs, xg, m, y[j], n[j]);
    }
}

/* From fp32 activations x [m, k] in one call: quantized here (workspace from malloc, freed before returning), then the
 * products of the count matrices. Each call through ctypes and each torch tensor made for it cost a few us: doing
 * the quantization, the group sums and the products in one call (and the quantization in AVX2) took the fixed cost
 * of an int4 product of 16 x 4096 from 47 us to 16, of 16 x 11008 from 58 to 19 (3 December 2026; within the noise
 * of a whole decoding step here). Returns 0, or -1 where the workspace could not be had. */
int q8_int8_products(int count, const int8_t *const *w, const uint16_t *const *ws, const int64_t *n, int64_t k,
                     const float *x, int64_t m, float *const *y, int threads) {
    int64_t nb = q8_blocks(k);
    int8_t *xq = malloc((size_t)(m * nb * 32));
    float *xs = malloc((size_t)(m * nb) * sizeof(float));
    int ok = xq && xs;
    if (ok) {
        q8_quantize(x, m, k, xq, xs);
        q8_matmul_int8_many(count, w, ws, n, k, xq, xs, m, y, threads);
    }
    free(xq);
    free(xs);
    return ok ? 0 : -1;
}

int q8_int4_products(int count, const uint8_t *const *w, const uint16_t *const *sz, const int64_t *n, int64_t group,
                     int64_t k, const float *x, int64_t m, float *const *y, int threads) {
    int64_t nb = q8_blocks(k), groups = k / group;
    int8_t *xq = malloc((size_t)(m * nb * 32));
    float *xs = malloc((size_t)(m * nb) * sizeof(float)), *xg = malloc((size_t)(m * groups) * sizeof(float));
    int wide = group % 64 == 0; /* in 256-bit registers (int4_decode256, int4_prefill256) */
    int8_t *xq2 = wide ? malloc((size_t)(m * nb * 32)) : NULL;
    float *xs2 = wide ? malloc((size_t)(m * nb * 4) * sizeof(float)) : NULL;
    int ok = xq && xs && xg && (!wide || (xq2 && xs2));
    if (ok) {
        q8_quantize(x, m, k, xq, xs);
        q8_group_sums(xq, xs, m, k, group, xg);
        for (int64_t r = 0; wide && r < m; r++)
            int4_pairs_prepare(xq + r * nb * 32, xs + r * nb, nb, xq2 + r * nb * 32, xs2 + r * nb * 4);
        q8_matmul_int4_many(count, w, sz, n, group, k, xq, xs, xg, m, xq2, xs2, y, threads);
    }
    free(xq);
    free(xs);
    free(xg);
    free(xq2);
    free(xs2);
    return ok ? 0 : -1;
}
