/* Prefill on AVX2 + FMA (+ F16C): fp16 or fp32 weights times a few rows of fp32 activations (models/linear.py: fp16
 * 2..FP16_PREFILL_MAX_ROWS, fp32 2..PREFILL_MAX_ROWS of kernels/native.py), where the CPU has no AVX-512
 * (prefill_avx512.c there; fp16 on a CPU with AVX-512-FP16: torch's).
 *
 *   y[m, n] = sum_k w[n, k] * x[m, k]        w fp16 or fp32 [N, K] row-major, x fp32 [M, K], y fp32 [M, N]
 *
 * Why hand-written: torch has no fast fp16 matmul on such a CPU (16 rows of 4096 x 11008: 267 ms, 3.6x the fp32 time),
 * and its fp32 one (MKL on this AMD CPU; oneDNN in models/linear.py) ran at ~60 GFLOP/s of the two cores' ~160.
 *
 * A prompt is compute-bound: each weight is used by every activation row. 16 ymm registers hold the accumulators of
 * 4 activation rows x 3 weight rows (12), the 3 weight vectors (fp16 widened as loaded) and one activation vector: 7
 * loads per 12 FMAs. The 6 x 2 tile before it loaded 14 (the compiler folds an activation used twice into both
 * FMAs) and ran at 1.1-1.3x the time: 16 rows, 2 threads, interleaved, fp16 weights: 4096 x 4096 5.0 -> 4.4 ms,
 * 11008 x 4096 13.3 -> 11.1, 4096 x 11008 12.3 -> 9.9 (AMD EPYC Zen 3, 4 December 2026). The sums run in 8 lanes
 * along K, tile after tile, added up at the end: the same order as the 6 x 2 tile, so the same bits.
 *
 * Built with q8_avx2.c into one library by kernels/native.py; its threads note applies here too. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx2_sums.h"

#define PRE_PF 1024  /* bytes ahead in each weight row that are prefetched, once per 64-byte line */
#define PRE_TILE 256 /* columns per pass: 16 activation rows (16 KB) and a chunk's weight rows of it stay in L1: fp16,
                      * 16 rows of 11008 x 4096: 11.1 ms at 256, 15.5 at 128, 11.5 at 384 */
#define PRE_CHUNK 24 /* weight rows per chunk over the threads: 8 tiles of 3 (16 left one row alone: 5 x 3 + 1) */
#define PRE_ROWS 16  /* activation rows per pass over the weights: 4 tiles of 4 */

/* 8 weights of row `row` from column i, as fp32: fp16 widened (F16 = 1) or fp32 loaded (F16 = 0). */
static inline __attribute__((always_inline)) __m256 pre_load(const void *w, int64_t k, int64_t row, int64_t i,
                                                             const int F16) {
    if (F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + row * k + i)));
    return _mm256_loadu_ps((const float *)w + row * k + i);
}

/* Columns i0 .. i1 (multiples of 8 apart) of weight rows n .. n + R - 1 against activation rows m0 .. m0 + M - 1
 * of the packed tile xt (row r at xt + r * (i1 - i0)) (R <= 3, M <= 4, F16: constants where called, so the loops
 * unroll into registers), the 8-lane partial sums carried in acc[j][c] (memory, L1) from one tile to the next. */
static inline __attribute__((always_inline)) void pre_tile(const void *w, int64_t k, const float *xt, int64_t m0,
                                                           const int M, int64_t n, const int R, int64_t i0, int64_t i1,
                                                           __m256 acc[4][3], const int F16) {
    const int64_t bytes = F16 ? 2 : 4, tw = i1 - i0;
    __m256 a[4][3];
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) a[j][c] = acc[j][c];
    for (int64_t i = i0; i < i1; i += 8) {
        if ((((i - i0) * bytes) & 63) == 0)
            for (int c = 0; c < R; c++)
                _mm_prefetch((const char *)w + ((n + c) * k + i) * bytes + PRE_PF, _MM_HINT_T0);
        __m256 wv[3];
        for (int c = 0; c < R; c++) wv[c] = pre_load(w, k, n + c, i, F16);
        for (int j = 0; j < M; j++) {
            __m256 xv = _mm256_loadu_ps(xt + (m0 + j) * tw + (i - i0));
            __asm__("" : "+x"(xv)); /* in a register, loaded once for the R FMAs (the compiler would fold it in each) */
            for (int c = 0; c < R; c++) a[j][c] = _mm256_fmadd_ps(wv[c], xv, a[j][c]);
        }
    }
    for (int j = 0; j < M; j++)
        for (int c = 0; c < R; c++) acc[j][c] = a[j][c];
}

/* The m (<= PRE_ROWS) activation rows of one tile against weight rows n .. n + R - 1, 4 at a time. (Groups of even
 * sizes, 3 + 3 for 6 rows rather than 4 + 2, were 5-10 % slower: each group widens the weights again.) */
