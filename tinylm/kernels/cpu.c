/* CPU kernels: the elementwise and row-wise passes that NumPy runs as a dozen or more
 * separate array passes (the exact GELU, LayerNorm, AdamW), here as one loop each that
 * the compiler vectorises. Built once per machine by tinylm/kernels/native.py with the
 * system C compiler (-O3 -march=native), loaded with ctypes; every function has a
 * NumPy reference in tinylm (the path used without a compiler) that is its test oracle.
 *
 * Threads: each function takes ``threads``; above one, OpenMP splits the rows (or
 * elements) statically, so the result does not depend on the thread count (every
 * element is computed by the same instructions whichever thread runs it).
 *
 * float32 throughout, contiguous arrays, int64 sizes. No function allocates.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define RESTRICT __restrict__

/* exp(z) for z <= 0 (z >= -87.3: the normal range of float32; callers clamp): 2^k e^r
 * with k = round(z / ln 2), r = z - k ln 2 in [-ln2/2, ln2/2] (ln 2 in two parts, so r
 * is exact to float32), e^r by its Taylor polynomial of degree 7 (truncation 6e-9
 * relative), 2^k put into the exponent bits. Within 2 float32 ulps of exp; branch-free,
 * so loops over it vectorise. */
static inline float exp_nonpositive(float z)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float kf = (z * log2e + shifter) - shifter;
    float r = fmaf(-kf, ln2_hi, z);
    r = fmaf(-kf, ln2_lo, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t bits = ((int32_t)kf + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* ------------------------------------------------------------------------ the exact GELU
 * Phi(x) = 1/2 + x A(x^2) / B(x^2) with x clipped to [-clip, clip] (NaN passes): A, B the
 * degree-5 polynomials of tinylm.backend's erf rational rescaled to x (coefficients
 * handed in, constant first, so both paths share one fit). y = x Phi(x); with slope,
 * g = Phi(x) + x phi(x) (the derivative: what the backward multiplies by), else Phi.
 * Without slope only y is written (g may be NULL).
 * x phi(x) is 0 where |x| > 13 (phi < 1e-37; also at +-inf, where x phi would be NaN). */

/* sum_k c[k] s^k for k = 0..5, by Horner's rule */
static inline float horner5(const float *c, float s)
{
    float p = c[5];
    for (int i = 4; i >= 0; i--)
        p = fmaf(p, s, c[i]);
    return p;
}

static inline float gelu_phi(float x, const float *a, const float *b, float clip)
{
    float t = x > clip ? clip : (x < -clip ? -clip : x);
    float s = t * t;
    float phi = 0.5f + t * horner5(a, s) / horner5(b, s);
    phi = phi > 1.0f ? 1.0f : phi; /* rounding may pass 1 (or 0) by an ulp */
    return phi < 0.0f ? 0.0f : phi;
}

static void gelu_range(const float *RESTRICT x, float *RESTRICT y, float *RESTRICT g,
                       int64_t lo, int64_t hi, int slope, const float *coef)
{
    float a[6], b[6];
    for (int i = 0; i < 6; i++) {
        a[i] = coef[i];
        b[i] = coef[6 + i];
    }
    const float clip = coef[12], inv_sqrt_2pi = coef[13];
    if (slope) {
        for (int64_t i = lo; i < hi; i++) {
            float v = x[i];
            float phi = gelu_phi(v, a, b, clip);
            float z = -0.5f * v * v;
            z = z < -87.0f ? -87.0f : z;
            float d = v * inv_sqrt_2pi * exp_nonpositive(z);
            d = fabsf(v) < 13.0f ? d : 0.0f;
            y[i] = v * phi;
            g[i] = phi + d;
        }
    } else {
        for (int64_t i = lo; i < hi; i++) {
            float v = x[i];
            float phi = gelu_phi(v, a, b, clip);
            y[i] = v * phi;
        }
    }
}

/* Run ``body`` on [lo, hi) parts of [0, n): one part per thread, contiguous, whole
 * multiples of ``grain`` (so vector loops and cache lines are not split between threads);
 * without OpenMP, or with threads <= 1, the whole range on this thread. */
#ifdef _OPENMP
#define PARTS(n, grain, threads, body)                                                  \
    do {                                                                                \
        int64_t n_ = (n), g_ = (grain);                                                 \
        if ((threads) <= 1 || n_ <= g_) {                                               \
            int64_t lo = 0, hi = n_;                                                    \
            body;                                                                       \
        } else {                                                                        \
            _Pragma("omp parallel num_threads(threads)")                                \
            {                                                                           \
                int64_t t_ = omp_get_thread_num(), nt_ = omp_get_num_threads();         \
                int64_t units_ = (n_ + g_ - 1) / g_;                                    \
                int64_t lo = units_ * t_ / nt_ * g_, hi = units_ * (t_ + 1) / nt_ * g_; \
                if (hi > n_) hi = n_;                                                   \
                if (lo < hi) { body; }                                                  \
            }                                                                           \
        }                                                                               \
    } while (0)
#else
#define PARTS(n, grain, threads, body)                                                  \
    do {                                                                                \
        int64_t lo = 0, hi = (n);                                                       \
        (void)(threads);                                                                \
        body;                                                                           \
    } while (0)
#endif

void tl_gelu_forward(const float *RESTRICT x, float *RESTRICT y, float *RESTRICT g,
                     int64_t n, int slope, const float *coef, int threads)
{
    PARTS(n, 64, threads, gelu_range(x, y, g, lo, hi, slope, coef));
}

/* ------------------------------------------------------------------------ LayerNorm
 * Rows of d elements: mean, var = mean((x - mean)^2) (two passes over the row, as the
 * NumPy path), rstd = 1 / sqrt(var + eps), y = (x - mean) rstd w + b (w, b may be NULL).
 * The backward recomputes xhat = (x - mean) rstd from x and the row statistics:
 *   gxhat = g w;  gx = rstd (gxhat - mean(gxhat) - xhat mean(gxhat xhat))
 * and the parameter gradients gw = sum_rows g xhat, gb = sum_rows g, summed in double
 * per column, over the rows in order (threads split the columns there): the same sums
 * at any thread count. */

static void norm_forward_rows(const float *RESTRICT x, const float *RESTRICT w,
                              const float *RESTRICT b, float *RESTRICT y,
                              float *RESTRICT mean, float *RESTRICT rstd, int64_t lo,
                              int64_t hi, int64_t d, float eps, int center)
{
    const float inv_d = 1.0f / (float)d;
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float mu = 0.0f;
        if (center) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < d; j++)
                s += xr[j];
            mu = s * inv_d;
        }
        float q = 0.0f;
