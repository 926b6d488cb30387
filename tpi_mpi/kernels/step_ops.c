/* The small per-layer operations of a decoding step: RMSNorm, RoPE, and attention of one position, in float32 or
 * float16 layers (`half`: values, weights, cos/sin and the KV cache in fp16).
 *
 * Why hand-written: at one position these are a few microseconds of arithmetic each, but as torch ops they are a
 * dozen dispatches, temporaries and views each, and between the weight products they ran 3-5x slower than alone
 * (RMSNorm 60 us, RoPE 85, SDPA 146 per layer in a 7B-shaped int4 step of 23 ms: 1.7 ms of it with the other glue;
 * 3 December 2026). models/llama.py calls these for fp32 and fp16 layers at one position per sequence and keeps
 * torch's ops for the rest (prefill, bf16 layers, model.kernel=torch, where the library cannot be built).
 *
 * The arithmetic is that of the torch code they replace (models/llama.py, decoder_config.apply_rope), rounded the
 * same way where the order is the same: RoPE rounds each product, then the sum (-std=c11 does not contract them
 * into FMAs), and in fp16 each result to fp16 as torch's fp16 ops do. The sums of RMSNorm and attention run in
 * another order (in fp32 for fp16 layers too, as torch's), so they agree to the rounding of the dtype, not bit for
 * bit (tests/test_step_ops.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "avx2_sums.h"

static float dot(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float s = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Element i of an fp32 or fp16 array as fp32; v stored into one; v rounded to what one holds. */
static inline float ld(const void *p, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int64_t i, float v, int half) {
    if (half)
        ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    else
        ((float *)p)[i] = v;
}

static inline float rnd(float v, int half) { return half ? _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)) : v; }

/* fp32 q times an fp16 key row. */
static float dot_h(const float *a, const uint16_t *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),
                               _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8),
                               _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8))), acc1);
    }
    float s = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * _cvtsh_ss(b[i]);
    return s;
}

/* out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)) for each of the m rows of k values, as HF's LlamaRMSNorm: the
 * mean and the normalised row in fp32, the row rounded to the weight's dtype, then times the weight (rounded to
 * it). out may be x. */
void step_rms_norm(const void *x, const void *w, int64_t m, int64_t k, float eps, void *out, int half) {
    for (int64_t r = 0; r < m; r++) {
        float sq = 0.0f;
        if (half)
            for (int64_t i = 0; i < k; i++) {
                float v = ld(x, r * k + i, 1);
                sq += v * v;
            }
        else
            sq = dot((const float *)x + r * k, (const float *)x + r * k, k);
        float inv = 1.0f / sqrtf(sq / (float)k + eps);
        for (int64_t i = 0; i < k; i++)
            st(out, r * k + i, ld(w, i, half) * rnd(ld(x, r * k + i, half) * inv, half), half);
    }
}

/* Rotates heads x [heads, dim] in place by cos, sin [dim] of its position, as HF's rotate-half RoPE:
 * x' = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]). */
static void rope(void *x, int64_t heads, int64_t dim, const void *cos, const void *sin, int half) {
    int64_t h2 = dim / 2;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = h * dim; i < h * dim + h2; i++) {
            int64_t j = i - h * dim;
            float a = ld(x, i, half), b = ld(x, i + h2, half);
            float lo = rnd(a * ld(cos, j, half), half), lo_rot = rnd(-b * ld(sin, j, half), half);
            float hi = rnd(b * ld(cos, j + h2, half), half), hi_rot = rnd(a * ld(sin, j + h2, half), half);
            st(x, i, lo + lo_rot, half);
            st(x, i + h2, hi + hi_rot, half);
        }
}

/* The attention of one position `pos`, from its q [heads, dim], k and v [kv_heads, dim] (q and k modified):
 *   q and k rotated by cos, sin [dim] of the position (RoPE);
 *   k and v written into the caches [kv_heads, capacity, dim] at pos;
 *   out [heads, dim] = softmax(q k^T * scale) v over the keys first .. pos, per head, query head h reading
 *   key/value head h / (heads / kv_heads) (GQA); in fp32, the softmax less the row's maximum as torch's; the
 *   output rounded once to the layer's dtype.
 * Heads are split over `threads` OpenMP threads where the cache is long enough to pay for them (the cache comes
 * from memory, not from the caches the weights just went through: 2 threads took the attention of a 7B-shaped
 * layer at 32 positions from 100 to 60 us). Returns 0, or -1 where the workspace could not be had. */
int step_attention_one(void *q, void *k, const void *v, const void *cos, const void *sin, void *k_cache,
                       void *v_cache, int64_t heads, int64_t kv_heads, int64_t dim, int64_t capacity, int64_t pos,
                       int64_t first, float scale, void *out, int threads, int half) {
    int64_t n = pos - first + 1, group = heads / kv_heads;
    float *scores = malloc((size_t)(heads * n) * sizeof(float)), *qf = malloc((size_t)(heads * dim) * sizeof(float));
    float *acc = malloc((size_t)(heads * dim) * sizeof(float));
    if (!scores || !qf || !acc) {
        free(scores);
        free(qf);
        free(acc);
        return -1;
    }
    rope(q, heads, dim, cos, sin, half);
    rope(k, kv_heads, dim, cos, sin, half);
    for (int64_t i = 0; i < heads * dim; i++) qf[i] = ld(q, i, half);
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t i = 0; i < dim; i++) {
            st(k_cache, (h * capacity + pos) * dim + i, ld(k, h * dim + i, half), half);
            st(v_cache, (h * capacity + pos) * dim + i, ld(v, h * dim + i, half), half);
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (heads * n * dim > (1 << 14))
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = qf + h * dim;
        int64_t kv0 = (h / group) * capacity * dim;
        float *s = scores + h * n, mx = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            int64_t row = kv0 + (first + j) * dim;
            s[j] = (half ? dot_h(qh, (const uint16_t *)k_cache + row, dim) : dot(qh, (const float *)k_cache + row, dim))
                   * scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        for (int64_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            total += s[j];
        }
        float *o = acc + h * dim, inv = 1.0f / total;
        for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            int64_t row = kv0 + (first + j) * dim;
            __m256 p = _mm256_set1_ps(s[j] * inv);
            int64_t i = 0;
            for (; i + 8 <= dim; i += 8) {
                const uint16_t *vh = (const uint16_t *)v_cache + row + i;
                __m256 vj = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)vh))
                                 : _mm256_loadu_ps((const float *)v_cache + row + i);
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, vj, _mm256_loadu_ps(o + i)));
            }
            for (; i < dim; i++) o[i] += s[j] * inv * ld(v_cache, row + i, half);
        }
        for (int64_t i = 0; i < dim; i++) st(out, h * dim + i, o[i], half);
    }
    free(scores);
    free(qf);
    free(acc);
    return 0;
}
