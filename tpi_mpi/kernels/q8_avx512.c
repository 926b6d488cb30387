/* The int8 and int4 products of q8_avx2.c on AVX-512 with VNNI (vpdpbusd): the same weights, the same quantized
 * activations, the same exact int32 block sums; only the instructions differ.
 *
 * Why a second version: on a CPU with AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4) one vpdpbusd
 * multiplies 64 unsigned bytes by 64 signed bytes and adds each four products into an int32 lane, where AVX2 needs
 * maddubs + madd on 32 bytes. The AVX2 kernels run there too, but they spend more instructions per weight byte than
 * the bus delivers bytes (docs/quantization.md has the measurements). kernels/native.py calls these only where the
 * CPU has avx512f, avx512bw and avx512_vnni; this file is compiled for those instructions (the pragma below), the
 * rest of the library for AVX2 only.
 *
 * Activations are rearranged once per call (q8v_prepare_*), not once per weight row, so that the inner loops are
 * one load of weights and a few instructions per 64 bytes.
 */
#if defined(__clang__) /* clang has no "GCC target" pragma: the same targets on every function of the file */
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef NT4
#define NT4 4 /* int4 prefill: weight rows per tile (int4v_tile; 2: 1.5x slower, docs/quantization.md) */
#endif
#ifndef PFV
#define PFV 1024 /* bytes ahead in the weight rows that are prefetched: best of 0-8192 on huge pages */
#endif

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- int8: per-row scale ws[n]; y[r, n] = ws[n] * sum_b xs[r, b] * dot(w_b, xq_b) ----
 * vpdpbusd wants one unsigned operand: w ^ 0x80 is w + 128 as an unsigned byte, so dot(w ^ 0x80, x) =
 * dot(w, x) + 128 * sum(x). The accumulator starts at -128 * (the sum of each lane's four x), so each int32 lane
 * ends holding exactly its four products w * x: no rounding, and no large term to cancel later.
 * Per activation row and 64-byte chunk c (two blocks): corr[16] int32 (lanes 0-7 block 2c, 8-15 block 2c+1) and
 * xse[16] fp32 (the block's scale in each of its lanes). */
int64_t q8v_chunks(int64_t k) { return (k + 63) / 64; }

void q8v_prepare_int8(const int8_t *xq, const float *xs, int64_t m, int64_t k, int32_t *corr, float *xse) {
    int64_t nb = (k + 31) / 32, nc = q8v_chunks(k);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < nc; c++)
            for (int l = 0; l < 16; l++) {
                int64_t b = 2 * c + l / 8, i0 = b * 32 + (l % 8) * 4;
                int32_t s = 0;
                if (b < nb)
                    for (int i = 0; i < 4; i++) s += xq[r * nb * 32 + i0 + i];
                corr[(r * nc + c) * 16 + l] = -128 * s;
                xse[(r * nc + c) * 16 + l] = b < nb ? xs[r * nb + b] : 0.0f;
            }
}

static inline float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

/* Prefill: weight rows n .. n + NW - 1 (scales ws) against activation rows r0 .. r0 + R - 1 (NW, R <= 4, constants
 * where called), NW x R sums in registers: each 64-byte chunk of a weight row is loaded and sign-flipped once for the
 * R rows, and each row's activations, corrections and scales once for the NW weight rows. One weight row at a time
 * (NW = 1), three loads of activations went with every product; 16 rows, 4 layers of Llama-2-7B's matrices, AMD EPYC
 * Zen 5, 2 threads (4 December 2026): see docs/quantization.md. */
static inline __attribute__((always_inline)) void int8v_tile(
        const int8_t *w, const uint16_t *ws, int64_t k, int64_t n, const int NW, int64_t nb, int64_t nc, int64_t full,
        __mmask64 tail, const int8_t *xq, const int32_t *corr, const float *xse, int64_t r0, const int R, float *y,
        int64_t ldy) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[4][4];
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < R; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c++) {
        __mmask64 mk = c < full ? ~(__mmask64)0 : tail;
        __m512i wv[4];
        for (int i = 0; i < NW; i++)
            wv[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + (n + i) * k + c * 64), flip);
        for (int j = 0; j < R; j++) {
            int64_t o = (r0 + j) * nc + c;
            __m512i xv = _mm512_maskz_loadu_epi8(mk, xq + (r0 + j) * nb * 32 + c * 64);
            __m512i cv = _mm512_loadu_si512(corr + o * 16);
            __m512 ev = _mm512_loadu_ps(xse + o * 16);
            for (int i = 0; i < NW; i++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cv, wv[i], xv)), ev, acc[i][j]);
        }
    }
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < R; j++) y[(r0 + j) * ldy + n + i] = hsum16(acc[i][j]) * bf16f(ws[n + i]);
}

