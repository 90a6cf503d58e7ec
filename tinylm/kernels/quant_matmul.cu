// Dequantize-and-multiply kernels for tinylm's packed weights (tinylm/quant/kernels.py's
// layouts): y = x @ W.T and dx = dy @ W with W (out, in) never stored as floats in
// global memory. The weights are decoded in registers (GEMV) or into a shared-memory
// tile (GEMM) from the packed bytes.
//
// Formats (QM_* below; one extern "C" kernel per format, from a template):
//   q8_0  raw (out, row_bytes) uint8: 34-byte blocks of 32 weights, | d f16 | q int8 x 32 |
//         w[32b + j] = d * q[j]
//   q4_0  18-byte blocks: | d f16 | 16 bytes |; byte j: low nibble weight j, high j + 16;
//         w = d * (nibble - 8)
//   q4_1  20-byte blocks: | d f16 | m f16 | 16 bytes |; w = d * nibble + m
//   nf4   codes (out, in/2) uint8, absmax (out, in/64) float32; byte i of a row: high
//         nibble weight 2i, low 2i + 1; w = NF4[code] * absmax[block]
//   (nf4-dq: the launcher dequantizes the 8-bit absmax to float32 once and uses nf4.)
// x, y, dy, dx: float32, row-major, contiguous. in is a multiple of 32 (64 for nf4).
//
// The unit of decoding is a sub-block: 8 weights of one row, sub-block s covering
// bytes of one quant block (q8_0: 8 bytes; q4_x and nf4: 4 bytes) and features
// qm_cols (q4_x: 4 low nibbles at 32b + 4p + j, 4 high ones at 32b + 16 + 4p + j).
//
// Kernels (QM_THREADS threads a block):
//   qm_gemv_<f>    grid (ceil(out / QM_WARPS) or fewer: the rows are strided)
//                  one warp per output row; each lane walks the row's sub-blocks
//                  lane, lane + 32, ..., decodes 8 weights in registers and multiplies
//                  them with up to QM_GEMV_TOKENS rows of x; warp butterfly sums.
//   qm_gemm_<f>    grid (ceil(out / QM_TILE), ceil(N / QM_TILE)): a QM_TILE x QM_TILE
//                  block of y; for each QM_TILE-wide slice of in: x's tile and W's
//                  decoded tile to shared memory, then each thread a 4 x 4 micro-tile.
//   qm_gemm_t_<f>  grid (ceil(in / QM_TILE), ceil(N / QM_TILE)): dx = dy @ W, the same
//                  decoded W tiles (rows = the reduction axis now).
//   qm_rows_<f>    grid (n_ids): the float32 rows ids of W (an embedding lookup).
//
// No atomics: every output element is written by one thread with a fixed summation
// order (bitwise reproducible for a given shape and launch).
//
// NVRTC (CuPy) compiles this file: no #include. tests/quant_emu.cpp compiles it as C++
// for the CPU (threads as fibers: tests/cuda_emu.h; it defines __fmul_rn, __fadd_rn).

#ifndef QM_THREADS
#define QM_THREADS 256
#endif
#define QM_WARPS (QM_THREADS / 32)
#define QM_TILE 64             // GEMM tile: 64 tokens x 64 outputs, k-steps of 64
#define QM_PAD (QM_TILE + 1)   // shared row stride (no bank conflicts on column reads)
#define QM_GEMV_TOKENS 8       // rows of x one GEMV launch multiplies
#define QM_FULL_MASK 0xffffffffu

#define QM_Q8_0 0
#define QM_Q4_0 1
#define QM_Q4_1 2
#define QM_NF4 3

// Dynamic shared memory (GEMM only): two QM_TILE x QM_PAD float tiles.
extern __shared__ __align__(16) float qm_smem[];

