// Fused kernels for the training step of tinylm: row norms (LayerNorm, RMSNorm),
// softmax cross-entropy and the AdamW update, each one launch (or three for a norm's
// backward) where the composed CuPy path launches ten or more.
//
// Layouts (contiguous, row-major, float32; accumulation in float32):
//   x, y, dy, dx        (rows, D)          w, b, dw, db   (D)
//   mean, rstd          (rows)             per row, saved by the forward
//   logits, dlogits     (rows, V)          targets (rows) int64, loss and lse (rows)
//   p, g, m, v, vmax    (n)                AdamW: updated in place
//
// Kernels (FZ_THREADS threads per block, one row per block unless stated):
//   fz_norm_fwd         grid (rows)             y, mean, rstd
//   fz_norm_bwd_dx      grid (rows)             dx
//   fz_norm_bwd_params  grid (ceil(D/T), P)     partial column sums of dy * xhat and dy
//                                               over rows p, p + P, ... (P from the launcher)
//   fz_colsum           grid (ceil(D/T))        dw, db: the P partials summed in order
//   fz_ce_fwd           grid (rows)             loss per row (0 if ignored), lse
//   fz_ce_bwd           grid (rows)             dlogits = (softmax - target dist) * scale
//   fz_adamw            grid (any; strided)     p, m, v (and vmax for amsgrad)
// "center" selects LayerNorm (x - mean) over RMSNorm (mean taken as 0): the two norms
// differ in nothing else (RMSNorm's rstd = 1 / sqrt(mean(x^2) + eps)).
//
// No atomics: every output element is written by one thread, every sum runs in a
// fixed order (warp butterflies, then the warps' partials in warp order, then the
// column partials in P order), so results are bitwise reproducible for a given shape.
//
// NVRTC (CuPy) compiles this file: no #include. With FZ_HOST_EMULATION,
// tests/fused_emu.cpp compiles it for the CPU (threads as fibers; __syncthreads and
// __shfl_xor_sync emulated) to test indexing and barriers without a GPU.

#ifndef FZ_THREADS
#define FZ_THREADS 256
#endif
#define FZ_WARPS (FZ_THREADS / 32)
#define FZ_FULL_MASK 0xffffffffu
#define FZ_NEG_INF __int_as_float(-8388608)  // 0xff800000

// Dynamic shared memory: 3 * FZ_WARPS floats (the launcher's SMEM_BYTES).
extern __shared__ __align__(16) float fz_smem[];

// ===================================================================== reductions

__device__ __forceinline__ float fz_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FZ_FULL_MASK, x, o);
    return x;
}

// The block's sum of x, returned to every thread. red: FZ_WARPS floats of shared
// memory, free again when this returns (the second barrier), so calls may follow.
__device__ float fz_block_sum(float x, float* red) {
    x = fz_warp_sum(x);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    float s = red[0];
    for (int w = 1; w < FZ_WARPS; ++w) s += red[w];
    __syncthreads();
    return s;
}

// (m, s) <- the pair for the union of two sets, where s = sum exp(x - m), m = max x.
__device__ __forceinline__ void fz_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == FZ_NEG_INF) {  // both empty (or all -inf): s is 0, or NaN from a NaN
        s = s + s2;
        return;
    }
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// ===================================================================== norms

extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
            const float* __restrict__ b, float* __restrict__ y, float* __restrict__ mean_out,
            float* __restrict__ rstd_out, int D, float eps, int center, int has_w, int has_b) {
    float* red = fz_smem;
    const long long row = blockIdx.x;
    const float* xr = x + row * D;
    float* yr = y + row * D;
    const float inv_d = 1.f / (float)D;
    float mean = 0.f;
    if (center) {
        float s = 0.f;
        for (int j = threadIdx.x; j < D; j += FZ_THREADS) s += xr[j];
        mean = fz_block_sum(s, red) * inv_d;
    }
    float q = 0.f;
    for (int j = threadIdx.x; j < D; j += FZ_THREADS) {
        const float d = xr[j] - mean;
        q += d * d;
    }
    const float rstd = 1.f / sqrtf(fz_block_sum(q, red) * inv_d + eps);
    for (int j = threadIdx.x; j < D; j += FZ_THREADS) {
        float v = (xr[j] - mean) * rstd;
        if (has_w) v *= w[j];
        if (has_b) v += b[j];
        yr[j] = v;
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (dy without weight);
// RMSNorm (center = 0) drops the mean(g) term.
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_norm_bwd_dx(const float* __restrict__ dy, const float* __restrict__ x,
               const float* __restrict__ w, const float* __restrict__ mean,
               const float* __restrict__ rstd, float* __restrict__ dx, int D, int center,
               int has_w) {
    float* red = fz_smem;
    const long long row = blockIdx.x;
    const float* xr = x + row * D;
    const float* gr = dy + row * D;
    float* dxr = dx + row * D;
    const float mu = mean[row], rs = rstd[row], inv_d = 1.f / (float)D;
    float sg = 0.f, sgx = 0.f;
    for (int j = threadIdx.x; j < D; j += FZ_THREADS) {
        const float xhat = (xr[j] - mu) * rs;
        const float g = has_w ? gr[j] * w[j] : gr[j];
        sg += g;
        sgx += g * xhat;
    }
    const float m1 = center ? fz_block_sum(sg, red) * inv_d : 0.f;
    const float m2 = fz_block_sum(sgx, red) * inv_d;
    for (int j = threadIdx.x; j < D; j += FZ_THREADS) {
        const float xhat = (xr[j] - mu) * rs;
        const float g = has_w ? gr[j] * w[j] : gr[j];
        dxr[j] = rs * (g - m1 - xhat * m2);
    }
}

// Thread c of block (cx, p) sums column c = cx * T + c over rows p, p + P, ...:
// pw[p, c] = sum dy * xhat, pb[p, c] = sum dy. No shared memory, no barrier.
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_norm_bwd_params(const float* __restrict__ dy, const float* __restrict__ x,
                   const float* __restrict__ mean, const float* __restrict__ rstd,
                   float* __restrict__ pw, float* __restrict__ pb, int rows, int D,
                   int want_w, int want_b) {
    const int c = blockIdx.x * FZ_THREADS + threadIdx.x;
    const int p = blockIdx.y, P = gridDim.y;
    if (c >= D) return;
    float sw = 0.f, sb = 0.f;
    for (long long r = p; r < rows; r += P) {
        const float g = dy[r * D + c];
        sb += g;
        if (want_w) sw += g * ((x[r * D + c] - mean[r]) * rstd[r]);
    }
    const long long at = (long long)p * D + c;
    if (want_w) pw[at] = sw;
    if (want_b) pb[at] = sb;
}

// dw[c] = sum over p of pw[p, c] in order p = 0, 1, ...; db likewise.
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_colsum(const float* __restrict__ pw, const float* __restrict__ pb, float* __restrict__ dw,
          float* __restrict__ db, int P, int D, int want_w, int want_b) {
    const int c = blockIdx.x * FZ_THREADS + threadIdx.x;
    if (c >= D) return;
    float sw = 0.f, sb = 0.f;
    for (int p = 0; p < P; ++p) {
        const long long at = (long long)p * D + c;
        if (want_w) sw += pw[at];
        if (want_b) sb += pb[at];
    }
    if (want_w) dw[c] = sw;
    if (want_b) db[c] = sb;
}

// ===================================================================== cross-entropy

// lse = log sum exp(x) in one pass over the row (online: each thread keeps its running
// max and rescaled sum), loss = lse - x[t], with label smoothing eps
// loss = (1 - eps) (lse - x[t]) - eps / V * sum_j (x[j] - lse). Ignored rows: loss 0.
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_ce_fwd(const float* __restrict__ logits, const long long* __restrict__ targets,
          float* __restrict__ loss, float* __restrict__ lse_out, int V, long long ignore_index,
          float one_minus_eps, float eps_over_v, int smoothing) {
    float* red = fz_smem;  // [3][FZ_WARPS]: max, sum, sum of x
    const long long row = blockIdx.x;
    const float* xr = logits + row * V;
    float m = FZ_NEG_INF, s = 0.f, sx = 0.f;
    for (int j = threadIdx.x; j < V; j += FZ_THREADS) {
        const float v = xr[j];
        if (v > m) {
            s = s * expf(m - v) + 1.f;
            m = v;
        } else if (v != FZ_NEG_INF) {  // a NaN lands here too, and poisons s
            s += expf(v - m);
        }
        sx += v;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FZ_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(FZ_FULL_MASK, s, o);
        sx += __shfl_xor_sync(FZ_FULL_MASK, sx, o);
        fz_merge(m, s, m2, s2);
    }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        red[warp] = m;
        red[FZ_WARPS + warp] = s;
        red[2 * FZ_WARPS + warp] = sx;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;  // no barrier below
    m = red[0];
    s = red[FZ_WARPS];
    sx = red[2 * FZ_WARPS];
    for (int w = 1; w < FZ_WARPS; ++w) {
        fz_merge(m, s, red[w], red[FZ_WARPS + w]);
        sx += red[2 * FZ_WARPS + w];
    }
    const float lse = m + logf(s);
    const long long t = targets[row];
    float l = 0.f;
    if (t != ignore_index && t >= 0 && t < V) {  // the launcher rejects other targets
        l = (m - xr[t]) + logf(s);  // not lse - x[t]: no rounding at the scale of |m|
        if (smoothing) l = one_minus_eps * l - eps_over_v * (sx - (float)V * lse);
    }
    loss[row] = l;
    lse_out[row] = lse;
}

// dlogits[j] = (exp(x[j] - lse) - (1 - eps) [j == t] - eps / V) * scale, where
// scale = grad[row * grad_stride] (/ count[0] if use_count) * (row not ignored),
// in the order the composed path computes it (so 0 * inf gives NaN there and here).
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_ce_bwd(const float* __restrict__ logits, const long long* __restrict__ targets,
          const float* __restrict__ lse, const float* __restrict__ grad,
          const float* __restrict__ count, float* __restrict__ dlogits, int V,
          long long ignore_index, float one_minus_eps, float eps_over_v, int smoothing,
          int grad_stride, int use_count) {
    const long long row = blockIdx.x;
    const float* xr = logits + row * V;
    float* dr = dlogits + row * V;
    const long long t = targets[row];
    float scale = grad[row * grad_stride];
    if (use_count) scale = scale / count[0];
    scale *= (t != ignore_index) ? 1.f : 0.f;
    const float l = lse[row];
    for (int j = threadIdx.x; j < V; j += FZ_THREADS) {
        float g = expf(xr[j] - l);
        if (j == t) g -= one_minus_eps;
        if (smoothing) g -= eps_over_v;
        dr[j] = g * scale;
    }
}

// ===================================================================== AdamW

// torch.optim.AdamW's step, elementwise (tinylm/optim.py spells out the formula):
//   p *= 1 - lr wd;  m += (1 - b1) (g - m);  v = b2 v + (1 - b2) g^2;  (vmax = max(vmax, v))
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t), computed by the launcher.
extern "C" __global__ void __launch_bounds__(FZ_THREADS)
fz_adamw(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
         float* __restrict__ v, float* __restrict__ vmax, long long n, float decay,
         float one_minus_b1, float b2, float one_minus_b2, float step_size, float bc2_sqrt,
         float eps, int use_decay, int amsgrad) {
    const long long stride = (long long)gridDim.x * FZ_THREADS;
    for (long long i = (long long)blockIdx.x * FZ_THREADS + threadIdx.x; i < n; i += stride) {
        const float gi = g[i];
        float pi = p[i];
        if (use_decay) pi *= decay;
        float mi = m[i];
        mi += one_minus_b1 * (gi - mi);
        float vi = v[i] * b2 + one_minus_b2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        if (amsgrad) {
            vi = fmaxf(vmax[i], vi);
            vmax[i] = vi;
        }
        pi -= (mi / (sqrtf(vi) / bc2_sqrt + eps)) * step_size;
        p[i] = pi;
    }
}