/* The tiles of weight rows n .. n + NW - 1 against all m activation rows, four at a time. */
static inline __attribute__((always_inline)) void int8v_tiles(
        const int8_t *w, const uint16_t *ws, int64_t k, int64_t n, const int NW, int64_t nb, int64_t nc, int64_t full,
        __mmask64 tail, const int8_t *xq, const int32_t *corr, const float *xse, int64_t m, float *y, int64_t ldy) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) int8v_tile(w, ws, k, n, NW, nb, nc, full, tail, xq, corr, xse, r, 4, y, ldy);
    switch (m - r) {
    case 3: int8v_tile(w, ws, k, n, NW, nb, nc, full, tail, xq, corr, xse, r, 3, y, ldy); break;
    case 2: int8v_tile(w, ws, k, n, NW, nb, nc, full, tail, xq, corr, xse, r, 2, y, ldy); break;
    case 1: int8v_tile(w, ws, k, n, NW, nb, nc, full, tail, xq, corr, xse, r, 1, y, ldy); break;
    default: break;
    }
}

/* k a multiple of 16 (the split's rule). The last chunk may be a half (k % 64 == 32) or a quarter-multiple: the
 * weight bytes past the row are masked off, and the activations there are zero-padded by q8_quantize / prepare. */
void q8v_matmul_int8(const int8_t *w, const uint16_t *ws, int64_t k, int64_t n0, int64_t n1, const int8_t *xq,
                     const int32_t *corr, const float *xse, int64_t m, float *y, int64_t ldy) {
    int64_t nb = (k + 31) / 32, nc = q8v_chunks(k), full = k / 64;
    __mmask64 tail = (__mmask64)((k % 64) ? ((1ULL << (k % 64)) - 1) : 0);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (m > 1) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) int8v_tiles(w, ws, k, n, 4, nb, nc, full, tail, xq, corr, xse, m, y, ldy);
        for (; n < n1; n++) int8v_tiles(w, ws, k, n, 1, nb, nc, full, tail, xq, corr, xse, m, y, ldy);
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * k;
        float s = bf16f(ws[n]);
        for (int64_t r = 0; r < m; r++) {
            const int8_t *xr = xq + r * nb * 32;
            const int32_t *cr = corr + r * nc * 16;
            const float *er = xse + r * nc * 16;
            /* Four chunks (256 bytes) per step into four accumulators: with two, the loop read 0.05-0.1 of the
             * bus less (a loop of dpbusd alone: 25.0 GB/s with two, 27.1 with four, a plain sum 28.7; 2 threads). */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t c = 0;
#define Q8V_STEP(acc, j)                                                                                          \
    acc = _mm512_fmadd_ps(                                                                                        \
        _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_loadu_si512(cr + (c + j) * 16),                            \
                                               _mm512_xor_si512(_mm512_loadu_si512(wr + (c + j) * 64), flip),     \
                                               _mm512_loadu_si512(xr + (c + j) * 64))),                           \
        _mm512_loadu_ps(er + (c + j) * 16), acc)
            for (; c + 3 < full; c += 4) {
                _mm_prefetch((const char *)(wr + c * 64 + PFV), _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + c * 64 + 64 + PFV), _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + c * 64 + 128 + PFV), _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + c * 64 + 192 + PFV), _MM_HINT_T0);
                Q8V_STEP(a0, 0);
                Q8V_STEP(a1, 1);
                Q8V_STEP(a2, 2);
                Q8V_STEP(a3, 3);
            }