__device__ __forceinline__ float qm_nf4_value(unsigned code) {
    // QLoRA's NF4 table (tinylm/quant/nf4.py's NF4_CODE), as float32 literals.
    switch (code & 15u) {
        case 0: return -1.0f;
        case 1: return -0.6961928009986877f;
        case 2: return -0.5250730514526367f;
        case 3: return -0.39491748809814453f;
        case 4: return -0.28444138169288635f;
        case 5: return -0.18477343022823334f;
        case 6: return -0.09105003625154495f;
        case 7: return 0.0f;
        case 8: return 0.07958029955625534f;
        case 9: return 0.16093020141124725f;
        case 10: return 0.24611230194568634f;
        case 11: return 0.33791524171829224f;
        case 12: return 0.44070982933044434f;
        case 13: return 0.5626170039176941f;
        case 14: return 0.7229568362236023f;
        default: return 1.0f;
    }
}

// IEEE half bits -> float32, exactly (normal, subnormal, inf, NaN): the exponent and
// mantissa bits moved into a float32 and rescaled by 2^112; inf/NaN rebuilt.
__device__ __forceinline__ float qm_half(const unsigned char* p) {
    const unsigned h = (unsigned)p[0] | ((unsigned)p[1] << 8);
    const unsigned sign = (h & 0x8000u) << 16;
    if ((h & 0x7c00u) == 0x7c00u) return __uint_as_float(sign | 0x7f800000u | ((h & 0x3ffu) << 13));
    const float f = __uint_as_float((h & 0x7fffu) << 13) * __uint_as_float(0x77800000u);
    return sign ? -f : f;
}

template <int FMT> struct QmFormat;
template <> struct QmFormat<QM_Q8_0> { enum { block_bytes = 34, head = 2, subs = 4 }; };
template <> struct QmFormat<QM_Q4_0> { enum { block_bytes = 18, head = 2, subs = 4 }; };
template <> struct QmFormat<QM_Q4_1> { enum { block_bytes = 20, head = 4, subs = 4 }; };
template <> struct QmFormat<QM_NF4> { enum { block_bytes = 32, head = 0, subs = 8 }; };

// The features of sub-block s's 8 weights (col[j]), in a row of the weight.
template <int FMT>
__device__ __forceinline__ void qm_cols(int s, int* col) {
    if (FMT == QM_Q8_0) {
        for (int j = 0; j < 8; ++j) col[j] = 8 * s + j;
    } else if (FMT == QM_NF4) {
        for (int j = 0; j < 8; ++j) col[j] = 8 * s + j;  // byte 4s + i: weights 8s + 2i, +1
    } else {
        const int b = s >> 2, p = s & 3;
        for (int j = 0; j < 4; ++j) {
            col[j] = 32 * b + 4 * p + j;
            col[4 + j] = 32 * b + 16 + 4 * p + j;
        }
    }
}

// The 8 float32 weights of sub-block s of one row (row: its packed bytes; absmax: its
// nf4 block scales), in the order of qm_cols.
template <int FMT>
__device__ __forceinline__ void qm_values(const unsigned char* row, const float* absmax, int s,
                                          float* v) {
    typedef QmFormat<FMT> F;
    if (FMT == QM_NF4) {
        const unsigned char* q = row + 4 * s;
        const float a = absmax[s >> 3];
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = qm_nf4_value(q[i] >> 4) * a;
            v[2 * i + 1] = qm_nf4_value(q[i]) * a;
        }
        return;
    }
    const unsigned char* blk = row + (s >> 2) * F::block_bytes;
    const int p = s & 3;
    const float d = qm_half(blk);
    if (FMT == QM_Q8_0) {
        const unsigned char* q = blk + F::head + 8 * p;
        for (int j = 0; j < 8; ++j) v[j] = d * (float)(signed char)q[j];
        return;
    }
    const unsigned char* q = blk + F::head + 4 * p;
    if (FMT == QM_Q4_0) {
        for (int j = 0; j < 4; ++j) {
            v[j] = d * (float)((int)(q[j] & 15u) - 8);
            v[4 + j] = d * (float)((int)(q[j] >> 4) - 8);
        }
    } else {  // QM_Q4_1: d * nibble + m rounded twice, as the reference (no fused FMA)
        const float m = qm_half(blk + 2);
        for (int j = 0; j < 4; ++j) {
            v[j] = __fadd_rn(__fmul_rn(d, (float)(q[j] & 15u)), m);
            v[4 + j] = __fadd_rn(__fmul_rn(d, (float)(q[j] >> 4)), m);
        }
    }
}