#pragma omp simd reduction(+ : q)
        for (int64_t j = 0; j < d; j++) {
            float c = xr[j] - mu;
            q += c * c;
        }
        float rs = 1.0f / sqrtf(q * inv_d + eps);
        mean[r] = mu;
        rstd[r] = rs;
        if (w && b) {
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                yr[j] = (xr[j] - mu) * rs * w[j] + b[j];
        } else if (w) {
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                yr[j] = (xr[j] - mu) * rs * w[j];
        } else if (b) {
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                yr[j] = (xr[j] - mu) * rs + b[j];
        } else {
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                yr[j] = (xr[j] - mu) * rs;
        }
    }
}

void tl_norm_forward(const float *x, const float *w, const float *b, float *y, float *mean,
                     float *rstd, int64_t rows, int64_t d, float eps, int center, int threads)
{
    PARTS(rows, 1, threads, norm_forward_rows(x, w, b, y, mean, rstd, lo, hi, d, eps, center));
}

static void norm_backward_rows(const float *RESTRICT x, const float *RESTRICT w,
                               const float *RESTRICT g, const float *RESTRICT mean,
                               const float *RESTRICT rstd, float *RESTRICT gx, int64_t lo,
                               int64_t hi, int64_t d, int center)
{
    const float inv_d = 1.0f / (float)d;
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = x + r * d, *gr = g + r * d;
        float *gxr = gx + r * d;
        const float mu = mean[r], rs = rstd[r];
        float m1 = 0.0f, m2 = 0.0f;
#pragma omp simd reduction(+ : m1, m2)
        for (int64_t j = 0; j < d; j++) {
            float gh = w ? gr[j] * w[j] : gr[j];
            m1 += gh;
            m2 += gh * ((xr[j] - mu) * rs);
        }
        m1 = center ? m1 * inv_d : 0.0f;
        m2 *= inv_d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            float gh = w ? gr[j] * w[j] : gr[j];
            gxr[j] = rs * (gh - m1 - (xr[j] - mu) * rs * m2);
        }
    }
}