static inline __attribute__((always_inline)) void pre_rows(const void *w, int64_t k, const float *xt, int64_t m,
                                                           int64_t n, const int R, int64_t i0, int64_t i1,
                                                           __m256 acc[4][4][3], const int F16) {
    int64_t m0 = 0;
    for (int g = 0; m0 + 4 <= m; m0 += 4, g++) pre_tile(w, k, xt, m0, 4, n, R, i0, i1, acc[g], F16);
    switch (m - m0) {
    case 3: pre_tile(w, k, xt, m0, 3, n, R, i0, i1, acc[m0 / 4], F16); break;
    case 2: pre_tile(w, k, xt, m0, 2, n, R, i0, i1, acc[m0 / 4], F16); break;
    case 1: pre_tile(w, k, xt, m0, 1, n, R, i0, i1, acc[m0 / 4], F16); break;
    default: break;
    }
}

/* Activation rows 0 .. m - 1 against the weight rows a .. b - 1 of one chunk (b - a <= PRE_CHUNK): tile by tile of
 * columns, and in each tile every 3 of the chunk's weight rows, so that the tile of the activations stays in L1 for
 * all of them. The activations come packed tile by tile (pre_pack): rows K floats apart fall in the same few sets of
 * L1 (K = 4096: 16 KB apart), and 16 of them with the weight rows did not stay there. The last k % 8 columns in
 * scalar code, from x itself. */
static inline __attribute__((always_inline)) void pre_chunk(const void *w, int64_t k, const float *x, const float *xp,
                                                            int64_t m, int64_t a, int64_t b, float *y, int64_t ldy,
                                                            const int F16) {
    __m256 acc[PRE_CHUNK / 3][4][4][3]; /* per 3 weight rows and group of 4 activation rows: 12 KB */
    int triples = (int)((b - a + 2) / 3), groups = (int)((m + 3) / 4);
    int64_t k8 = k - k % 8;
    for (int p = 0; p < triples; p++)
        for (int g = 0; g < groups; g++)
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 3; c++) acc[p][g][j][c] = _mm256_setzero_ps();
    for (int64_t i0 = 0; i0 < k8; i0 += PRE_TILE) {
        int64_t i1 = i0 + PRE_TILE < k8 ? i0 + PRE_TILE : k8;
        for (int p = 0; p < triples; p++) {
            int64_t n = a + 3 * p;
            if (n + 2 < b)
                pre_rows(w, k, xp + i0 * m, m, n, 3, i0, i1, acc[p], F16);
            else if (n + 1 < b)
                pre_rows(w, k, xp + i0 * m, m, n, 2, i0, i1, acc[p], F16);
            else
                pre_rows(w, k, xp + i0 * m, m, n, 1, i0, i1, acc[p], F16);
        }
    }
    for (int64_t n = a; n < b; n++)
        for (int64_t r = 0; r < m; r++) {
            float t = hsum8(acc[(n - a) / 3][r / 4][r % 4][(n - a) % 3]);
            for (int64_t i = k8; i < k; i++)
                t += (F16 ? _cvtsh_ss(((const uint16_t *)w)[n * k + i]) : ((const float *)w)[n * k + i]) * x[r * k + i];
            y[r * ldy + n] = t;
        }
}

/* x [m, k] packed tile by tile into xp: the tile of columns i0 .. i1 is m rows of i1 - i0 floats, from xp + i0 * m. */
static void pre_pack(const float *x, int64_t m, int64_t k, float *xp) {
    int64_t k8 = k - k % 8;
    for (int64_t i0 = 0; i0 < k8; i0 += PRE_TILE) {
        int64_t wt = i0 + PRE_TILE < k8 ? PRE_TILE : k8 - i0;
        for (int64_t r = 0; r < m; r++) memcpy(xp + i0 * m + r * wt, x + r * k + i0, (size_t)wt * sizeof(float));
    }
}

/* y [m, n] = x [m, k] w [n, k]^T, output rows in chunks of PRE_CHUNK over `threads` OpenMP threads (torch's, as in
 * q8_avx2.c), activation rows PRE_ROWS at a time. Returns 0, or -1 where the buffer of the packed activations could
 * not be had. */
static int pre_matmul(const void *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads,
                      const int F16) {
    float *xp = malloc((size_t)((m < PRE_ROWS ? m : PRE_ROWS) * k) * sizeof(float));
    if (!xp) return -1;
    int64_t chunks = (n + PRE_CHUNK - 1) / PRE_CHUNK;
    for (int64_t r0 = 0; r0 < m; r0 += PRE_ROWS) {
        int64_t rows = m - r0 < PRE_ROWS ? m - r0 : PRE_ROWS;
        pre_pack(x + r0 * k, rows, k, xp);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t c = 0; c < chunks; c++) {
            int64_t a = c * PRE_CHUNK, b = a + PRE_CHUNK < n ? a + PRE_CHUNK : n;
            pre_chunk(w, k, x + r0 * k, xp, rows, a, b, y + r0 * n, n, F16);
        }
    }
    free(xp);
    return 0;
}

int f16_matmul(const uint16_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads) {
    return pre_matmul(w, n, k, x, m, y, threads, 1);
}

int f32_matmul_avx2(const float *w, int64_t n, int64_t k, const float *x, int64_t m, float *y, int threads) {
    return pre_matmul(w, n, k, x, m, y, threads, 0);
}