__device__ __forceinline__ float qm_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(QM_FULL_MASK, x, o);
    return x;
}

// ===================================================================== GEMV (decode)

// y (n_tok, n_out) = x (n_tok, n_in) @ W.T, n_tok <= QM_GEMV_TOKENS.
template <int FMT>
__device__ void qm_gemv(const unsigned char* w, const float* absmax, const float* x, float* y,
                        int n_out, int n_in, int n_tok, long long row_bytes) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int subs = n_in / 8;
    for (int r = blockIdx.x * QM_WARPS + warp; r < n_out; r += gridDim.x * QM_WARPS) {
        const unsigned char* row = w + (long long)r * row_bytes;
        const float* am = absmax + (FMT == QM_NF4 ? (long long)r * (n_in / 64) : 0);
        float acc[QM_GEMV_TOKENS];
        for (int t = 0; t < QM_GEMV_TOKENS; ++t) acc[t] = 0.f;
        for (int s = lane; s < subs; s += 32) {
            int col[8];
            float v[8];
            qm_cols<FMT>(s, col);
            qm_values<FMT>(row, am, s, v);
            for (int t = 0; t < QM_GEMV_TOKENS; ++t) {
                if (t >= n_tok) break;
                const float* xt = x + (long long)t * n_in;
                float a = 0.f;
                for (int j = 0; j < 8; ++j) a += v[j] * xt[col[j]];
                acc[t] += a;
            }
        }
        for (int t = 0; t < QM_GEMV_TOKENS; ++t) {
            if (t >= n_tok) break;  // n_tok is the same for every lane: no divergence
            const float s = qm_warp_sum(acc[t]);
            if (lane == 0) y[(long long)t * n_out + r] = s;
        }
    }
}

// ===================================================================== GEMM (prefill)

// Decode W's rows [row0, row0 + QM_TILE) x features [k0, k0 + QM_TILE) into ws (row-major,
// stride QM_PAD); zeros outside the weight.
template <int FMT>
__device__ void qm_load_w_tile(const unsigned char* w, const float* absmax, float* ws, int row0,
                               int k0, int n_out, int n_in, long long row_bytes) {
    const int subs_per_row = QM_TILE / 8;  // 8
    for (int i = threadIdx.x; i < QM_TILE * subs_per_row; i += QM_THREADS) {
        const int r = i / subs_per_row, s = k0 / 8 + i % subs_per_row;
        int col[8];
        float v[8];
        qm_cols<FMT>(s, col);
        if (row0 + r < n_out && 8 * s < n_in) {
            const long long gr = row0 + r;
            qm_values<FMT>(w + gr * row_bytes, absmax + (FMT == QM_NF4 ? gr * (n_in / 64) : 0),
                           s, v);
        } else {
            for (int j = 0; j < 8; ++j) v[j] = 0.f;
        }
        for (int j = 0; j < 8; ++j) ws[r * QM_PAD + col[j] - k0] = v[j];
    }
}

// a's rows [r0, r0 + QM_TILE) x columns [c0, c0 + QM_TILE) into as (stride QM_PAD); zeros
// outside the (rows, cols) matrix.
__device__ void qm_load_tile(const float* a, float* as, int r0, int c0, int rows, int cols) {
    for (int i = threadIdx.x; i < QM_TILE * QM_TILE; i += QM_THREADS) {
        const int r = i / QM_TILE, c = i % QM_TILE;
        const bool in = r0 + r < rows && c0 + c < cols;
        as[r * QM_PAD + c] = in ? a[(long long)(r0 + r) * cols + c0 + c] : 0.f;
    }
}

