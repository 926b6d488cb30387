/* fp32 weights times one row of fp32 activations on AVX2 + FMA: decoding with fp32 weights.
 *
 * Why hand-written: torch's fp32 product for one row (MKL's sgemv, split over the threads by output rows in
 * models/linear.py) read the weights at 1.42x the bus's time per token at one rank, where llama.cpp's F32 was at
 * 1.01x in the same run (bench.llamacpp, AMD EPYC Zen 3, 4 December 2026): MKL's one-row path on AMD CPUs reads
 * at about half the bus per thread. Here 4 weight rows are read side by side against each 16 activations loaded
 * once: 11008 x 4096, interleaved with torch's path, 2 threads: 5.8-6.7 ms against 9.6-11.2 (27-31 GB/s, the
 * bus, against 16-19); one thread: 9.1-10.3 against 9.3-10.5 (even: 4 rows at a time, as MKL's one thread does; one
 * row at a time with 4 accumulators was 11.3 against 8.5).
 *
 *   y[n] = sum_k w[n, k] * x[k]        w fp32 [N, K] row-major, x fp32 [K], y fp32 [N]
 *
 * The sums run in 8 lanes, added up at the end, another order than MKL's: they agree to fp32 rounding.
 */
#include <immintrin.h>
#include <stdint.h>

#include "avx2_sums.h"

/* Bytes ahead in each row that are prefetched: 512 measured best of 512, 1024, 2048 (11008 x 4096, one thread:
 * 9.1-9.5 ms against 10.0-10.2 at 1024). */
#define PF32 512

/* Rows n .. n + R - 1 (R <= 4, a constant where called): each 8 activations loaded once for the R rows, two steps of
 * 8 columns at a time into separate accumulators (the FMA latency), R weight streams read side by side. */
static inline __attribute__((always_inline)) void f32_rows(const float *w, int64_t k, int64_t n, const int R,
                                                           const float *x, float *y) {
    __m256 a[4][2];
    const float *r[4];
    for (int j = 0; j < R; j++) {
        r[j] = w + (n + j) * k;
        a[j][0] = a[j][1] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        for (int j = 0; j < R; j++) {
            _mm_prefetch((const char *)(r[j] + i) + PF32, _MM_HINT_T0);
            a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(r[j] + i), x0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(r[j] + i + 8), x1, a[j][1]);
        }
    }
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < R; j++) a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(r[j] + i), _mm256_loadu_ps(x + i), a[j][0]);
    for (int j = 0; j < R; j++) {
        float total = hsum8(_mm256_add_ps(a[j][0], a[j][1]));
        for (int64_t t = i; t < k; t++) total += r[j][t] * x[t];
        y[n + j] = total;
    }
}

static void f32_matvec(const float *w, int64_t k, int64_t n0, int64_t n1, const float *x, float *y) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) f32_rows(w, k, n, 4, x, y);
    for (; n < n1; n++) f32_rows(w, k, n, 1, x, y);
}

/* y[j] = w[j] x for `count` (<= 8) matrices that share one input x (one, or q/k/v, gate/up), as f16_matvec_many:
 * their output rows in chunks of 16 over `threads` OpenMP threads in one parallel region. */
int64_t q8_many_chunks(int count, const int64_t *n, int64_t *first);
int q8_many_matrix(int64_t c, const int64_t *first);

void f32_matvec_many(int count, const float *const *w, const int64_t *n, int64_t k, const float *x, float *const *y,
                     int threads) {
    int64_t first[8 + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        f32_matvec(w[j], k, a, b, x, y[j]);
    }
}