#define COLUMN_BLOCK 256

static void norm_param_grads_columns(const float *RESTRICT x, const float *RESTRICT g,
                                     const float *RESTRICT mean, const float *RESTRICT rstd,
                                     float *RESTRICT gw, float *RESTRICT gb, int64_t c0,
                                     int64_t c1, int64_t rows, int64_t d)
{
    double sw[COLUMN_BLOCK], sb[COLUMN_BLOCK];
    for (int64_t start = c0; start < c1; start += COLUMN_BLOCK) {
        int64_t m = c1 - start < COLUMN_BLOCK ? c1 - start : COLUMN_BLOCK;
        for (int64_t j = 0; j < m; j++)
            sw[j] = sb[j] = 0.0;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * d + start, *gr = g + r * d + start;
            const float mu = mean[r], rs = rstd[r];
#pragma omp simd
            for (int64_t j = 0; j < m; j++) {
                sw[j] += (double)(gr[j] * ((xr[j] - mu) * rs));
                sb[j] += (double)gr[j];
            }
        }
        for (int64_t j = 0; j < m; j++) {
            if (gw)
                gw[start + j] = (float)sw[j];
            if (gb)
                gb[start + j] = (float)sb[j];
        }
    }
}

/* gx (rows, d) always; gw, gb (d,) when not NULL. */
void tl_norm_backward(const float *x, const float *w, const float *g, const float *mean,
                      const float *rstd, float *gx, float *gw, float *gb, int64_t rows,
                      int64_t d, int center, int threads)
{
    PARTS(rows, 1, threads, norm_backward_rows(x, w, g, mean, rstd, gx, lo, hi, d, center));
    if (gw || gb)
        PARTS(d, 16, threads, norm_param_grads_columns(x, g, mean, rstd, gw, gb, lo, hi, rows, d));
}

/* ------------------------------------------------------------------------ AdamW
 * torch.optim.AdamW's update, in place, element by element (amsgrad: vmax not NULL):
 *   p *= 1 - lr wd;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;  (vmax = max(vmax, v))
 *   p -= step_size m / (sqrt(v) / sqrt_bc2 + eps)
 * with decay = 1 - lr wd, c1 = 1 - b1, c2 = 1 - b2, step_size = lr / (1 - b1^t) and
 * sqrt_bc2 = sqrt(1 - b2^t) from the caller (computed in double there, as optim.AdamW). */

static void adamw_range(float *RESTRICT p, const float *RESTRICT g, float *RESTRICT m,
                        float *RESTRICT v, float *RESTRICT vmax, int64_t lo, int64_t hi,
                        float decay, float c1, float b2, float c2, float eps,
                        float step_size, float sqrt_bc2)
{
    if (vmax) {
        for (int64_t i = lo; i < hi; i++) {
            float gi = g[i];
            float mi = m[i] + c1 * (gi - m[i]);
            float vi = b2 * v[i] + c2 * (gi * gi);
            float vm = vmax[i] > vi ? vmax[i] : vi;
            m[i] = mi;
            v[i] = vi;
            vmax[i] = vm;
            p[i] = p[i] * decay - step_size * (mi / (sqrtf(vm) / sqrt_bc2 + eps));
        }
    } else {
#pragma omp simd
        for (int64_t i = lo; i < hi; i++) {
            float gi = g[i];
            float mi = m[i] + c1 * (gi - m[i]);
            float vi = b2 * v[i] + c2 * (gi * gi);
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * decay - step_size * (mi / (sqrtf(vi) / sqrt_bc2 + eps));
        }
    }
}