#undef Q8V_STEP
            a0 = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
            for (; c < nc; c++) {
                __mmask64 mk = c < full ? ~(__mmask64)0 : tail;
                /* past k: weights 0 ^ 0x80 = 128 against activations loaded as 0, so they add nothing (the
                 * activations' padding ends at a whole block of 32, not of 64: they are masked too) */
                __m512i w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, wr + c * 64), flip);
                __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(cr + c * 16), w0,
                                                 _mm512_maskz_loadu_epi8(mk, xr + c * 64));
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(er + c * 16), a0);
            }
            y[r * ldy + n] = hsum16(a0) * s;
        }
    }
}

/* ---- int4, rows layout (q8_avx2.c): block b of 32 columns is 16 bytes, low nibbles columns 32b..32b+15, high
 * nibbles 32b+16..32b+31; (scale, zero) bf16 per group; w = (q - 8) * scale + zero. A chunk is 4 blocks = 64 weight
 * bytes = 128 columns: 128-bit lane j of the loaded register is block 4c+j. Prepared per activation row and chunk:
 * xlo[64] (lane j: the first 16 activations of block 4c+j), xhi[64] (its last 16), and xse[16] (block 4c+j's scale
 * in lanes 4j..4j+3). The zero points' term sum_g (zero_g - 8 scale_g) * xg[g] is summed over groups beside.
 * k a multiple of the group (itself 32, 64 or 128), so a last chunk has 1-3 whole blocks. */
void q8v_prepare_int4(const int8_t *xq, const float *xs, int64_t m, int64_t k, int8_t *xlo, int8_t *xhi,
                      float *xse) {
    int64_t nb = (k + 31) / 32, nc = (nb + 3) / 4;
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < nc; c++)
            for (int j = 0; j < 4; j++) {
                int64_t b = 4 * c + j;
                int8_t *lo = xlo + (r * nc + c) * 64 + 16 * j, *hi = xhi + (r * nc + c) * 64 + 16 * j;
                float *e = xse + (r * nc + c) * 16 + 4 * j;
                if (b < nb) {
                    memcpy(lo, xq + r * nb * 32 + b * 32, 16);
                    memcpy(hi, xq + r * nb * 32 + b * 32 + 16, 16);
                } else {
                    memset(lo, 0, 16);
                    memset(hi, 0, 16);
                }
                for (int i = 0; i < 4; i++) e[i] = b < nb ? xs[r * nb + b] : 0.0f;
            }
}

/* The lane -> group index of a chunk (relative to its first group), for groups of 32, 64, 128 columns. */
static inline __m512i group_lanes(int64_t group) {
    if (group == 32) return _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    if (group == 64) return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_setzero_si512();
}

/* Each lane's group scale: the (scale, zero) pairs are read as uint32 (scale in the low half), `have` of them. */
static inline __m512 lane_scales(const uint16_t *sz, int have, __m512i lanes) {
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi32((__mmask8)((1u << have) - 1), sz));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_permutexvar_epi32(lanes, v), 16));
}

/* sum_g (zero_g - 8 scale_g) * xg[g] over one row's groups, 16 at a time. */
static inline float zero_term(const uint16_t *sz, const float *xg, int64_t groups) {
    __m512 t = _mm512_setzero_ps();
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 mk = (__mmask16)(groups - g >= 16 ? 0xffff : (1u << (groups - g)) - 1);
        __m512i v = _mm512_maskz_loadu_epi32(mk, sz + 2 * g);
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), z = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        t = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z), _mm512_maskz_loadu_ps(mk, xg + g), t);
    }
    return hsum16(t);
}

/* Prefill: weight rows n .. n + NW - 1 (w + row * half, pairs sz + row * sz_n) against activation rows r0 .. r0 + R - 1
 * (NW, R <= 4, constants where called), NW x R sums in registers: each chunk's nibbles are unpacked once for the R
 * rows, and each row's activations loaded once for the NW weight rows (docs/quantization.md has the measurements). */
