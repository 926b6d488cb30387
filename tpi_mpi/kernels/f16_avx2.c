/* fp16 weights times fp32 activations on AVX2 + F16C: one row (decoding), and a few rows (the prefill of a short
 * prompt, below).
 *
 * Why hand-written: torch's fp16 product for one row (F.linear on a CPU without AVX512-FP16) read the weights at
 * about 7.4 GB/s with 2 threads on this session's host, which reads 16.4 GB/s (docs/quantization.md). Here each 8
 * weights are widened to fp32 in one instruction (vcvtph2ps) and multiplied into fp32 accumulators, the sum a
 * fp16 matmul keeps; 4096 x 44032 with 2 threads: 15 GB/s (2 December 2026).
 *
 *   y[n] = sum_k float(w[n, k]) * x[k]        w fp16 [N, K] row-major, x fp32 [K], y fp32 [N]
 *
 * Built with q8_avx2.c into one library by kernels/native.py; its threads note applies here too.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_sums.h"

/* Bytes ahead in the row that are prefetched: 1024 measured best of 512, 1024, 2048 (the hardware prefetcher
 * alone leaves one thread short of the bus, as for the int8 kernel). */
#define PF16 1024

/* y[n] for rows n in [n0, n1). Four accumulators of 8 lanes: the fmadd latency is hidden behind the loads. 64 weights
 * (128 bytes) a step, not 32: 27.1-27.6 GB/s against 25.8-26.3 on huge pages, 2 threads (3 December 2026). */
void f16_matvec(const uint16_t *w, int64_t k, int64_t n0, int64_t n1, const float *x, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *r = w + n * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 64 <= k; i += 64) {
            _mm_prefetch((const char *)(r + i) + PF16, _MM_HINT_T0);
            _mm_prefetch((const char *)(r + i) + PF16 + 64, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 8))),
                                 _mm256_loadu_ps(x + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 16))),
                                 _mm256_loadu_ps(x + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 24))),
                                 _mm256_loadu_ps(x + i + 24), a3);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 32))),
                                 _mm256_loadu_ps(x + i + 32), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 40))),
                                 _mm256_loadu_ps(x + i + 40), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 48))),
                                 _mm256_loadu_ps(x + i + 48), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 56))),
                                 _mm256_loadu_ps(x + i + 56), a3);
        }
        for (; i + 8 <= k; i += 8)
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))), _mm256_loadu_ps(x + i), a0);
        float total = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; i < k; i++) total += _cvtsh_ss(r[i]) * x[i];
        y[n] = total;
    }
}

/* y[j] = w[j] x for `count` matrices that share one input x (one, or q/k/v, gate/up), as q8_avx2.c's *_many: their
 * output rows in chunks of 16 over `threads` OpenMP threads (torch's: q8_avx2.c) in one parallel region, so the
 * threads start once, not once per matrix. Each row's sum is the one f16_matvec computes alone. */
int64_t q8_many_chunks(int count, const int64_t *n, int64_t *first);
int q8_many_matrix(int64_t c, const int64_t *first);

void f16_matvec_many(int count, const uint16_t *const *w, const int64_t *n, int64_t k, const float *x, float *const *y,
                     int threads) {
    int64_t first[8 + 1], chunks = q8_many_chunks(count, n, first); /* count <= 8, MANY in q8_avx2.c */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        f16_matvec(w[j], k, a, b, x, y[j]);
    }
}

/* Prefill: fp16 weights times a few rows of fp32 activations (2..PREFILL_MAX_ROWS, kernels/native.py), where the
 * CPU has no AVX-512-FP16 (models/linear.py): f32_avx512.c's tiled product in 8 lanes, each weight widened as it is
 * loaded. 16 ymm registers hold the accumulators of 6 activation rows x 2 weight rows (12), the 2 weight vectors and
 * one activation vector. Against the path without it (_fp16_by_chunks: a chunk of rows converted to fp32, then
 * oneDNN), 16 rows of 11008 x 4096, 2 threads, interleaved: 17.3-23.0 ms against 23.3-30.8 (1.3x); the same loop
 * on fp32 weights was only as fast as oneDNN (18.5-21.6 ms against 19.2-21.5), so fp32 prefill stays there (AMD
 * EPYC Zen 3, 4 December 2026). */
#define F16P_PF 1024   /* bytes ahead in each weight row that are prefetched, as the other kernels */
#define F16P_TILE 256  /* columns per pass: 16 activation rows (16 KB) and 16 weight rows (8 KB) of it stay in L1:
                        * 17.3-18.2 ms at 256, 19.5 at 128, 21.3 at 512 */

/* Columns i0 .. i1 (multiples of 8 apart) of weight rows n .. n + R - 1 against activation rows m0 .. m0 + M - 1
 * of the packed tile xt (row r at xt + r * (i1 - i0)) (R <= 2, M <= 6: constants where called, so the loops unroll
 * into registers), the 8-lane partial sums carried in acc[j][c] (memory, L1) from one tile to the next. */