void tl_adamw(float *p, const float *g, float *m, float *v, float *vmax, int64_t n,
              float decay, float c1, float b2, float c2, float eps, float step_size,
              float sqrt_bc2, int threads)
{
    PARTS(n, 1024, threads, adamw_range(p, g, m, v, vmax, lo, hi, decay, c1, b2, c2, eps,
                                        step_size, sqrt_bc2));
}

/* ------------------------------------------------------------------------ softmax
 * out = softmax(x * scale + bias[r % bias_rows]) over rows of n (bias (bias_rows, n) or
 * NULL; in place when out == x). exp(z - max) by exp_nonpositive; an entry at -inf (or
 * more than 87 below its row's max) gets 0, a row that is -inf throughout gets 0
 * everywhere (attention's empty-row rule), a row holding a NaN is NaN throughout (as
 * the NumPy softmax: its max, then its sum, is NaN). */

static void softmax_rows(const float *x, float *out, const float *bias, int64_t lo, int64_t hi,
                         int64_t n, int64_t bias_rows, float scale)
{
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = x + r * n;
        const float *br = bias ? bias + (r % bias_rows) * n : 0;
        float *o = out + r * n;
        float m = -INFINITY;
        int nan = 0;
        if (br) {
#pragma omp simd reduction(max : m) reduction(| : nan)
            for (int64_t j = 0; j < n; j++) {
                float z = xr[j] * scale + br[j];
                o[j] = z;
                m = z > m ? z : m;
                nan |= z != z;
            }
        } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
            for (int64_t j = 0; j < n; j++) {
                float z = xr[j] * scale;
                o[j] = z;
                m = z > m ? z : m;
                nan |= z != z;
            }
        }
        if (nan) { /* NaN anywhere in the row: NaN throughout, as exp(x - max) / sum */
            for (int64_t j = 0; j < n; j++)
                o[j] = NAN;
            continue;
        }
        if (m == -INFINITY) {
            for (int64_t j = 0; j < n; j++)
                o[j] = 0.0f;
            continue;
        }
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; j++) {
            float z = o[j] - m;
            float e = exp_nonpositive(z < -87.0f ? -87.0f : z);
            e = z < -87.0f ? 0.0f : e;
            e = z != z ? z : e; /* NaN */
            o[j] = e;
            s += e;
        }
        float inv = 1.0f / s;
#pragma omp simd
        for (int64_t j = 0; j < n; j++)
            o[j] *= inv;
    }
}

void tl_softmax(const float *x, float *out, const float *bias, int64_t rows, int64_t n,
                int64_t bias_rows, float scale, int threads)
{
    PARTS(rows, 1, threads, softmax_rows(x, out, bias, lo, hi, n, bias_rows, scale));
}

/* Attention's score gradient, in place on dp (rows, n): ds = (dp - delta[r]) p scale. */
static void softmax_backward_rows(float *RESTRICT dp, const float *RESTRICT p,
                                  const float *RESTRICT delta, int64_t lo, int64_t hi,
                                  int64_t n, float scale)
{
    for (int64_t r = lo; r < hi; r++) {
        float *d = dp + r * n;
        const float *pr = p + r * n;
        const float dr = delta[r];
#pragma omp simd
        for (int64_t j = 0; j < n; j++)
            d[j] = (d[j] - dr) * pr[j] * scale;
    }
}

void tl_softmax_backward(float *dp, const float *p, const float *delta, int64_t rows,
                         int64_t n, float scale, int threads)
{
    PARTS(rows, 1, threads, softmax_backward_rows(dp, p, delta, lo, hi, n, scale));
}