static inline __attribute__((always_inline)) void int4v_tile(
        const uint8_t *w, const uint16_t *sz, int64_t sz_n, int64_t half, int64_t n, const int NW, int64_t group,
        int64_t groups, int64_t nb, const int8_t *xlo, const int8_t *xhi, const float *xse, const float *xg,
        int64_t r0, const int R, float *y, int64_t ldy) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), lanes = group_lanes(group);
    int64_t nc = (nb + 3) / 4, full = nb / 4, gpc = 128 / group; /* groups per chunk: 4, 2 or 1 */
    __m512 acc[NT4][4];
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < R; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c++) {
        int64_t g0 = c * 128 / group;
        int have = (int)(groups - g0 < gpc ? groups - g0 : gpc);
        __mmask64 mk = c < full ? ~(__mmask64)0 : (__mmask64)((1ULL << ((nb - 4 * c) * 16)) - 1);
        __m512i lo[NT4], hi[NT4];
        __m512 sw[NT4];
        for (int i = 0; i < NW; i++) {
            __m512i raw = _mm512_maskz_loadu_epi8(mk, w + (n + i) * half + c * 64);
            lo[i] = _mm512_and_si512(raw, low4);
            hi[i] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            sw[i] = lane_scales(sz + (n + i) * sz_n + 2 * g0, have, lanes);
        }
        for (int j = 0; j < R; j++) {
            int64_t o = (r0 + j) * nc + c;
            __m512i xl = _mm512_loadu_si512(xlo + o * 64), xh = _mm512_loadu_si512(xhi + o * 64);
            __m512 e = _mm512_loadu_ps(xse + o * 16);
            for (int i = 0; i < NW; i++) {
                __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[i], xl), hi[i], xh);
                acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), e), sw[i], acc[i][j]);
            }
        }
    }
    for (int i = 0; i < NW; i++)
        for (int j = 0; j < R; j++)
            y[(r0 + j) * ldy + n + i] =
                    hsum16(acc[i][j]) + zero_term(sz + (n + i) * sz_n, xg + (r0 + j) * groups, groups);
}

/* The tiles of weight rows n .. n + NW - 1 against all m activation rows, four at a time. */
static inline __attribute__((always_inline)) void int4v_tiles(
        const uint8_t *w, const uint16_t *sz, int64_t sz_n, int64_t half, int64_t n, const int NW, int64_t group,
        int64_t groups, int64_t nb, const int8_t *xlo, const int8_t *xhi, const float *xse, const float *xg,
        int64_t m, float *y, int64_t ldy) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) int4v_tile(w, sz, sz_n, half, n, NW, group, groups, nb, xlo, xhi, xse, xg, r, 4, y, ldy);
    switch (m - r) {
    case 3: int4v_tile(w, sz, sz_n, half, n, NW, group, groups, nb, xlo, xhi, xse, xg, r, 3, y, ldy); break;
    case 2: int4v_tile(w, sz, sz_n, half, n, NW, group, groups, nb, xlo, xhi, xse, xg, r, 2, y, ldy); break;
    case 1: int4v_tile(w, sz, sz_n, half, n, NW, group, groups, nb, xlo, xhi, xse, xg, r, 1, y, ldy); break;
    default: break;
    }
}

/* Whether decoding loads each 64-byte chunk of int4 weights as two 256-bit halves (kernels/native.py sets it once, on
 * AMD CPUs). On AMD EPYC Zen 5 one 512-bit load of weights that come from memory held the loop to 18-25 GB/s at one
 * thread where the same loop with halves read 26-29 (two 256-bit loads and an insert; 4 layers of Llama-2-7B's
 * matrices, G = 64, huge pages, interleaved; two threads 40-48 -> 48-57; 4 December 2026), more than q8_avx2.c's
 * 256-bit loop beside it (22-27, 41-51). From the L3 cache the 512-bit loads were not slower; on Intel the halves are
 * unmeasured and would add a shuffle, so they keep the one load. int8's loop gained 5 % at one thread and nothing at
 * two, and keeps it too. */
static int split_loads = 0;

void q8v_set_split_loads(int on) { split_loads = on; }

/* Decoding (one activation row), weight row n: as int4v_tile with one row of each, four chunks per step into four
 * accumulators, and the weights prefetched PFV bytes ahead; SPLIT (a constant where called): split_loads. */
