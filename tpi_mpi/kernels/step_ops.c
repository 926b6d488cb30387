/* The small per-layer operations of a decoding step in float32: RMSNorm, RoPE, and attention of one position.
 *
 * Why hand-written: at one position these are a few microseconds of arithmetic each, but as torch ops they are a
 * dozen dispatches, temporaries and views each, and between the weight products they ran 3-5x slower than alone
 * (RMSNorm 60 us, RoPE 85, SDPA 146 per layer in a 7B-shaped int4 step of 23 ms: 1.7 ms of it with the other glue;
 * 3 December 2026). models/llama.py calls these for float32 layers at one position per sequence and keeps torch's
 * ops for the rest (prefill, fp16/bf16 layers, model.kernel=torch, where the library cannot be built).
 *
 * The arithmetic is that of the torch code they replace (models/llama.py, decoder_config.apply_rope), rounded the
 * same way where the order is the same (RoPE: each product rounded, then the sum; -std=c11 does not contract
 * them into FMAs); the sums of RMSNorm and attention run in another order, so they agree to float32 rounding, not
 * bit for bit (tests/test_step_ops.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)) for each of the m rows of k values (HF's LlamaRMSNorm in float32:
 * the normalised row rounded, then times the weight). out may be x. */
void step_rms_norm(const float *x, const float *w, int64_t m, int64_t k, float eps, float *out) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float inv = 1.0f / sqrtf(dot(xr, xr, k) / (float)k + eps);
        float *o = out + r * k;
        for (int64_t i = 0; i < k; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* Rotates heads x [heads, dim] in place by cos, sin [dim] of its position, as HF's rotate-half RoPE:
 * x' = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]). */
static void rope(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            float lo = a * cos[i], lo_rot = -b * sin[i];
            float hi = b * cos[i + half], hi_rot = a * sin[i + half];
            v[i] = lo + lo_rot;
            v[i + half] = hi + hi_rot;
        }
    }
}

/* The attention of one position `pos`, from its q [heads, dim], k and v [kv_heads, dim] (all modified):
 *   q and k rotated by cos, sin [dim] of the position (RoPE);
 *   k and v written into the caches [kv_heads, capacity, dim] at pos;
 *   out [heads, dim] = softmax(q k^T * scale) v over the keys first .. pos, per head, query head h reading
 *   key/value head h / (heads / kv_heads) (GQA); the softmax subtracts the row's maximum, as torch's does.
 * Heads are split over `threads` OpenMP threads where the cache is long enough to pay for them. Returns 0, or -1
 * where the scores' workspace could not be had. */
int step_attention_one(float *q, float *k, const float *v, const float *cos, const float *sin, float *k_cache,
                       float *v_cache, int64_t heads, int64_t kv_heads, int64_t dim, int64_t capacity, int64_t pos,
                       int64_t first, float scale, float *out, int threads) {
    int64_t n = pos - first + 1, group = heads / kv_heads;
    float *scores = malloc((size_t)(heads * n) * sizeof(float));
    if (!scores) return -1;
    rope(q, heads, dim, cos, sin);
    rope(k, kv_heads, dim, cos, sin);
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t i = 0; i < dim; i++) {
            k_cache[(h * capacity + pos) * dim + i] = k[h * dim + i];
            v_cache[(h * capacity + pos) * dim + i] = v[h * dim + i];
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (heads * n * dim > (1 << 14))
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * dim;
        const float *kh = k_cache + (h / group) * capacity * dim, *vh = v_cache + (h / group) * capacity * dim;
        float *s = scores + h * n, mx = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            s[j] = dot(qh, kh + (first + j) * dim, dim) * scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        for (int64_t j = 0; j < n; j++) {
            s[j] = expf(s[j] - mx);
            total += s[j];
        }
        float *o = out + h * dim, inv = 1.0f / total;
        for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float *vj = vh + (first + j) * dim;
            __m256 p = _mm256_set1_ps(s[j] * inv);
            int64_t i = 0;
            for (; i + 8 <= dim; i += 8)
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
            for (; i < dim; i++) o[i] += s[j] * inv * vj[i];
        }
    }
    free(scores);
    return 0;
}