/* ------------------------------------------------------------------------ matrix products
 * The BLAS library's single-threaded sgemm (NumPy's OpenBLAS, its ILP64 cblas_sgemm:
 * a pointer handed in), called from this file's OpenMP threads: with several threads
 * tinylm's ops run every product and every kernel above on one pool of threads (the
 * BLAS library held at one thread), instead of two pools taking the cores from each
 * other. Row-major; C = op(A) op(B), op = transpose when trans*. Each thread computes
 * whole rows of C (or whole matrices of a batch) by the same sgemm call it would make
 * alone, so the values do not depend on the thread count. */

typedef void (*sgemm64_t)(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k,
                          float alpha, const float *a, int64_t lda, const float *b,
                          int64_t ldb, float beta, float *c, int64_t ldc);

#define ROW_MAJOR 101
#define NO_TRANS 111
#define TRANS 112

static void gemm_rows(sgemm64_t sgemm, int transa, int transb, int64_t lo, int64_t hi,
                      int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                      int64_t ldb, float *c, int64_t ldc)
{
    const float *ap = transa ? a + lo : a + lo * lda; /* rows lo.. of op(A) */
    sgemm(ROW_MAJOR, transa ? TRANS : NO_TRANS, transb ? TRANS : NO_TRANS, hi - lo, n, k,
          1.0f, ap, lda, b, ldb, 0.0f, c + lo * ldc, ldc);
}

static void gemm_columns(sgemm64_t sgemm, int transa, int transb, int64_t m, int64_t lo,
                         int64_t hi, int64_t k, const float *a, int64_t lda, const float *b,
                         int64_t ldb, float *c, int64_t ldc)
{
    const float *bp = transb ? b + lo * ldb : b + lo; /* columns lo.. of op(B) */
    sgemm(ROW_MAJOR, transa ? TRANS : NO_TRANS, transb ? TRANS : NO_TRANS, m, hi - lo, k,
          1.0f, a, lda, bp, ldb, 0.0f, c + lo, ldc);
}

static void gemm_items(sgemm64_t sgemm, int transa, int transb, int64_t lo, int64_t hi,
                       int64_t nb2, int64_t m, int64_t n, int64_t k, const float *a,
                       int64_t sa1, int64_t sa2, int64_t lda, const float *b, int64_t sb1,
                       int64_t sb2, int64_t ldb, float *c, int64_t sc1, int64_t sc2,
                       int64_t ldc)
{
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / nb2, j = it % nb2;
        gemm_rows(sgemm, transa, transb, 0, m, n, k, a + i * sa1 + j * sa2, lda,
                  b + i * sb1 + j * sb2, ldb, c + i * sc1 + j * sc2, ldc);
    }
}

/* One product of tl_gemm: a batch of nb1 x nb2 products whose operand X of item (i, j)
 * starts at x + i * sx1 + j * sx2 (elements); a, b, c are addresses. All int64, so
 * Python hands a list of them over as one int64 array. */
typedef struct {
    int64_t transa, transb, nb1, nb2, m, n, k;
    int64_t a, sa1, sa2, lda, b, sb1, sb2, ldb, c, sc1, sc2, ldc;
} gemm_args;

/* Part t of nt of [0, n) in whole multiples of grain (PARTS's split). */
static void share(int64_t n, int64_t grain, int64_t t, int64_t nt, int64_t *lo, int64_t *hi)
{
    int64_t units = (n + grain - 1) / grain;
    *lo = units * t / nt * grain;
    *hi = units * (t + 1) / nt * grain;
    if (*hi > n)
        *hi = n;
}

/* Thread t's part of one product run by nt threads. One item: its rows split (whole
 * multiples of 16), or its columns when it has few rows (a decode step's); more: the
 * items split. */