// TRANS = 0: y (n_tok, n_out) = x (n_tok, n_in) @ W.T; the block's tile is tokens
//            [blockIdx.y * T, +T) x outputs [blockIdx.x * T, +T), k runs over n_in.
// TRANS = 1: dx (n_tok, n_in) = dy (n_tok, n_out) @ W; tile tokens x features
//            [blockIdx.x * T, +T), k runs over the weight's rows.
// Thread t computes tokens tm + 16 i and columns tn + 16 j (i, j < 4), tm = t / 16,
// tn = t % 16: its reads of the W tile hit 16 different banks.
template <int FMT, int TRANS>
__device__ void qm_gemm(const unsigned char* w, const float* absmax, const float* a, float* out,
                        int n_out, int n_in, int n_tok, long long row_bytes) {
    float* as = qm_smem;                   // [T][QM_PAD]: tokens x k
    float* ws = qm_smem + QM_TILE * QM_PAD;  // TRANS 0: [n][k]; TRANS 1: [k][n]
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
    const int tok0 = blockIdx.y * QM_TILE, col0 = blockIdx.x * QM_TILE;
    const int k_len = TRANS ? n_out : n_in, out_cols = TRANS ? n_in : n_out;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < k_len; k0 += QM_TILE) {
        qm_load_tile(a, as, tok0, k0, n_tok, k_len);
        if (TRANS)
            qm_load_w_tile<FMT>(w, absmax, ws, k0, col0, n_out, n_in, row_bytes);
        else
            qm_load_w_tile<FMT>(w, absmax, ws, col0, k0, n_out, n_in, row_bytes);
        __syncthreads();
        for (int k = 0; k < QM_TILE; ++k) {
            float av[4], wv[4];
            for (int i = 0; i < 4; ++i) av[i] = as[(tm + 16 * i) * QM_PAD + k];
            for (int j = 0; j < 4; ++j)
                wv[j] = TRANS ? ws[k * QM_PAD + tn + 16 * j] : ws[(tn + 16 * j) * QM_PAD + k];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * wv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int t = tok0 + tm + 16 * i;
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tn + 16 * j;
            if (t < n_tok && c < out_cols) out[(long long)t * out_cols + c] = acc[i][j];
        }
    }
}

// ===================================================================== rows (lookup)

// out (n_ids, n_in) = W[ids] as float32.
template <int FMT>
__device__ void qm_rows(const unsigned char* w, const float* absmax, const long long* ids,
                        float* out, int n_in, long long row_bytes) {
    const long long r = ids[blockIdx.x];
    const unsigned char* row = w + r * row_bytes;
    const float* am = absmax + (FMT == QM_NF4 ? r * (n_in / 64) : 0);
    float* o = out + (long long)blockIdx.x * n_in;
    for (int s = threadIdx.x; s < n_in / 8; s += QM_THREADS) {
        int col[8];
        float v[8];
        qm_cols<FMT>(s, col);
        qm_values<FMT>(row, am, s, v);
        for (int j = 0; j < 8; ++j) o[col[j]] = v[j];
    }
}

// ===================================================================== entry points

#define QM_ENTRIES(NAME, FMT)                                                                  \
    extern "C" __global__ void __launch_bounds__(QM_THREADS)                                   \
    qm_gemv_##NAME(const unsigned char* w, const float* absmax, const float* x, float* y,      \
                   int n_out, int n_in, int n_tok, long long row_bytes) {                      \
        qm_gemv<FMT>(w, absmax, x, y, n_out, n_in, n_tok, row_bytes);                          \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(QM_THREADS)                                   \
    qm_gemm_##NAME(const unsigned char* w, const float* absmax, const float* x, float* y,      \
                   int n_out, int n_in, int n_tok, long long row_bytes) {                      \
        qm_gemm<FMT, 0>(w, absmax, x, y, n_out, n_in, n_tok, row_bytes);                       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(QM_THREADS)                                   \
    qm_gemm_t_##NAME(const unsigned char* w, const float* absmax, const float* dy, float* dx,  \
                     int n_out, int n_in, int n_tok, long long row_bytes) {                    \
        qm_gemm<FMT, 1>(w, absmax, dy, dx, n_out, n_in, n_tok, row_bytes);                     \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(QM_THREADS)                                   \
    qm_rows_##NAME(const unsigned char* w, const float* absmax, const long long* ids,          \
                   float* out, int n_in, long long row_bytes) {                                \
        qm_rows<FMT>(w, absmax, ids, out, n_in, row_bytes);                                    \
    }

QM_ENTRIES(q8_0, QM_Q8_0)
QM_ENTRIES(q4_0, QM_Q4_0)
QM_ENTRIES(q4_1, QM_Q4_1)
QM_ENTRIES(nf4, QM_NF4)
