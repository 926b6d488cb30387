/* What the AVX2 kernels share (q8_avx2.c, f16_avx2.c, f32_avx2.c, step_ops.c): the sum of the 8 lanes of a register. Included,
 * not compiled on its own; kernels/native.py hashes it with the sources. */
#ifndef TPI_MPI_AVX2_SUMS_H
#define TPI_MPI_AVX2_SUMS_H
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