static void gemm_part(sgemm64_t sgemm, const gemm_args *p, int64_t t, int64_t nt)
{
    const float *a = (const float *)(intptr_t)p->a, *b = (const float *)(intptr_t)p->b;
    float *c = (float *)(intptr_t)p->c;
    int ta = (int)p->transa, tb = (int)p->transb;
    int64_t items = p->nb1 * p->nb2, lo, hi;
    if (p->m <= 0 || p->n <= 0 || items <= 0)
        return;
    if (items == 1 && p->m < 32 * nt && p->n >= 32 * nt) {
        share(p->n, 16, t, nt, &lo, &hi);
        if (lo < hi)
            gemm_columns(sgemm, ta, tb, p->m, lo, hi, p->k, a, p->lda, b, p->ldb, c, p->ldc);
    } else if (items == 1) {
        share(p->m, 16, t, nt, &lo, &hi);
        if (lo < hi)
            gemm_rows(sgemm, ta, tb, lo, hi, p->n, p->k, a, p->lda, b, p->ldb, c, p->ldc);
    } else {
        share(items, 1, t, nt, &lo, &hi);
        if (lo < hi)
            gemm_items(sgemm, ta, tb, lo, hi, p->nb2, p->m, p->n, p->k, a, p->sa1, p->sa2,
                       p->lda, b, p->sb1, p->sb2, p->ldb, c, p->sc1, p->sc2, p->ldc);
    }
}

#ifdef _OPENMP
static double gemm_work(const gemm_args *p)
{
    return (double)p->nb1 * p->nb2 * p->m * p->n * (p->k > 0 ? p->k : 1);
}
#endif

/* ``count`` independent products (their outputs distinct) on ``threads`` threads, in
 * one parallel region: with as many threads as products or more, each product gets a
 * team of threads in proportion to its work (at least one), so two products of one
 * backward (a linear layer's input and weight gradients) run side by side, each on
 * whole rows, instead of one after the other split in halves; with fewer threads, the
 * products one after another on all of them. */
void tl_gemm(void *fn, int64_t count, const gemm_args *args, int threads)
{
    sgemm64_t sgemm = (sgemm64_t)fn;
#ifdef _OPENMP
    if (threads > 1 && count >= 1 && count <= threads && count <= 64) {
        int64_t team[64], first[65]; /* thread counts, and each team's first thread */
        double total = 0.0, work[64];
        for (int64_t i = 0; i < count; i++)
            total += work[i] = gemm_work(&args[i]);
        int64_t given = 0;
        for (int64_t i = 0; i < count; i++) {
            int64_t left = count - 1 - i; /* later products keep one thread each */
            int64_t want = total > 0 ? (int64_t)(threads * work[i] / total + 0.5) : 1;
            if (want < 1)
                want = 1;
            if (want > threads - given - left)
                want = threads - given - left;
            team[i] = i == count - 1 ? threads - given : want;
            given += team[i];
        }
        /* teams only when they share the work out evenly (two equal products on an odd
         * number of threads would leave one team a thread short: then each product on
         * all of them, in turn) */
        double slowest = 0.0;
        for (int64_t i = 0; i < count; i++)
            if (work[i] / team[i] > slowest)
                slowest = work[i] / team[i];
        if (slowest > 1.1 * total / threads)
            goto in_turn;
        first[0] = 0;
        for (int64_t i = 0; i < count; i++)
            first[i + 1] = first[i] + team[i];
#pragma omp parallel num_threads(threads)
        {
            int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            if (nt == threads) {
                int64_t i = 0;
                while (t >= first[i + 1])
                    i++;
                gemm_part(sgemm, &args[i], t - first[i], team[i]);
            } else { /* (the runtime gave fewer threads: each product on all of them) */
                for (int64_t i = 0; i < count; i++) {
                    gemm_part(sgemm, &args[i], t, nt);
#pragma omp barrier
                }
            }
        }
        return;
    }
in_turn:
    if (threads > 1) {
        for (int64_t i = 0; i < count; i++) {
#pragma omp parallel num_threads(threads)
            gemm_part(sgemm, &args[i], omp_get_thread_num(), omp_get_num_threads());
        }
        return;
    }
#endif
    (void)threads;
    for (int64_t i = 0; i < count; i++)
        gemm_part(sgemm, &args[i], 0, 1);
}

/* 1 when this build has OpenMP (its threads can run the products), else 0. */
int tl_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