static inline __attribute__((always_inline)) void int4v_row(
        const uint8_t *w0, const uint16_t *s0, int64_t group, int64_t groups, int64_t nb, const int8_t *xlo,
        const int8_t *xhi, const float *xse, const float *xg, float *y, const int SPLIT) {
    const __m512i low4 = _mm512_set1_epi8(0x0f), lanes = group_lanes(group);
    int64_t full = nb / 4, step = 128 / group; /* groups per chunk */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define INT4V_STEP(acc, cc, sw)                                                                                    \
    {                                                                                                              \
        __m512i raw = SPLIT ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(                       \
                                                     (const __m256i *)(w0 + (cc) * 64))),                          \
                                                 _mm256_loadu_si256((const __m256i *)(w0 + (cc) * 64 + 32)), 1)    \
                            : _mm512_loadu_si512(w0 + (cc) * 64);                                                  \
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, low4),                       \
                                        _mm512_loadu_si512(xlo + (cc) * 64));                                      \
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4),                             \
                                _mm512_loadu_si512(xhi + (cc) * 64));                                              \
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(xse + (cc) * 16)), sw, acc);   \
    }
    int64_t c = 0;
    /* The 4 * step groups of four chunks (at most 16) are loaded and widened to fp32 once; each chunk then takes
     * its lanes' scales with one permute. */
    const __m512i next = _mm512_set1_epi32((int)step);
    const __m512i lanes1 = _mm512_add_epi32(lanes, next), lanes2 = _mm512_add_epi32(lanes1, next),
                  lanes3 = _mm512_add_epi32(lanes2, next);
    const __mmask16 four = (__mmask16)((1u << (4 * step)) - 1);
    for (; c + 3 < full; c += 4) {
        for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(w0 + (c + j) * 64 + PFV), _MM_HINT_T0);
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_loadu_epi32(four, s0 + 2 * c * step), 16));
        INT4V_STEP(a0, c, _mm512_permutexvar_ps(lanes, sc));
        INT4V_STEP(a1, c + 1, _mm512_permutexvar_ps(lanes1, sc));
        INT4V_STEP(a2, c + 2, _mm512_permutexvar_ps(lanes2, sc));
        INT4V_STEP(a3, c + 3, _mm512_permutexvar_ps(lanes3, sc));
    }
    for (; c < full; c++) INT4V_STEP(a0, c, lane_scales(s0 + 2 * c * step, (int)step, lanes));
#undef INT4V_STEP
    float t = hsum16(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    if (full * 4 < nb) { /* a last chunk of 1-3 blocks (k is whole groups, so the chunk's groups are whole) */
        int64_t g0 = full * step;
        __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << ((nb - 4 * full) * 16)) - 1), w0 + full * 64);
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, low4),
                                        _mm512_loadu_si512(xlo + full * 64));
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4),
                                _mm512_loadu_si512(xhi + full * 64));
        t += hsum16(_mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(xse + full * 16)),
                                  lane_scales(s0 + 2 * g0, (int)(groups - g0), lanes)));
    }
    *y = t + zero_term(s0, xg, groups);
}

