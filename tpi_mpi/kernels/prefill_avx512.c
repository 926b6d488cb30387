/* fp32 or fp16 weights times a few rows of fp32 activations on AVX-512: the prefill of a short prompt (prefill_avx2.c
 * is the same on CPUs without AVX-512).
 *
 * Why hand-written: oneDNN's fp32 product (models/linear.py's prefill path) is limited by its arithmetic at a few
 * rows: 16 rows of 4096 x 11008 took 24.7 ms on one thread and 12.4 on two (7.3 GB/s of weights a thread, 30 % of
 * the FMA peak), so a 7B-shaped prompt of 16 tokens spent 250 ms reading 3.8 GB of weights (3 December 2026, Intel
 * Xeon with AVX-512). Here 4 weight rows are loaded once per 16 columns and multiplied into up to 6 rows of
 * activations at a time (24 accumulators of 16 lanes), a tile of F32_TILE columns at a time, so that the tile of
 * the 4 weight rows stays in L1 while the groups of 6 activation rows pass over it. fp16 weights take the same loops,
 * each 16 widened to fp32 as they are loaded (the sum a fp16 matmul keeps): on AMD EPYC Zen 5, where
 * prefill_avx2.c's tiles of 4 x 3 ran them before, see docs/quantization.md. kernels/native.py calls this where the
 * CPU has AVX-512 (F, BW, VL), for 2..PREFILL_MAX_ROWS rows (fp32) or FP16_PREFILL_MAX_ROWS (fp16; models/linear.py);
 * the file is compiled for AVX-512 by the pragma below.
 *
 *   y[m, n] = sum_k w[n, k] * x[m, k]      w fp32 or fp16 [N, K], x fp32 [M, K], y fp32 [M, N], all row-major
 *
 * The sums run in 16 lanes and are added up at the end, another order than oneDNN's: they agree to fp32 rounding.
 */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,fma,f16c")
#endif
#include <immintrin.h>
#include <stdint.h>

#define F32_PF 1024 /* bytes ahead in each weight row that are prefetched, as the other kernels */

#define F32_TILE 512 /* columns per pass: 6 activation rows and 4 weight rows of it (20 KB) stay in L1 */

/* 16 weights from column i of row `row` as fp32: fp32 weights loaded, fp16 ones widened (HALF, a constant where
 * called, so the branch is gone); `mk` masks the last k % 16. */
static inline __attribute__((always_inline)) __m512 wload(const void *w, const int HALF, int64_t k, int64_t row,
                                                          int64_t i, __mmask16 mk) {
    if (HALF)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)w + row * k + i));
    return _mm512_maskz_loadu_ps(mk, (const float *)w + row * k + i);
}

static inline __attribute__((always_inline)) void wprefetch(const void *w, const int HALF, int64_t k, int64_t row,
                                                            int64_t i) {
    const char *p = HALF ? (const char *)((const uint16_t *)w + row * k + i)
                         : (const char *)((const float *)w + row * k + i);
    _mm_prefetch(p + F32_PF, _MM_HINT_T0);
}

/* Columns i0 .. i1 of weight rows n .. n + R - 1 against activation rows m0 .. m0 + M - 1 (R <= 4, M <= 6: constants
 * where called, so the loops over them unroll into registers), the 16-lane partial sums carried in acc[j][c] (memory,
 * L1) from one tile to the next. */
static inline __attribute__((always_inline)) void f32_tile(const void *w, const int HALF, int64_t k, const float *x,
                                                           int64_t m0, const int M, int64_t n, const int R, int64_t i0,
                                                           int64_t i1, __m512 acc[6][4]) {
    __m512 a[6][4];
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) a[j][c] = acc[j][c];
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        __m512 wv[4];
        for (int c = 0; c < R; c++) {
            wprefetch(w, HALF, k, n + c, i);
            wv[c] = wload(w, HALF, k, n + c, i, (__mmask16)0xffff);
        }
        for (int j = 0; j < M; j++) {
            __m512 xv = _mm512_loadu_ps(x + (m0 + j) * k + i);
            for (int c = 0; c < R; c++) a[j][c] = _mm512_fmadd_ps(wv[c], xv, a[j][c]);
        }
    }
    if (i < i1) { /* the last k % 16 columns, masked */
        __mmask16 mk = (__mmask16)((1u << (i1 - i)) - 1);
        __m512 wv[4];
        for (int c = 0; c < R; c++) wv[c] = wload(w, HALF, k, n + c, i, mk);
        for (int j = 0; j < M; j++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk, x + (m0 + j) * k + i);
            for (int c = 0; c < R; c++) a[j][c] = _mm512_fmadd_ps(wv[c], xv, a[j][c]);
        }
    }
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) acc[j][c] = a[j][c];
}