static inline __attribute__((always_inline)) void f16p_tile(const uint16_t *w, int64_t k, const float *xt, int64_t m0,
                                                            const int M, int64_t n, const int R, int64_t i0,
                                                            int64_t i1, __m256 acc[6][2]) {
    __m256 a[6][2];
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) a[j][c] = acc[j][c];
    for (int64_t i = i0; i < i1; i += 8) {
        __m256 wv[2];
        for (int c = 0; c < R; c++) {
            _mm_prefetch((const char *)(w + (n + c) * k + i) + F16P_PF, _MM_HINT_T0);
            wv[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + (n + c) * k + i)));
        }
        for (int j = 0; j < M; j++) {
            __m256 xv = _mm256_loadu_ps(xt + (m0 + j) * (i1 - i0) + (i - i0));
            for (int c = 0; c < R; c++) a[j][c] = _mm256_fmadd_ps(wv[c], xv, a[j][c]);
        }
    }
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) acc[j][c] = a[j][c];
}

/* The m activation rows of one tile against weight rows n .. n + R - 1, 6 at a time. */
static inline __attribute__((always_inline)) void f16p_rows(const uint16_t *w, int64_t k, const float *xt, int64_t m,
                                                            int64_t n, const int R, int64_t i0, int64_t i1,
                                                            __m256 acc[3][6][2]) {
    int64_t m0 = 0;
    for (int g = 0; m0 + 6 <= m; m0 += 6, g++) f16p_tile(w, k, xt, m0, 6, n, R, i0, i1, acc[g]);
    switch (m - m0) {
    case 5: f16p_tile(w, k, xt, m0, 5, n, R, i0, i1, acc[m0 / 6]); break;
    case 4: f16p_tile(w, k, xt, m0, 4, n, R, i0, i1, acc[m0 / 6]); break;
    case 3: f16p_tile(w, k, xt, m0, 3, n, R, i0, i1, acc[m0 / 6]); break;
    case 2: f16p_tile(w, k, xt, m0, 2, n, R, i0, i1, acc[m0 / 6]); break;
    case 1: f16p_tile(w, k, xt, m0, 1, n, R, i0, i1, acc[m0 / 6]); break;
    default: break;
    }
}

/* Activation rows 0 .. m - 1 (m <= 18) against the weight rows a .. b - 1 of one chunk (b - a <= 16): tile by tile
 * of columns, and in each tile every pair of the chunk's weight rows, so that the tile of the activations stays in
 * L1 for all of them. The activations come packed tile by tile (f16p_pack): rows K floats apart fall in the same
 * few sets of L1 (K = 4096: 16 KB apart), and 16 of them with the weight rows did not stay there. The last k % 8
 * columns in scalar code, from x itself. */
static inline __attribute__((always_inline)) void f16p_chunk(const uint16_t *w, int64_t k, const float *x,
                                                             const float *xp, int64_t m, int64_t a, int64_t b,
                                                             float *y, int64_t ldy) {
    __m256 acc[8][3][6][2]; /* per pair of weight rows and group of 6 activation rows: 9 KB */
    int pairs = (int)((b - a + 1) / 2), groups = (int)((m + 5) / 6);
    int64_t k8 = k - k % 8;
    for (int p = 0; p < pairs; p++)
        for (int g = 0; g < groups; g++)
            for (int j = 0; j < 6; j++) acc[p][g][j][0] = acc[p][g][j][1] = _mm256_setzero_ps();
    for (int64_t i0 = 0; i0 < k8; i0 += F16P_TILE) {
        int64_t i1 = i0 + F16P_TILE < k8 ? i0 + F16P_TILE : k8;
        for (int p = 0; p < pairs; p++) {
            int64_t n = a + 2 * p;
            if (n + 1 < b)
                f16p_rows(w, k, xp + i0 * m, m, n, 2, i0, i1, acc[p]);
            else
                f16p_rows(w, k, xp + i0 * m, m, n, 1, i0, i1, acc[p]);
        }
    }
    for (int64_t n = a; n < b; n++)
        for (int64_t r = 0; r < m; r++) {
            float t = hsum8(acc[(n - a) / 2][r / 6][r % 6][(n - a) % 2]);
            for (int64_t i = k8; i < k; i++) t += _cvtsh_ss(w[n * k + i]) * x[r * k + i];
            y[r * ldy + n] = t;
        }
}

/* x [m, k] packed tile by tile into xp: the tile of columns i0 .. i1 is m rows of i1 - i0 floats, from xp + i0 * m. */
static void f16p_pack(const float *x, int64_t m, int64_t k, float *xp) {
    int64_t k8 = k - k % 8;
    for (int64_t i0 = 0; i0 < k8; i0 += F16P_TILE) {
        int64_t wt = i0 + F16P_TILE < k8 ? F16P_TILE : k8 - i0;
        for (int64_t r = 0; r < m; r++) memcpy(xp + i0 * m + r * wt, x + r * k + i0, (size_t)wt * sizeof(float));
    }
}

/* y [m, n] = x [m, k] w [n, k]^T, output rows in chunks of 16 over `threads` OpenMP threads (torch's, as above).
 * Returns 0, or -1 where the buffer of the packed activations could not be had. */
int f16_matmul(const uint16_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads) {
    float *xp = malloc((size_t)((m < 18 ? m : 18) * k) * sizeof(float));
    if (!xp) return -1;
    int64_t chunks = (n + 15) / 16;
    for (int64_t r0 = 0; r0 < m; r0 += 18) { /* activation rows 18 at a time: f16p_chunk's three groups of 6 */
        int64_t rows = m - r0 < 18 ? m - r0 : 18;
        f16p_pack(x + r0 * k, rows, k, xp);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t a = c * 16, b = a + 16 < n ? a + 16 : n;
            f16p_chunk(w, k, x + r0 * k, xp, rows, a, b, y + r0 * n, n);
        }
    }
    free(xp);
    return 0;
}