/* sz: (scale, zero) of group g and row n at sz + g * 2 + n * sz_n (row by row, as the split stores them). */
void q8v_matmul_int4(const uint8_t *w, const uint16_t *sz, int64_t sz_n, int64_t group, int64_t k, int64_t n0,
                     int64_t n1, const int8_t *xlo, const int8_t *xhi, const float *xse, const float *xg, int64_t m,
                     float *y, int64_t ldy) {
    int64_t nb = (k + 31) / 32, groups = k / group, half = k / 2;
    if (m == 1) {
        for (int64_t n = n0; n < n1; n++) {
            /* The next row's (scale, zero) pairs, a stream of their own beside the weights' that the hardware
             * prefetcher leaves behind: 4096 x 4096 .. 4096 x 11008, G = 64, one thread: 17.9 -> 21.1 GB/s, two
             * 31.8 -> 37.0 (AMD EPYC Zen 5; two or four rows ahead: no better; 4 December 2026). */
            if (n + 1 < n1) {
                const char *next = (const char *)(sz + (n + 1) * sz_n);
                for (int64_t b = 0; b < sz_n * 2; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
            }
            if (split_loads)
                int4v_row(w + n * half, sz + n * sz_n, group, groups, nb, xlo, xhi, xse, xg, y + n, 1);
            else
                int4v_row(w + n * half, sz + n * sz_n, group, groups, nb, xlo, xhi, xse, xg, y + n, 0);
        }
        return;
    }
    int64_t n = n0;
    for (; n + NT4 <= n1; n += NT4)
        int4v_tiles(w, sz, sz_n, half, n, NT4, group, groups, nb, xlo, xhi, xse, xg, m, y, ldy);
    for (; n < n1; n++) int4v_tiles(w, sz, sz_n, half, n, 1, group, groups, nb, xlo, xhi, xse, xg, m, y, ldy);
}

/* Output rows of `count` matrices sharing one input over `threads` OpenMP threads (torch's), as q8_avx2.c's
 * *_many, with its chunk bookkeeping. */
#define MANYV 8 /* MANY in q8_avx2.c */
int64_t q8_many_chunks(int count, const int64_t *n, int64_t *first);
int q8_many_matrix(int64_t c, const int64_t *first);

void q8v_matmul_int8_many(int count, const int8_t *const *w, const uint16_t *const *ws, const int64_t *n, int64_t k,
                          const int8_t *xq, const int32_t *corr, const float *xse, int64_t m, float *const *y,
                          int threads) {
    int64_t first[MANYV + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        q8v_matmul_int8(w[j], ws[j], k, a, b, xq, corr, xse, m, y[j], n[j]);
    }
}

void q8v_matmul_int4_many(int count, const uint8_t *const *w, const uint16_t *const *sz, const int64_t *n,
                          int64_t group, int64_t k, const int8_t *xlo, const int8_t *xhi, const float *xse,
                          const float *xg, int64_t m, float *const *y, int threads) {
    int64_t first[MANYV + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        q8v_matmul_int4(w[j], sz[j], 2 * (k / group), group, k, a, b, xlo, xhi, xse, xg, m, y[j], n[j]);
    }
}

/* From fp32 activations in one call, as q8_avx2.c's q8_int8_products / q8_int4_products (which say why), with the
 * activations' int8 blocks and group sums made by q8_avx2.c's functions. */
int64_t q8_blocks(int64_t k);
void q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xs);
void q8_group_sums(const int8_t *xq, const float *xs, int64_t m, int64_t k, int64_t group, float *xg);

int q8v_int8_products(int count, const int8_t *const *w, const uint16_t *const *ws, const int64_t *n, int64_t k,
                      const float *x, int64_t m, float *const *y, int threads) {
    int64_t nb = q8_blocks(k), nc = q8v_chunks(k);
    int8_t *xq = malloc((size_t)(m * nb * 32));
    float *xs = malloc((size_t)(m * nb) * sizeof(float)), *xse = malloc((size_t)(m * nc * 16) * sizeof(float));
    int32_t *corr = malloc((size_t)(m * nc * 16) * sizeof(int32_t));
    int ok = xq && xs && xse && corr;
    if (ok) {
        q8_quantize(x, m, k, xq, xs);
        q8v_prepare_int8(xq, xs, m, k, corr, xse);
        q8v_matmul_int8_many(count, w, ws, n, k, xq, corr, xse, m, y, threads);
    }
    free(xq);
    free(xs);
    free(xse);
    free(corr);
    return ok ? 0 : -1;
}

int q8v_int4_products(int count, const uint8_t *const *w, const uint16_t *const *sz, const int64_t *n,
                      int64_t group, int64_t k, const float *x, int64_t m, float *const *y, int threads) {
    int64_t nb = q8_blocks(k), nc = (nb + 3) / 4, groups = k / group;
    int8_t *xq = malloc((size_t)(m * nb * 32));
    int8_t *xlo = malloc((size_t)(m * nc * 64)), *xhi = malloc((size_t)(m * nc * 64));
    float *xs = malloc((size_t)(m * nb) * sizeof(float)), *xse = malloc((size_t)(m * nc * 16) * sizeof(float));
    float *xg = malloc((size_t)(m * groups) * sizeof(float));
    int ok = xq && xlo && xhi && xs && xse && xg;
    if (ok) {
        q8_quantize(x, m, k, xq, xs);
        q8_group_sums(xq, xs, m, k, group, xg);
        q8v_prepare_int4(xq, xs, m, k, xlo, xhi, xse);
        q8v_matmul_int4_many(count, w, sz, n, group, k, xlo, xhi, xse, xg, m, y, threads);
    }
    free(xq);
    free(xlo);
    free(xhi);
    free(xs);
    free(xse);
    free(xg);
    return ok ? 0 : -1;
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