/* Activation rows 0 .. m - 1 (m <= 18) against weight rows n .. n + R - 1: tile by tile of F32_TILE columns, and in
 * each tile the activation rows 6 at a time. In one pass over all k the 6 activation rows and 4 weight rows (160 KB at
 * K = 4096) came from L2 at every step, which held the FMAs to half their rate even on weights in cache (16 rows of
 * 4096 x 11008, 2 threads: 9.6-9.8 ms in one pass, 7.7-8.1 in tiles of 128-512; 3 December 2026). */
static inline __attribute__((always_inline)) void f32_rows(const void *w, const int HALF, int64_t k, const float *x,
                                                           int64_t m, int64_t n, const int R, float *y, int64_t ldy) {
    __m512 acc[3][6][4]; /* per group of 6 activation rows */
    int groups = (int)((m + 5) / 6);
    for (int g = 0; g < groups; g++)
        for (int j = 0; j < 6; j++)
            for (int c = 0; c < 4; c++) acc[g][j][c] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < k; i0 += F32_TILE) {
        int64_t i1 = i0 + F32_TILE < k ? i0 + F32_TILE : k;
        int64_t m0 = 0;
        for (int g = 0; m0 + 6 <= m; m0 += 6, g++) f32_tile(w, HALF, k, x, m0, 6, n, R, i0, i1, acc[g]);
        switch (m - m0) {
        case 5: f32_tile(w, HALF, k, x, m0, 5, n, R, i0, i1, acc[m0 / 6]); break;
        case 4: f32_tile(w, HALF, k, x, m0, 4, n, R, i0, i1, acc[m0 / 6]); break;
        case 3: f32_tile(w, HALF, k, x, m0, 3, n, R, i0, i1, acc[m0 / 6]); break;
        case 2: f32_tile(w, HALF, k, x, m0, 2, n, R, i0, i1, acc[m0 / 6]); break;
        case 1: f32_tile(w, HALF, k, x, m0, 1, n, R, i0, i1, acc[m0 / 6]); break;
        default: break;
        }
    }
    for (int64_t r = 0; r < m; r++)
        for (int c = 0; c < R; c++) y[r * ldy + n + c] = _mm512_reduce_add_ps(acc[r / 6][r % 6][c]);
}

/* y [m, n] = x [m, k] w [n, k]^T (w fp32, or fp16 where HALF), output rows in chunks of 16 over `threads` OpenMP
 * threads (torch's, as the other kernels: q8_avx2.c says why), activation rows 18 at a time (f32_rows' three groups
 * of 6). */
static inline __attribute__((always_inline)) void matmul512(const void *w, const int HALF, int64_t n, int64_t k,
                                                            const float *x, int64_t m, float *y, int threads) {
    int64_t chunks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t a = c * 16, b = a + 16 < n ? a + 16 : n;
        for (int64_t r0 = 0; r0 < m; r0 += 18) {
            int64_t rows = m - r0 < 18 ? m - r0 : 18, r = a;
            for (; r + 4 <= b; r += 4) f32_rows(w, HALF, k, x + r0 * k, rows, r, 4, y + r0 * n, n);
            for (; r < b; r++) f32_rows(w, HALF, k, x + r0 * k, rows, r, 1, y + r0 * n, n);
        }
    }
}

/* 0 always (no workspace to allocate): the return of prefill_avx2.c's entry points, so that native.py calls both
 * alike. */
int f32_matmul(const float *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads) {
    matmul512(w, 0, n, k, x, m, y, threads);
    return 0;
}

int f16_matmul_avx512(const uint16_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads) {
    matmul512(w, 1, n, k, x, m, y, threads);
    return 0;
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
