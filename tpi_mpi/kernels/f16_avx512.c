/* fp16 weights times one row of fp32 activations on AVX-512F: f16_avx2.c's decoding product where the CPU has
 * AVX-512 (kernels/native.py chooses), 16 weights widened per vcvtph2ps instead of 8, prefetched further ahead.
 *
 * Why a second version: on a CPU whose bus feeds one core at ~40 GB/s (AMD EPYC Zen 5, 4 December 2026: torch's
 * sum over 2 GiB read 39-40 GB/s at one thread), f16_avx2.c's prefetch 1 KiB ahead left a thread at 26-28 GB/s;
 * 4 layers of Llama-2-7B's matrices on huge pages, interleaved, one thread: 27.5 GB/s there, 31.5 here at 1 KiB,
 * 34.1 at 2 KiB, 35.6-35.8 at 3-4 KiB, 33.7 at 8 KiB (f16_avx2.c's loop at 4 KiB: 34.8, so the distance is most of
 * it); two threads: 43.2 there, 46.9-48.2 here at 2-4 KiB, against 47.6-48.5 for torch's sum over the same tensors.
 *
 *   y[n] = sum_k float(w[n, k]) * x[k]        w fp16 [N, K] row-major, x fp32 [K], y fp32 [N]
 *
 * The sums run in 16 lanes (f16_avx2.c: 8), another order of the same fp32 additions: the tests hold both to an
 * fp64 reference within fp32 rounding.
 */
#if defined(__clang__) /* as q8_avx512.c: the targets on every function of this file only */
#pragma clang attribute push(__attribute__((target("avx512f,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,fma,f16c")
#endif
#include <immintrin.h>
#include <stdint.h>

#ifndef PF16V
#define PF16V 4096 /* bytes ahead in the row that are prefetched (above) */
#endif

/* y[n] for rows n in [n0, n1): four accumulators of 16 lanes, 64 weights (128 bytes, two lines) a step. */
static void f16v_matvec(const uint16_t *w, int64_t k, int64_t n0, int64_t n1, const float *x, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *r = w + n * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t i = 0;
        for (; i + 64 <= k; i += 64) {
            _mm_prefetch((const char *)(r + i) + PF16V, _MM_HINT_T0);
            _mm_prefetch((const char *)(r + i) + PF16V + 64, _MM_HINT_T0);
#define F16V_STEP(acc, o)                                                                                     \
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + i + (o)))),               \
                          _mm512_loadu_ps(x + i + (o)), acc)
            F16V_STEP(a0, 0);
            F16V_STEP(a1, 16);
            F16V_STEP(a2, 32);
            F16V_STEP(a3, 48);
#undef F16V_STEP
        }
        for (; i + 16 <= k; i += 16)
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(r + i))), _mm512_loadu_ps(x + i),
                                 a0);
        float total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; i < k; i++) total += _cvtsh_ss(r[i]) * x[i];
        y[n] = total;
    }
}

/* f16_matvec_many (f16_avx2.c) with this file's rows: `count` (<= 8) matrices sharing one x, their output rows in
 * chunks of 16 over `threads` OpenMP threads in one parallel region. */
int64_t q8_many_chunks(int count, const int64_t *n, int64_t *first);
int q8_many_matrix(int64_t c, const int64_t *first);

void f16v_matvec_many(int count, const uint16_t *const *w, const int64_t *n, int64_t k, const float *x,
                      float *const *y, int threads) {
    int64_t first[8 + 1], chunks = q8_many_chunks(count, n, first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        int j = q8_many_matrix(c, first);
        int64_t a = (c - first[j]) * 16, b = a + 16 < n[j] ? a + 16 : n[j];
        f16v_matvec(w[j], k, a, b, x, y[j]);
    }
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
