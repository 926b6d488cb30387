/* fp16 weights times one row of fp32 activations on AVX2 + F16C: decoding (the prefill of a short prompt is
 * prefill_avx2.c's).
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
