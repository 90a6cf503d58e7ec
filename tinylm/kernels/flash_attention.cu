// FlashAttention-2 style tiled attention for tinylm: forward and backward.
//
// Shapes (all contiguous, row-major):
//   q, o, dq, do   (B, H,   Tq, D)          k, v, dk, dv   (B, Hkv, Tk, D)
//   lse, delta     (B, H,   Tq)  float32    (natural-log logsumexp; rowsum(dO * O))
// Query head h reads key/value head h / (H / Hkv) (grouped-query attention).
// Causal masking is bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq),
// the usual j <= i when Tq == Tk (a KV cache puts the queries at the end). A row that
// sees no key at all gets o = 0 and lse = -inf, and contributes no gradient.
//
// One module is compiled per (dtype, head dim, kernel family): the launcher
// (flash_attention.py) passes -DFA_DTYPE_ID=0|1|2 (float32 | float16 | bfloat16),
// -DFA_HEAD_DIM=32|64|128, -DFA_KERNELS (which families) and the tile sizes below; the
// defaults let `nvcc --ptx` compile the file as it is.
//
// Two families of kernels, the tensor-core one in two generations:
//   *_simt  256 threads as a 16 x 16 grid, fp32 math on CUDA cores; shared tiles hold
//           float32 whatever the input dtype (16-bit inputs are widened on load).
//   *_mma   (float16 / bfloat16 only) 4 warps, each owning 16 rows of the tile, using
//           the tensor-core instruction mma.sync.m16n8k16 with fp32 accumulation and
//           ldmatrix for the operand fragments (FA_LDMATRIX=0: plain shared loads);
//           P and dS stay in registers and are rounded to the input dtype before they
//           feed a tensor-core product, as in FlashAttention-2.
//   *_mma2  v2 of the *_mma kernels (section "v2: cp.async"): cp.async double
//           buffering, one barrier per tile, 32-row warps in the forward, one-FFMA
//           exponents, reused fragments kept in registers. *_simt2: the SIMT backward
//           with the v2 exponent (lse2) and its own tiles.
// Kernels, per family:
//   fa_fwd_*        grid (ceil(Tq/BR), B*H)      o, lse
//   fa_bwd_pre      grid (ceil(B*H*Tq/8))        delta = rowsum(dO * O)
//   fa_bwd_pre2     grid (ceil(B*H*Tq/8))        delta, and lse2 = lse * log2(e) for v2
//   fa_bwd_dkdv_*   grid (ceil(Tk/BC), B*Hkv)    dk, dv: one block owns a key tile and
//                   loops over every query head of its group and every query tile
//   fa_bwd_dq_*     grid (ceil(Tq/BR), B*H)      dq: one block owns a query tile
// No atomics anywhere: every output element is written by exactly one thread, each
// sum runs in a fixed order, so results are bitwise deterministic.
//
// Scores are kept in base 2: x = (q . k) * scale * log2(e), p = exp2(x - m). The
// launcher passes scale and scale_log2 = scale * log2(e).
//
// NVRTC (CuPy) compiles this file: no #include at all; the 16-bit conversions, ldmatrix,
// mma and cp.async are written as inline PTX. With FA_HOST_EMULATION defined,
// tests/flash_attention_emu.cpp compiles this same file for the CPU (it defines the
// CUDA built-ins used here and emulates threads, barriers, shuffles, ldmatrix, mma.sync
// and cp.async); the few inline-PTX statements have host twins (fa_emu_*) under that
// macro. Performance notes, predictions and measurements: NOTES.md beside this file.

typedef unsigned short u16;
typedef unsigned int u32;

#ifndef FA_DTYPE_ID
#define FA_DTYPE_ID 0
#endif
#ifndef FA_HEAD_DIM
#define FA_HEAD_DIM 64
#endif
// SIMT tiles: BR query rows x BC key rows.
#ifndef FA_SIMT_FWD_BR
#define FA_SIMT_FWD_BR 64
#endif
#ifndef FA_SIMT_FWD_BC
#define FA_SIMT_FWD_BC 64
#endif
#ifndef FA_SIMT_KV_BR
#define FA_SIMT_KV_BR 64
#endif
#ifndef FA_SIMT_KV_BC
#define FA_SIMT_KV_BC 64
#endif
#ifndef FA_SIMT_Q_BR
#define FA_SIMT_Q_BR 64
#endif
#ifndef FA_SIMT_Q_BC
#define FA_SIMT_Q_BC 64
#endif
// Tensor-core tiles: the forward and dq kernels own BR = 64 query rows (4 warps x 16)
// and step over BC keys; the dk/dv kernel owns BC = 64 keys and steps over BR queries.
#ifndef FA_MMA_FWD_BC
#define FA_MMA_FWD_BC 64
#endif
#ifndef FA_MMA_KV_BR
#define FA_MMA_KV_BR 64
#endif
#ifndef FA_MMA_Q_BC
#define FA_MMA_Q_BC 64
#endif

// v2 SIMT backward (fa_bwd_*_simt2): the v1 code with lse2 (one FFMA per exponent), its
// own tiles, and FA_SIMT2_*_MINB blocks per multiprocessor in its launch bounds (1 lets
// a block with too much shared memory for two use up to 255 registers).
#ifndef FA_SIMT2_KV_BR
#define FA_SIMT2_KV_BR 64
#endif
#ifndef FA_SIMT2_KV_BC
#define FA_SIMT2_KV_BC 64
#endif
#ifndef FA_SIMT2_KV_MINB
#define FA_SIMT2_KV_MINB 2
#endif
#ifndef FA_SIMT2_Q_BR
#define FA_SIMT2_Q_BR 64
#endif
#ifndef FA_SIMT2_Q_BC
#define FA_SIMT2_Q_BC 64
#endif
#ifndef FA_SIMT2_Q_MINB
#define FA_SIMT2_Q_MINB 2
#endif
// v2 tensor-core kernels (cp.async, two stages): the forward's warps own FA_MMA2_FWD_MT
// m-tiles of 16 rows (BR = 64 MT) and step over FA_MMA2_FWD_BC keys; dk/dv owns 64 keys
// and steps over FA_MMA2_KV_BR queries; dq owns 64 queries and steps over FA_MMA2_Q_BC
// keys. *_REGS = 1 keeps the operand a warp reuses all along (Q; K and V; Q and dO) in
// registers instead of re-reading it from shared memory.
#ifndef FA_MMA2_FWD_MT
#define FA_MMA2_FWD_MT 2
#endif
#ifndef FA_MMA2_FWD_BC
#define FA_MMA2_FWD_BC 64
#endif
#ifndef FA_MMA2_FWD_QREGS
#define FA_MMA2_FWD_QREGS 1
#endif
#ifndef FA_MMA2_KV_BR
#define FA_MMA2_KV_BR 64
#endif
#ifndef FA_MMA2_KV_REGS
#define FA_MMA2_KV_REGS 1
#endif
#ifndef FA_MMA2_Q_BC
#define FA_MMA2_Q_BC 64
#endif
#ifndef FA_MMA2_Q_REGS
#define FA_MMA2_Q_REGS 1
#endif

#define FA_NEG_INF __int_as_float(0xff800000)
#define FA_POS_INF __int_as_float(0x7f800000)
#define FA_LN2 0.693147180559945309f
#define FA_LOG2E 1.442695040888963407f
#define FA_FULL_MASK 0xffffffffu

extern __shared__ __align__(16) unsigned char fa_smem[];

// ===================================================================== element types

struct F32 { typedef float T; static constexpr bool is16 = false; };
struct F16 { typedef u16 T; static constexpr bool is16 = true; };
struct BF16 { typedef u16 T; static constexpr bool is16 = true; };

template <class DT> __device__ __forceinline__ float to_f32(typename DT::T x);
template <> __device__ __forceinline__ float to_f32<F32>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<F16>(u16 x) {
#ifdef FA_HOST_EMULATION
    return fa_emu_f16_to_f32(x);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}
template <> __device__ __forceinline__ float to_f32<BF16>(u16 x) {
    return __uint_as_float(((u32)x) << 16);  // bfloat16 is the top half of a float32
}

template <class DT> __device__ __forceinline__ typename DT::T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<F32>(float x) { return x; }
template <> __device__ __forceinline__ u16 from_f32<F16>(float x) {
#ifdef FA_HOST_EMULATION
    return fa_emu_f32_to_f16(x);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#endif
}
template <> __device__ __forceinline__ u16 from_f32<BF16>(float x) {
#ifdef FA_HOST_EMULATION
    return fa_emu_f32_to_bf16(x);
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#endif
}

// Two floats -> one 32-bit register holding two 16-bit values, `lo` in bits 0..15
// (the element with the smaller column index, as mma fragments and memory expect).
template <class DT> __device__ __forceinline__ u32 pack2_f32(float lo, float hi) {
    return (u32)from_f32<DT>(lo) | ((u32)from_f32<DT>(hi) << 16);
}

// Four consecutive elements from global memory, widened to float.
template <class DT> __device__ __forceinline__ float4 load4_f32(const typename DT::T* p);
template <> __device__ __forceinline__ float4 load4_f32<F32>(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
template <class DT> __device__ __forceinline__ float4 load4_f32_16(const u16* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(to_f32<DT>((u16)(u.x & 0xffffu)), to_f32<DT>((u16)(u.x >> 16)),
                       to_f32<DT>((u16)(u.y & 0xffffu)), to_f32<DT>((u16)(u.y >> 16)));
}
template <> __device__ __forceinline__ float4 load4_f32<F16>(const u16* p) {
    return load4_f32_16<F16>(p);
}
template <> __device__ __forceinline__ float4 load4_f32<BF16>(const u16* p) {
    return load4_f32_16<BF16>(p);
}

// Store VEC (2 or 4) consecutive floats to global memory as DT.
template <class DT, int VEC>
__device__ __forceinline__ void store_vec(typename DT::T* p, const float* x) {
    if constexpr (!DT::is16) {
        if constexpr (VEC == 4) {
            *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
        } else {
            *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
        }
    } else {
        if constexpr (VEC == 4) {
            *reinterpret_cast<uint2*>(p) = make_uint2(pack2_f32<DT>(x[0], x[1]),
                                                      pack2_f32<DT>(x[2], x[3]));
        } else {
            *reinterpret_cast<u32*>(p) = pack2_f32<DT>(x[0], x[1]);
        }
    }
}

__device__ __forceinline__ float f4_get(const float4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// ===================================================================== common helpers

// The launcher sizes dynamic shared memory from the same formulas; a mismatch must
// fail loudly, not overrun: trap (a launch error on the host) when it is too small.
__device__ __forceinline__ void require_smem(u32 bytes) {
#ifdef FA_HOST_EMULATION
    const u32 have = fa_emu_dynamic_smem_size();
#else
    u32 have;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
#endif
    if (have < bytes) __trap();
}

// May query row r see key column c?  (0 <= r; c >= Tk is padding of the last tile.)
__device__ __forceinline__ bool visible(int r, int c, int Tk, int shift, int causal) {
    return c < Tk && (!causal || c <= r + shift);
}

// Key tiles (of BC) that query rows [q0, q0 + BR) ∩ [0, Tq) can see: tiles 0 .. n-1.
template <int BR, int BC>
__device__ __forceinline__ int visible_key_tiles(int q0, int Tq, int Tk, int causal) {
    const int n_all = (Tk + BC - 1) / BC;
    if (!causal) return n_all;
    const int last_key = min(q0 + BR, Tq) - 1 + (Tk - Tq);  // last key the block sees
    if (last_key < 0) return 0;
    return min(n_all, last_key / BC + 1);
}

// First query tile (of BR) with a row that sees some key in [k0, ...): under the causal
// mask key k0 is first seen by query k0 - shift.
template <int BR>
__device__ __forceinline__ int first_query_tile(int k0, int Tq, int Tk, int causal) {
    if (!causal) return 0;
    const int r = k0 - (Tk - Tq);
    return r <= 0 ? 0 : r / BR;
}

// Reductions over the 16 lanes that share one row in the SIMT layout (a half warp:
// lanes 0-15 or 16-31). Every lane ends with the same, bitwise identical, value.
__device__ __forceinline__ float allreduce_max16(float x) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FA_FULL_MASK, x, o));
    return x;
}
__device__ __forceinline__ float allreduce_sum16(float x) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) x += __shfl_xor_sync(FA_FULL_MASK, x, o);
    return x;
}
// ... over the 4 lanes (a quad) that share one row of an mma fragment.
__device__ __forceinline__ float allreduce_max4(float x) {
    x = fmaxf(x, __shfl_xor_sync(FA_FULL_MASK, x, 1));
    return fmaxf(x, __shfl_xor_sync(FA_FULL_MASK, x, 2));
}
__device__ __forceinline__ float allreduce_sum4(float x) {
    x += __shfl_xor_sync(FA_FULL_MASK, x, 1);
    return x + __shfl_xor_sync(FA_FULL_MASK, x, 2);
}

// ===================================================================== SIMT building blocks
// Thread layout (256 threads): ty = tid / 16 picks rows ty, ty + 16, ty + 32, ...;
// tx = tid % 16 picks score columns tx, tx + 16, ... and output columns col(tx, n).
// Shared tiles are float32 with rows padded by 4 floats: float4 aligned, and the 8
// consecutive rows a quarter warp reads fall on distinct 16-byte bank groups.

// Output columns of thread tx: groups of VEC adjacent columns, the 16 threads side by
// side (16 * VEC consecutive floats per group: conflict-free and coalesced).
template <int D> struct SimtCols {
    static constexpr int VEC = D >= 64 ? 4 : 2;
    static constexpr int DN = D / 16;   // output columns per thread
    static constexpr int NG = DN / VEC; // groups
    static __device__ __forceinline__ int col(int tx, int n) {
        return (n / VEC) * (16 * VEC) + tx * VEC + (n % VEC);
    }
};

// dst[r][c] = src[(row0 + r) * D + c] as float, r < ROWS, c < D; rows past nrows are 0.
template <class DT, int D, int ROWS, int LD, int NT>
__device__ __forceinline__ void simt_load_tile(float* dst, const typename DT::T* __restrict__ src,
                                               int row0, int nrows, int tid) {
    constexpr int C4 = D / 4;
#pragma unroll 4
    for (int i = tid; i < ROWS * C4; i += NT) {
        const int r = i / C4, c = (i % C4) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < nrows) x = load4_f32<DT>(src + (long long)(row0 + r) * D + c);
        *reinterpret_cast<float4*>(dst + r * LD + c) = x;
    }
}

// acc[i][j] += sum_{d < D} A[ty + 16 i][d] * B[tx + 16 j][d]      (A B^T; A, B: [*][LD])
template <int RM, int CN, int D, int LD>
__device__ __forceinline__ void simt_abt(float (&acc)[RM][CN], const float* A, const float* B,
                                         int ty, int tx) {
#pragma unroll
    for (int d = 0; d < D; d += 4) {
        float4 a[RM], b[CN];
#pragma unroll
        for (int i = 0; i < RM; ++i)
            a[i] = *reinterpret_cast<const float4*>(A + (ty + 16 * i) * LD + d);
#pragma unroll
        for (int j = 0; j < CN; ++j)
            b[j] = *reinterpret_cast<const float4*>(B + (tx + 16 * j) * LD + d);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                float s = acc[i][j];
                s = fmaf(a[i].x, b[j].x, s);
                s = fmaf(a[i].y, b[j].y, s);
                s = fmaf(a[i].z, b[j].z, s);
                s = fmaf(a[i].w, b[j].w, s);
                acc[i][j] = s;
            }
        }
    }
}

// acc[i][n] += sum_{c < KC} P[ty + 16 i][c] * B[c][col(tx, n)]   (P B; P: [*][LDP], B: [*][LD])
template <int RM, int KC, int D, int LDP, int LD>
__device__ __forceinline__ void simt_ab(float (&acc)[RM][D / 16], const float* P, const float* B,
                                        int ty, int tx) {
    typedef SimtCols<D> Cols;
    constexpr int VEC = Cols::VEC, NG = Cols::NG;
#pragma unroll 2
    for (int c = 0; c < KC; c += 4) {
        float4 p[RM];
#pragma unroll
        for (int i = 0; i < RM; ++i)
            p[i] = *reinterpret_cast<const float4*>(P + (ty + 16 * i) * LDP + c);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const float* brow = B + (c + kk) * LD + tx * VEC;
            float bv[D / 16];
#pragma unroll
            for (int g = 0; g < NG; ++g) {
                if constexpr (VEC == 4) {
                    const float4 x = *reinterpret_cast<const float4*>(brow + g * 16 * VEC);
                    bv[4 * g + 0] = x.x;
                    bv[4 * g + 1] = x.y;
                    bv[4 * g + 2] = x.z;
                    bv[4 * g + 3] = x.w;
                } else {
                    const float2 x = *reinterpret_cast<const float2*>(brow + g * 16 * VEC);
                    bv[2 * g + 0] = x.x;
                    bv[2 * g + 1] = x.y;
                }
            }
#pragma unroll
            for (int i = 0; i < RM; ++i) {
                const float pv = f4_get(p[i], kk);
#pragma unroll
                for (int n = 0; n < D / 16; ++n) acc[i][n] = fmaf(pv, bv[n], acc[i][n]);
            }
        }
    }
}

// Write one row of a thread's output accumulator: dst[col(tx, n)] = acc[n] * mult.
template <class DT, int D>
__device__ __forceinline__ void simt_store_row(typename DT::T* dst, const float (&acc)[D / 16],
                                               float mult, int tx) {
    typedef SimtCols<D> Cols;
#pragma unroll
    for (int g = 0; g < Cols::NG; ++g) {
        float x[Cols::VEC];
#pragma unroll
        for (int e = 0; e < Cols::VEC; ++e) x[e] = acc[g * Cols::VEC + e] * mult;
        store_vec<DT, Cols::VEC>(dst + Cols::col(tx, g * Cols::VEC), x);
    }
}

// ===================================================================== SIMT forward
// Block: BR query rows of one (batch, head); loop over visible key tiles of BC rows.
// Shared: Qs[BR][D+4], Ks[BC][D+4], Vs[BC][D+4], Ps[BR][BC+16]  (float32)
// Thread (ty, tx): score rows ty + 16 i (i < BR/16), score columns tx + 16 j (j < BC/16),
// output columns col(tx, n) (n < D/16) of the same rows. Running max m and sum l are
// per row; l is a per-thread partial sum over this thread's columns, reduced at the end.
template <class DT, int D, int BR, int BC>
__device__ __forceinline__ void fwd_simt(const typename DT::T* __restrict__ q,
                                         const typename DT::T* __restrict__ k,
                                         const typename DT::T* __restrict__ v,
                                         typename DT::T* __restrict__ o, float* __restrict__ lse,
                                         int H, int Hkv, int Tq, int Tk, float scale_log2,
                                         int causal) {
    constexpr int NT = 256, LD = D + 4, LDP = BC + 16;
    constexpr int RM = BR / 16, CN = BC / 16, DN = D / 16;
    static_assert(BR % 16 == 0 && BC % 16 == 0 && D % 32 == 0, "tile shape");
    float* Qs = reinterpret_cast<float*>(fa_smem);  // [BR][LD]
    float* Ks = Qs + BR * LD;                         // [BC][LD]
    float* Vs = Ks + BC * LD;                         // [BC][LD]
    float* Ps = Vs + BC * LD;                         // [BR][LDP]
    require_smem(4u * (BR * LD + 2 * BC * LD + BR * LDP));

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // heaviest (causal) tiles first
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const typename DT::T* qb = q + (long long)bh * Tq * D;
    const typename DT::T* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const typename DT::T* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);

    simt_load_tile<DT, D, BR, LD, NT>(Qs, qb, q0, Tq, tid);

    float m[RM], l[RM], acc[RM][DN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        m[i] = FA_NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int n = 0; n < DN; ++n) acc[i][n] = 0.f;
    }

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        __syncthreads();  // the previous tile's Ks, Vs, Ps are consumed (and Qs is written)
        simt_load_tile<DT, D, BC, LD, NT>(Ks, kb, k0, Tk, tid);
        simt_load_tile<DT, D, BC, LD, NT>(Vs, vb, k0, Tk, tid);
        __syncthreads();

        float s[RM][CN];
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int j = 0; j < CN; ++j) s[i][j] = 0.f;
        simt_abt<RM, CN, D, LD>(s, Qs, Ks, ty, tx);  // s = Q K^T  (BR x BC)

        const bool edge = (k0 + BC > Tk) || (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int r = q0 + ty + 16 * i;
            float mx = FA_NEG_INF;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                float x = s[i][j] * scale_log2;
                if (edge && !visible(r, k0 + tx + 16 * j, Tk, shift, causal)) x = FA_NEG_INF;
                s[i][j] = x;
                mx = fmaxf(mx, x);
            }
            mx = allreduce_max16(mx);
            const float m_new = fmaxf(m[i], mx);
            const float m_use = (m_new == FA_NEG_INF) ? 0.f : m_new;  // row sees nothing yet
            const float alpha = exp2f(m[i] - m_use);                  // 0 on the first tile
            float rs = 0.f;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                const float p = exp2f(s[i][j] - m_use);  // masked: exp2(-inf) = 0
                s[i][j] = p;
                rs += p;
            }
            l[i] = l[i] * alpha + rs;
            m[i] = m_new;
#pragma unroll
            for (int n = 0; n < DN; ++n) acc[i][n] *= alpha;
#pragma unroll
            for (int j = 0; j < CN; ++j) Ps[(ty + 16 * i) * LDP + tx + 16 * j] = s[i][j];
        }
        __syncthreads();
        simt_ab<RM, BC, D, LDP, LD>(acc, Ps, Vs, ty, tx);  // acc += P V
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const float lt = allreduce_sum16(l[i]);  // every lane of the half warp takes part
        const int r = q0 + ty + 16 * i;
        if (r < Tq) {
            const long long row = (long long)bh * Tq + r;
            simt_store_row<DT, D>(o + row * D, acc[i], lt > 0.f ? 1.f / lt : 0.f, tx);
            if (tx == 0) lse[row] = lt > 0.f ? (m[i] + log2f(lt)) * FA_LN2 : FA_NEG_INF;
        }
    }
}

// ===================================================================== backward: delta
// delta[row] = sum_d dO[row][d] * O[row][d]; one warp per row, 8 rows per block.
template <class DT, int D>
__device__ __forceinline__ void bwd_pre(const typename DT::T* __restrict__ o,
                                        const typename DT::T* __restrict__ dout,
                                        float* __restrict__ delta, int nrows) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 8 + warp;
    if (row >= nrows) return;  // whole warp leaves together; no barrier in this kernel
    float acc = 0.f;
#pragma unroll
    for (int c = lane; c < D; c += 32)
        acc = fmaf(to_f32<DT>(o[row * D + c]), to_f32<DT>(dout[row * D + c]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FA_FULL_MASK, acc, off);
    if (lane == 0) delta[row] = acc;
}

// ===================================================================== SIMT backward: dk, dv
// Block: BC keys of one (batch, kv head); loops over the query heads of its group and
// the query tiles that see these keys. The roles of the forward swap: "rows" are keys
// (ty + 16 i), "columns" are queries (tx + 16 j).
//   S^T = K Q^T, P^T = exp2(S^T * scale_log2 - lse2[q]), dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta[q]);  dV += P^T dO,  dK += dS^T Q  (times scale at the end)
// Shared: Ks, Vs [BC][D+4]; Qs, dOs [BR][D+4]; PTs, DSTs [BC][BR+16]; Ls, Dd [BR].
// LSE2 (v2): `lse` is lse2 from fa_bwd_pre2 (base 2, +inf for rows that saw nothing),
// and the exponent is one FFMA.
template <class DT, int D, int BR, int BC, bool LSE2 = false>
__device__ __forceinline__ void dkdv_simt(const typename DT::T* __restrict__ q,
                                          const typename DT::T* __restrict__ k,
                                          const typename DT::T* __restrict__ v,
                                          const typename DT::T* __restrict__ dout,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ delta,
                                          typename DT::T* __restrict__ dk,
                                          typename DT::T* __restrict__ dv, int H, int Hkv, int Tq,
                                          int Tk, float scale, float scale_log2, int causal) {
    constexpr int NT = 256, LD = D + 4, LDT = BR + 16;
    constexpr int CM = BC / 16, RN = BR / 16, DN = D / 16;
    static_assert(BR % 16 == 0 && BC % 16 == 0 && D % 32 == 0, "tile shape");
    float* Ks = reinterpret_cast<float*>(fa_smem);  // [BC][LD]
    float* Vs = Ks + BC * LD;                         // [BC][LD]
    float* Qs = Vs + BC * LD;                         // [BR][LD]
    float* dOs = Qs + BR * LD;                        // [BR][LD]
    float* PTs = dOs + BR * LD;                       // [BC][LDT]
    float* DSTs = PTs + BC * LDT;                     // [BC][LDT]
    float* Ls = DSTs + BC * LDT;                      // [BR]  lse * log2(e), +inf if unused
    float* Dd = Ls + BR;                              // [BR]  delta, 0 if unused
    require_smem(4u * (2 * BC * LD + 2 * BR * LD + 2 * BC * LDT + 2 * BR));

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int k0 = blockIdx.x * BC;
    const int bkv = blockIdx.y, b = bkv / Hkv, hk = bkv - b * Hkv, group = H / Hkv;
    const int shift = Tk - Tq;
    simt_load_tile<DT, D, BC, LD, NT>(Ks, k + (long long)bkv * Tk * D, k0, Tk, tid);
    simt_load_tile<DT, D, BC, LD, NT>(Vs, v + (long long)bkv * Tk * D, k0, Tk, tid);

    float dka[CM][DN], dva[CM][DN];
#pragma unroll
    for (int i = 0; i < CM; ++i)
#pragma unroll
        for (int n = 0; n < DN; ++n) dka[i][n] = dva[i][n] = 0.f;

    const int nq = (Tq + BR - 1) / BR;
    const int qt_first = first_query_tile<BR>(k0, Tq, Tk, causal);
    for (int gi = 0; gi < group; ++gi) {
        const int bh = b * H + hk * group + gi;
        const typename DT::T* qb = q + (long long)bh * Tq * D;
        const typename DT::T* dob = dout + (long long)bh * Tq * D;
        const float* lseb = lse + (long long)bh * Tq;
        const float* deltab = delta + (long long)bh * Tq;
        for (int qt = qt_first; qt < nq; ++qt) {
            const int q0 = qt * BR;
            __syncthreads();  // previous Qs, dOs, PTs, DSTs, Ls, Dd are consumed
            simt_load_tile<DT, D, BR, LD, NT>(Qs, qb, q0, Tq, tid);
            simt_load_tile<DT, D, BR, LD, NT>(dOs, dob, q0, Tq, tid);
            for (int r = tid; r < BR; r += NT) {
                float L = FA_POS_INF, dd = 0.f;  // padding rows: p = exp2(-inf) = 0
                if (q0 + r < Tq) {
                    const float x = lseb[q0 + r];
                    if constexpr (LSE2) L = x;
                    else if (x != FA_NEG_INF) L = x * FA_LOG2E;  // fully masked row: p = 0
                    dd = deltab[q0 + r];
                }
                Ls[r] = L;
                Dd[r] = dd;
            }
            __syncthreads();

            float st[CM][RN], dpt[CM][RN];
#pragma unroll
            for (int i = 0; i < CM; ++i)
#pragma unroll
                for (int j = 0; j < RN; ++j) st[i][j] = dpt[i][j] = 0.f;
            simt_abt<CM, RN, D, LD>(st, Ks, Qs, ty, tx);    // S^T  = K Q^T   (BC x BR)
            simt_abt<CM, RN, D, LD>(dpt, Vs, dOs, ty, tx);  // dP^T = V dO^T

            const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                              (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
            for (int i = 0; i < CM; ++i) {
                const int c = k0 + ty + 16 * i;
#pragma unroll
                for (int j = 0; j < RN; ++j) {
                    const int rl = tx + 16 * j, r = q0 + rl;
                    float p = LSE2 ? exp2f(fmaf(st[i][j], scale_log2, -Ls[rl]))
                                   : exp2f(st[i][j] * scale_log2 - Ls[rl]);
                    if (edge && !(r < Tq && visible(r, c, Tk, shift, causal))) p = 0.f;
                    PTs[(ty + 16 * i) * LDT + rl] = p;
                    DSTs[(ty + 16 * i) * LDT + rl] = p * (dpt[i][j] - Dd[rl]);
                }
            }
            __syncthreads();
            simt_ab<CM, BR, D, LDT, LD>(dva, PTs, dOs, ty, tx);  // dV += P^T dO
            simt_ab<CM, BR, D, LDT, LD>(dka, DSTs, Qs, ty, tx);  // dK += dS^T Q
        }
    }

#pragma unroll
    for (int i = 0; i < CM; ++i) {
        const int c = k0 + ty + 16 * i;
        if (c < Tk) {
            const long long row = (long long)bkv * Tk + c;
            simt_store_row<DT, D>(dk + row * D, dka[i], scale, tx);
            simt_store_row<DT, D>(dv + row * D, dva[i], 1.f, tx);
        }
    }
}

// ===================================================================== SIMT backward: dq
// Block: BR queries of one (batch, head); loops over the visible key tiles.
//   S = Q K^T, P = exp2(S * scale_log2 - lse2), dP = dO V^T, dS = P (dP - delta),
//   dQ += dS K   (times scale at the end)
// Shared: Qs, dOs [BR][D+4]; Ks, Vs [BC][D+4]; DSs [BR][BC+16]. LSE2: as in dkdv_simt.
template <class DT, int D, int BR, int BC, bool LSE2 = false>
__device__ __forceinline__ void dq_simt(const typename DT::T* __restrict__ q,
                                        const typename DT::T* __restrict__ k,
                                        const typename DT::T* __restrict__ v,
                                        const typename DT::T* __restrict__ dout,
                                        const float* __restrict__ lse,
                                        const float* __restrict__ delta,
                                        typename DT::T* __restrict__ dq, int H, int Hkv, int Tq,
                                        int Tk, float scale, float scale_log2, int causal) {
    constexpr int NT = 256, LD = D + 4, LDP = BC + 16;
    constexpr int RM = BR / 16, CN = BC / 16, DN = D / 16;
    static_assert(BR % 16 == 0 && BC % 16 == 0 && D % 32 == 0, "tile shape");
    float* Qs = reinterpret_cast<float*>(fa_smem);  // [BR][LD]
    float* dOs = Qs + BR * LD;                        // [BR][LD]
    float* Ks = dOs + BR * LD;                        // [BC][LD]
    float* Vs = Ks + BC * LD;                         // [BC][LD]
    float* DSs = Vs + BC * LD;                        // [BR][LDP]
    require_smem(4u * (2 * BR * LD + 2 * BC * LD + BR * LDP));

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const typename DT::T* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const typename DT::T* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);

    simt_load_tile<DT, D, BR, LD, NT>(Qs, q + (long long)bh * Tq * D, q0, Tq, tid);
    simt_load_tile<DT, D, BR, LD, NT>(dOs, dout + (long long)bh * Tq * D, q0, Tq, tid);

    float L[RM], Dr[RM], acc[RM][DN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int r = q0 + ty + 16 * i;
        L[i] = FA_POS_INF;
        Dr[i] = 0.f;
        if (r < Tq) {
            const float x = lse[(long long)bh * Tq + r];
            if constexpr (LSE2) L[i] = x;
            else if (x != FA_NEG_INF) L[i] = x * FA_LOG2E;
            Dr[i] = delta[(long long)bh * Tq + r];
        }
#pragma unroll
        for (int n = 0; n < DN; ++n) acc[i][n] = 0.f;
    }

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        __syncthreads();  // previous Ks, Vs, DSs consumed (and Qs, dOs written)
        simt_load_tile<DT, D, BC, LD, NT>(Ks, kb, k0, Tk, tid);
        simt_load_tile<DT, D, BC, LD, NT>(Vs, vb, k0, Tk, tid);
        __syncthreads();

        float s[RM][CN], dp[RM][CN];
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int j = 0; j < CN; ++j) s[i][j] = dp[i][j] = 0.f;
        simt_abt<RM, CN, D, LD>(s, Qs, Ks, ty, tx);    // S  = Q K^T
        simt_abt<RM, CN, D, LD>(dp, dOs, Vs, ty, tx);  // dP = dO V^T

        const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                          (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int i = 0; i < RM; ++i) {
            const int r = q0 + ty + 16 * i;
#pragma unroll
            for (int j = 0; j < CN; ++j) {
                float p = LSE2 ? exp2f(fmaf(s[i][j], scale_log2, -L[i]))
                               : exp2f(s[i][j] * scale_log2 - L[i]);
                if (edge && !(r < Tq && visible(r, k0 + tx + 16 * j, Tk, shift, causal))) p = 0.f;
                DSs[(ty + 16 * i) * LDP + tx + 16 * j] = p * (dp[i][j] - Dr[i]);
            }
        }
        __syncthreads();
        simt_ab<RM, BC, D, LDP, LD>(acc, DSs, Ks, ty, tx);  // dQ += dS K
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int r = q0 + ty + 16 * i;
        if (r < Tq) simt_store_row<DT, D>(dq + ((long long)bh * Tq + r) * D, acc[i], scale, tx);
    }
}

// ===================================================================== tensor-core building blocks
// mma.sync.aligned.m16n8k16.row.col, fp32 accumulators. Per lane: g = lane / 4, t = lane % 4.
//   A (16 x 16, 4 regs):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                         a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, 2 regs):   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C (16 x 8, 4 floats): c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// (each register holds the lower-indexed element in its low 16 bits). Two adjacent
// C tiles (columns 16 kk .. 16 kk + 15) hold, lane by lane, exactly the A fragment of
// that 16 x 16 block, which is how P and dS go from one product into the next without
// shared memory. Shared tiles are 16-bit with rows padded by 8 elements (16 bytes), so
// the 8 rows of each 8 x 8 matrix that ldmatrix reads fall in distinct bank groups.

template <class DT> __device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4],
                                                             u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<F16>(float (&c)[4], const u32 (&a)[4],
                                                          u32 b0, u32 b1) {
#ifdef FA_HOST_EMULATION
    fa_emu_mma16816(c, a, b0, b1, false);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <> __device__ __forceinline__ void mma16816<BF16>(float (&c)[4], const u32 (&a)[4],
                                                           u32 b0, u32 b1) {
#ifdef FA_HOST_EMULATION
    fa_emu_mma16816(c, a, b0, b1, true);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Fragment loads from 16-bit shared tiles. With FA_LDMATRIX (the default) one
// ldmatrix.x4 fetches four 8 x 8 matrices: lane L gives the address of row L % 8 of
// matrix L / 8, and register i of every lane receives its part of matrix i, in the
// mma layout above: (row L / 4, columns 2 (L % 4), +1) as stored, or with .trans
// (rows 2 (L % 4), +1, column L / 4) as stored, i.e. the transpose. FA_LDMATRIX=0 uses
// plain 32- and 16-bit loads instead (the same values, more instructions).
#ifndef FA_LDMATRIX
#define FA_LDMATRIX 1
#endif

__device__ __forceinline__ u32 lds32(const u16* p) { return *reinterpret_cast<const u32*>(p); }

#if FA_LDMATRIX
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const u16* p) {
#ifdef FA_HOST_EMULATION
    fa_emu_ldmatrix_x4(r, p, false);
#else
    const u32 addr = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const u16* p) {
#ifdef FA_HOST_EMULATION
    fa_emu_ldmatrix_x4(r, p, true);
#else
    const u32 addr = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#endif
}
#endif

// A fragment of the 16 x 16 block A[m][kk] = T[(m0 + m) * ld + k0 + kk]  (T row-major).
// ldmatrix: matrix i covers rows m0 + 8 (i & 1) .., columns k0 + 8 (i >> 1) .. -> a[i].
__device__ __forceinline__ void load_a(u32 (&a)[4], const u16* T, int ld, int m0, int k0,
                                       int lane) {
#if FA_LDMATRIX
    ldsm_x4(a, T + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8);
#else
    const u16* p = T + (m0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
    a[0] = lds32(p);
    a[1] = lds32(p + 8 * ld);
    a[2] = lds32(p + 8);
    a[3] = lds32(p + 8 * ld + 8);
#endif
}

// B fragments of two adjacent 16 x 8 tiles (columns n0 .. n0 + 7 -> b[0], b[1] and
// n0 + 8 .. n0 + 15 -> b[2], b[3]) of B[kk][n] = T[(n0 + n) * ld + k0 + kk]: T stores
// B^T row-major, e.g. K for S = Q K^T (B[d][key] = K[key][d]).
// ldmatrix: matrix i covers rows n0 + 8 (i >> 1) .., columns k0 + 8 (i & 1) .. -> b[i].
__device__ __forceinline__ void load_b2_trans(u32 (&b)[4], const u16* T, int ld, int n0, int k0,
                                              int lane) {
#if FA_LDMATRIX
    ldsm_x4(b, T + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
#else
    const u16* p = T + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
    b[0] = lds32(p);
    b[1] = lds32(p + 8);
    b[2] = lds32(p + 8 * ld);
    b[3] = lds32(p + 8 * ld + 8);
#endif
}

// The same for B[kk][n] = T[(k0 + kk) * ld + n0 + n]: T stores B row-major, e.g. V for
// O = P V (B[key][d] = V[key][d]); the two halves of a register come from two rows.
// ldmatrix.trans: matrix i covers rows k0 + 8 (i & 1) .., columns n0 + 8 (i >> 1) ..
__device__ __forceinline__ void load_b2_rows(u32 (&b)[4], const u16* T, int ld, int k0, int n0,
                                             int lane) {
#if FA_LDMATRIX
    ldsm_x4_trans(b, T + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
#else
    const u16* p = T + (k0 + 2 * (lane & 3)) * ld + n0 + (lane >> 2);
    b[0] = (u32)p[0] | ((u32)p[ld] << 16);
    b[1] = (u32)p[8 * ld] | ((u32)p[9 * ld] << 16);
    b[2] = (u32)p[8] | ((u32)p[ld + 8] << 16);
    b[3] = (u32)p[8 * ld + 8] | ((u32)p[9 * ld + 8] << 16);
#endif
}

// The A fragment of the 16 x 16 block made of C tiles c[2 kp] and c[2 kp + 1].
template <class DT>
__device__ __forceinline__ void c_to_a(u32 (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack2_f32<DT>(c0[0], c0[1]);
    a[1] = pack2_f32<DT>(c0[2], c0[3]);
    a[2] = pack2_f32<DT>(c1[0], c1[1]);
    a[3] = pack2_f32<DT>(c1[2], c1[3]);
}

// dst[r][c] = src[(row0 + r) * D + c], r < ROWS, c < D, 16-byte copies; rows past nrows are 0.
template <int D, int ROWS, int LDH, int NT>
__device__ __forceinline__ void mma_load_tile(u16* dst, const u16* __restrict__ src, int row0,
                                              int nrows, int tid) {
    constexpr int C8 = D / 8;
#pragma unroll 4
    for (int i = tid; i < ROWS * C8; i += NT) {
        const int r = i / C8, c = (i % C8) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < nrows)
            x = *reinterpret_cast<const uint4*>(src + (long long)(row0 + r) * D + c);
        *reinterpret_cast<uint4*>(dst + r * LDH + c) = x;
    }
}

// Store the 16 x D fragment rows of one warp: row (g or g + 8) of acc tiles, times mult.
template <class DT, int D>
__device__ __forceinline__ void mma_store_row(u16* dst, const float (&acc)[D / 8][4], int half,
                                              float mult, int t) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
        *reinterpret_cast<u32*>(dst + nt * 8 + 2 * t) =
            pack2_f32<DT>(acc[nt][2 * half] * mult, acc[nt][2 * half + 1] * mult);
}

// ===================================================================== tensor-core forward
// Block: BR = 64 query rows (warp w owns rows 16 w .. 16 w + 15); loop over key tiles of BC.
// Shared: Qs[64][D+8], Ks[BC][D+8], Vs[BC][D+8] (16-bit). Q fragments stay in registers.
// Lane (g, t) holds rows g and g + 8 of its warp's slice ("half" 0 and 1 below).
template <class DT, int D, int BC>
__device__ __forceinline__ void fwd_mma(const u16* __restrict__ q, const u16* __restrict__ k,
                                        const u16* __restrict__ v, u16* __restrict__ o,
                                        float* __restrict__ lse, int H, int Hkv, int Tq, int Tk,
                                        float scale_log2, int causal) {
    constexpr int NT = 128, BR = 64, LDH = D + 8;
    constexpr int KD = D / 16, NS = BC / 8, NO = D / 8, KP = BC / 16;
    static_assert(BC % 16 == 0 && D % 16 == 0, "tile shape");
    u16* Qs = reinterpret_cast<u16*>(fa_smem);  // [BR][LDH]
    u16* Ks = Qs + BR * LDH;                      // [BC][LDH]
    u16* Vs = Ks + BC * LDH;                      // [BC][LDH]
    require_smem(2u * (BR + 2 * BC) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const u16* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const u16* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);
    const int r_lo = q0 + warp * 16 + g;  // rows of half 0 and half 1: r_lo, r_lo + 8

    mma_load_tile<D, BR, LDH, NT>(Qs, q + (long long)bh * Tq * D, q0, Tq, tid);
    __syncthreads();
    u32 qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) load_a(qf[kk], Qs, LDH, warp * 16, kk * 16, lane);

    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.f, 0.f};
    float oacc[NO][4];
#pragma unroll
    for (int nt = 0; nt < NO; ++nt) oacc[nt][0] = oacc[nt][1] = oacc[nt][2] = oacc[nt][3] = 0.f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        __syncthreads();  // every warp is done with the previous Ks, Vs
        mma_load_tile<D, BC, LDH, NT>(Ks, kb, k0, Tk, tid);
        mma_load_tile<D, BC, LDH, NT>(Vs, vb, k0, Tk, tid);
        __syncthreads();

        float s[NS][4];  // S = Q K^T for this warp's 16 rows x BC keys
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int nt = 0; nt < NS; nt += 2) {
                u32 b[4];
                load_b2_trans(b, Ks, LDH, nt * 8, kk * 16, lane);
                mma16816<DT>(s[nt], qf[kk], b[0], b[1]);
                mma16816<DT>(s[nt + 1], qf[kk], b[2], b[3]);
            }
        }

        const bool edge = (k0 + BC > Tk) || (causal && k0 + BC - 1 > q0 + shift);
        float mx[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e >> 1;
                float x = s[nt][e] * scale_log2;
                const int c = k0 + nt * 8 + 2 * t + (e & 1);
                if (edge && !visible(r_lo + 8 * half, c, Tk, shift, causal)) x = FA_NEG_INF;
                s[nt][e] = x;
                mx[half] = fmaxf(mx[half], x);
            }
        }
        float mu[2], alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float m_new = fmaxf(m[half], allreduce_max4(mx[half]));
            mu[half] = (m_new == FA_NEG_INF) ? 0.f : m_new;
            alpha[half] = exp2f(m[half] - mu[half]);
            m[half] = m_new;
        }
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - mu[e >> 1]);
                s[nt][e] = p;
                rs[e >> 1] += p;
            }
        }
        l[0] = l[0] * alpha[0] + rs[0];
        l[1] = l[1] * alpha[1] + rs[1];
#pragma unroll
        for (int nt = 0; nt < NO; ++nt) {
            oacc[nt][0] *= alpha[0];
            oacc[nt][1] *= alpha[0];
            oacc[nt][2] *= alpha[1];
            oacc[nt][3] *= alpha[1];
        }
#pragma unroll
        for (int kp = 0; kp < KP; ++kp) {  // O += P V, P straight from the S fragments
            u32 a[4];
            c_to_a<DT>(a, s[2 * kp], s[2 * kp + 1]);
#pragma unroll
            for (int nt = 0; nt < NO; nt += 2) {
                u32 b[4];
                load_b2_rows(b, Vs, LDH, kp * 16, nt * 8, lane);
                mma16816<DT>(oacc[nt], a, b[0], b[1]);
                mma16816<DT>(oacc[nt + 1], a, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float lt = allreduce_sum4(l[half]);
        const int r = r_lo + 8 * half;
        if (r < Tq) {
            const long long row = (long long)bh * Tq + r;
            mma_store_row<DT, D>(o + row * D, oacc, half, lt > 0.f ? 1.f / lt : 0.f, t);
            if (t == 0) lse[row] = lt > 0.f ? (m[half] + log2f(lt)) * FA_LN2 : FA_NEG_INF;
        }
    }
}

// ============================================================ tensor-core backward: dk, dv
// Block: BC = 64 keys (warp w owns keys 16 w .. 16 w + 15), looping over the group's
// query heads and the query tiles (BR rows) that see them. Per warp, with keys as rows:
//   S^T = K Q^T, dP^T = V dO^T (16 x BR), P^T, dS^T elementwise, then
//   dV += P^T dO and dK += dS^T Q with P^T, dS^T fed from registers.
// Shared: Ls, Dd [BR] float; Ks, Vs [64][D+8]; Qs, dOs [BR][D+8] (16-bit).
template <class DT, int D, int BR>
__device__ __forceinline__ void dkdv_mma(const u16* __restrict__ q, const u16* __restrict__ k,
                                         const u16* __restrict__ v, const u16* __restrict__ dout,
                                         const float* __restrict__ lse,
                                         const float* __restrict__ delta, u16* __restrict__ dk,
                                         u16* __restrict__ dv, int H, int Hkv, int Tq, int Tk,
                                         float scale, float scale_log2, int causal) {
    constexpr int NT = 128, BC = 64, LDH = D + 8;
    constexpr int KD = D / 16, NS = BR / 8, NO = D / 8, KP = BR / 16;
    static_assert(BR % 16 == 0 && D % 16 == 0, "tile shape");
    float* Ls = reinterpret_cast<float*>(fa_smem);  // [BR]
    float* Dd = Ls + BR;                              // [BR]
    u16* Ks = reinterpret_cast<u16*>(Dd + BR);        // [BC][LDH]   (offset 8 BR bytes: 16-aligned)
    u16* Vs = Ks + BC * LDH;                          // [BC][LDH]
    u16* Qs = Vs + BC * LDH;                          // [BR][LDH]
    u16* dOs = Qs + BR * LDH;                         // [BR][LDH]
    require_smem(8u * BR + 2u * (2 * BC + 2 * BR) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * BC;
    const int bkv = blockIdx.y, b = bkv / Hkv, hk = bkv - b * Hkv, group = H / Hkv;
    const int shift = Tk - Tq;
    const int c_lo = k0 + warp * 16 + g;  // keys of half 0 and half 1: c_lo, c_lo + 8
    mma_load_tile<D, BC, LDH, NT>(Ks, k + (long long)bkv * Tk * D, k0, Tk, tid);
    mma_load_tile<D, BC, LDH, NT>(Vs, v + (long long)bkv * Tk * D, k0, Tk, tid);

    float dka[NO][4], dva[NO][4];
#pragma unroll
    for (int nt = 0; nt < NO; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[nt][e] = dva[nt][e] = 0.f;

    const int nq = (Tq + BR - 1) / BR;
    const int qt_first = first_query_tile<BR>(k0, Tq, Tk, causal);
    for (int gi = 0; gi < group; ++gi) {
        const int bh = b * H + hk * group + gi;
        const u16* qb = q + (long long)bh * Tq * D;
        const u16* dob = dout + (long long)bh * Tq * D;
        const float* lseb = lse + (long long)bh * Tq;
        const float* deltab = delta + (long long)bh * Tq;
        for (int qt = qt_first; qt < nq; ++qt) {
            const int q0 = qt * BR;
            __syncthreads();  // previous Qs, dOs, Ls, Dd consumed (and Ks, Vs written)
            mma_load_tile<D, BR, LDH, NT>(Qs, qb, q0, Tq, tid);
            mma_load_tile<D, BR, LDH, NT>(dOs, dob, q0, Tq, tid);
            for (int r = tid; r < BR; r += NT) {
                float L = FA_POS_INF, dd = 0.f;
                if (q0 + r < Tq) {
                    const float x = lseb[q0 + r];
                    if (x != FA_NEG_INF) L = x * FA_LOG2E;
                    dd = deltab[q0 + r];
                }
                Ls[r] = L;
                Dd[r] = dd;
            }
            __syncthreads();

            float st[NS][4], dpt[NS][4];  // this warp's 16 keys x BR queries
#pragma unroll
            for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                u32 a[4];
                load_a(a, Ks, LDH, warp * 16, kk * 16, lane);
#pragma unroll
                for (int nt = 0; nt < NS; nt += 2) {  // S^T = K Q^T: B[d][query] = Q[query][d]
                    u32 b[4];
                    load_b2_trans(b, Qs, LDH, nt * 8, kk * 16, lane);
                    mma16816<DT>(st[nt], a, b[0], b[1]);
                    mma16816<DT>(st[nt + 1], a, b[2], b[3]);
                }
                load_a(a, Vs, LDH, warp * 16, kk * 16, lane);
#pragma unroll
                for (int nt = 0; nt < NS; nt += 2) {  // dP^T = V dO^T
                    u32 b[4];
                    load_b2_trans(b, dOs, LDH, nt * 8, kk * 16, lane);
                    mma16816<DT>(dpt[nt], a, b[0], b[1]);
                    mma16816<DT>(dpt[nt + 1], a, b[2], b[3]);
                }
            }

            const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                              (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = c_lo + 8 * (e >> 1);
                    const int rl = nt * 8 + 2 * t + (e & 1), r = q0 + rl;
                    float p = exp2f(st[nt][e] * scale_log2 - Ls[rl]);
                    if (edge && !(r < Tq && visible(r, c, Tk, shift, causal))) p = 0.f;
                    st[nt][e] = p;                          // P^T
                    dpt[nt][e] = p * (dpt[nt][e] - Dd[rl]);  // dS^T
                }
            }
#pragma unroll
            for (int kp = 0; kp < KP; ++kp) {
                u32 a[4];
                c_to_a<DT>(a, st[2 * kp], st[2 * kp + 1]);
#pragma unroll
                for (int nt = 0; nt < NO; nt += 2) {  // dV += P^T dO: B[query][d] = dO[query][d]
                    u32 b[4];
                    load_b2_rows(b, dOs, LDH, kp * 16, nt * 8, lane);
                    mma16816<DT>(dva[nt], a, b[0], b[1]);
                    mma16816<DT>(dva[nt + 1], a, b[2], b[3]);
                }
                c_to_a<DT>(a, dpt[2 * kp], dpt[2 * kp + 1]);
#pragma unroll
                for (int nt = 0; nt < NO; nt += 2) {  // dK += dS^T Q
                    u32 b[4];
                    load_b2_rows(b, Qs, LDH, kp * 16, nt * 8, lane);
                    mma16816<DT>(dka[nt], a, b[0], b[1]);
                    mma16816<DT>(dka[nt + 1], a, b[2], b[3]);
                }
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int c = c_lo + 8 * half;
        if (c < Tk) {
            const long long row = (long long)bkv * Tk + c;
            mma_store_row<DT, D>(dk + row * D, dka, half, scale, t);
            mma_store_row<DT, D>(dv + row * D, dva, half, 1.f, t);
        }
    }
}

// ===================================================================== tensor-core backward: dq
// Block: BR = 64 queries (warp w owns rows 16 w .. 16 w + 15); loop over key tiles of BC.
//   S = Q K^T, dP = dO V^T, P, dS elementwise, dQ += dS K with dS fed from registers.
// Shared: Qs, dOs [64][D+8]; Ks, Vs [BC][D+8] (16-bit).
template <class DT, int D, int BC>
__device__ __forceinline__ void dq_mma(const u16* __restrict__ q, const u16* __restrict__ k,
                                       const u16* __restrict__ v, const u16* __restrict__ dout,
                                       const float* __restrict__ lse,
                                       const float* __restrict__ delta,
                                       u16* __restrict__ dq, int H, int Hkv, int Tq, int Tk,
                                       float scale, float scale_log2, int causal) {
    constexpr int NT = 128, BR = 64, LDH = D + 8;
    constexpr int KD = D / 16, NS = BC / 8, NO = D / 8, KP = BC / 16;
    static_assert(BC % 16 == 0 && D % 16 == 0, "tile shape");
    u16* Qs = reinterpret_cast<u16*>(fa_smem);  // [BR][LDH]
    u16* dOs = Qs + BR * LDH;                     // [BR][LDH]
    u16* Ks = dOs + BR * LDH;                     // [BC][LDH]
    u16* Vs = Ks + BC * LDH;                      // [BC][LDH]
    require_smem(2u * (2 * BR + 2 * BC) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const u16* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const u16* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);
    const int r_lo = q0 + warp * 16 + g;

    mma_load_tile<D, BR, LDH, NT>(Qs, q + (long long)bh * Tq * D, q0, Tq, tid);
    mma_load_tile<D, BR, LDH, NT>(dOs, dout + (long long)bh * Tq * D, q0, Tq, tid);

    float L[2], Dr[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lo + 8 * half;
        L[half] = FA_POS_INF;
        Dr[half] = 0.f;
        if (r < Tq) {
            const float x = lse[(long long)bh * Tq + r];
            if (x != FA_NEG_INF) L[half] = x * FA_LOG2E;
            Dr[half] = delta[(long long)bh * Tq + r];
        }
    }
    float dqa[NO][4];
#pragma unroll
    for (int nt = 0; nt < NO; ++nt) dqa[nt][0] = dqa[nt][1] = dqa[nt][2] = dqa[nt][3] = 0.f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        __syncthreads();  // previous Ks, Vs consumed (and Qs, dOs written)
        mma_load_tile<D, BC, LDH, NT>(Ks, kb, k0, Tk, tid);
        mma_load_tile<D, BC, LDH, NT>(Vs, vb, k0, Tk, tid);
        __syncthreads();

        float s[NS][4], dp[NS][4];
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            u32 a[4];
            load_a(a, Qs, LDH, warp * 16, kk * 16, lane);
#pragma unroll
            for (int nt = 0; nt < NS; nt += 2) {  // S = Q K^T
                u32 b[4];
                load_b2_trans(b, Ks, LDH, nt * 8, kk * 16, lane);
                mma16816<DT>(s[nt], a, b[0], b[1]);
                mma16816<DT>(s[nt + 1], a, b[2], b[3]);
            }
            load_a(a, dOs, LDH, warp * 16, kk * 16, lane);
#pragma unroll
            for (int nt = 0; nt < NS; nt += 2) {  // dP = dO V^T
                u32 b[4];
                load_b2_trans(b, Vs, LDH, nt * 8, kk * 16, lane);
                mma16816<DT>(dp[nt], a, b[0], b[1]);
                mma16816<DT>(dp[nt + 1], a, b[2], b[3]);
            }
        }

        const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                          (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e >> 1, r = r_lo + 8 * half;
                const int c = k0 + nt * 8 + 2 * t + (e & 1);
                float p = exp2f(s[nt][e] * scale_log2 - L[half]);
                if (edge && !(r < Tq && visible(r, c, Tk, shift, causal))) p = 0.f;
                dp[nt][e] = p * (dp[nt][e] - Dr[half]);  // dS
            }
        }
#pragma unroll
        for (int kp = 0; kp < KP; ++kp) {  // dQ += dS K: B[key][d] = K[key][d]
            u32 a[4];
            c_to_a<DT>(a, dp[2 * kp], dp[2 * kp + 1]);
#pragma unroll
            for (int nt = 0; nt < NO; nt += 2) {
                u32 b[4];
                load_b2_rows(b, Ks, LDH, kp * 16, nt * 8, lane);
                mma16816<DT>(dqa[nt], a, b[0], b[1]);
                mma16816<DT>(dqa[nt + 1], a, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lo + 8 * half;
        if (r < Tq) mma_store_row<DT, D>(dq + ((long long)bh * Tq + r) * D, dqa, half, scale, t);
    }
}

// ===================================================================== v2: cp.async
// Variant v2 of the tensor-core kernels (the v1 kernels above stay as they were
// verified; the launcher picks, see flash_attention.py). What changes:
//   - tiles stream global -> shared with cp.async (sm_80+) into two stages: the next
//     tile is in flight while the current one is computed; one __syncthreads per tile;
//   - the forward gives each warp MT m-tiles (16 MT query rows), so every K / V
//     fragment read from shared memory feeds MT tensor-core products;
//   - exponents are one FFMA: exp2(s * scale_log2 - m) with the max kept in raw score
//     units (forward; needs scale > 0) or the row's lse already in base 2 (backward,
//     lse2 from fa_bwd_pre2);
//   - fragments that a warp reuses over the whole loop stay in registers (Q in the
//     forward, K and V in dk/dv, Q and dO in dq) where registers allow (FA_MMA2_*REGS).
//
// cp.async: each thread copies 16-byte (or 4-byte) chunks global -> shared without
// going through registers. A thread's copies form a group at cp_async_commit(), and
// cp_async_wait<N>() returns once at most N of ITS groups are in flight. Completion is
// per thread, so a chunk that thread A copied may be read by thread B only after A's
// wait and a __syncthreads() that A reaches after its wait and B before its read; and a
// buffer may be refilled only after a __syncthreads() that every reader of its old
// contents has passed. The loops below all have this shape:
//
//     issue tile 0 -> stage 0; commit; wait<0>; __syncthreads()
//     for it: if it > 0: wait<0>; __syncthreads()    (tile it landed; every thread is
//                                                    past its reads of tile it - 1)
//             issue tile it + 1 -> stage (it + 1) & 1; commit     (overlaps compute)
//             compute on stage it & 1
//     wait<0>                                        (nothing in flight at exit)
//
// Bytes past src_bytes are zero-filled: src_bytes = 0 reads nothing and stores zeros
// (padding rows of a tile; the source address is then clamped to a valid row anyway).

__device__ __forceinline__ void cp_async16(void* dst, const void* src, u32 src_bytes) {
#ifdef FA_HOST_EMULATION
    fa_emu_cp_async(dst, src, 16, src_bytes);
#else
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, u32 src_bytes) {
#ifdef FA_HOST_EMULATION
    fa_emu_cp_async(dst, src, 4, src_bytes);
#else
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(d), "l"(src), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef FA_HOST_EMULATION
    fa_emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef FA_HOST_EMULATION
    fa_emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

// dst[r][c] = src[(row0 + r) * D + c] (16-bit), r < ROWS, c < D, in 16-byte cp.async
// chunks; rows at or past nrows become 0. Exactly ROWS * D / 8 / NT chunks per thread.
template <int D, int ROWS, int LDH, int NT>
__device__ __forceinline__ void mma_load_tile_async(u16* dst, const u16* __restrict__ src, int row0,
                                                    int nrows, int tid) {
    constexpr int C8 = D / 8, N = ROWS * C8;
    static_assert(N % NT == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int j = 0; j < N / NT; ++j) {
        const int i = tid + j * NT, r = i / C8, c = (i % C8) * 8;
        const bool ok = row0 + r < nrows;
        cp_async16(dst + r * LDH + c, src + (long long)(ok ? row0 + r : 0) * D + c, ok ? 16u : 0u);
    }
}

// dst[r] = src[row0 + r] (float32), r < ROWS, one 4-byte cp.async each; 0 past nrows.
template <int ROWS, int NT>
__device__ __forceinline__ void load_rows_async(float* dst, const float* __restrict__ src, int row0,
                                                int nrows, int tid) {
    for (int r = tid; r < ROWS; r += NT) {
        const bool ok = row0 + r < nrows;
        cp_async4(dst + r, src + (ok ? row0 + r : 0), ok ? 4u : 0u);
    }
}

// ===================================================================== v2: warp-level products
// One warp, MT m-tiles of 16 rows. Fragment layouts as in the tensor-core building
// blocks above; "acc[mt][nt]" is the 16 x 8 C tile nt of m-tile mt.

// acc[mt][nt] += A_mt B^T over 16 KD columns: A_mt = rows a_row0 + 16 mt .. + 15 of As
// (row-major, leading dim lda), B^T row-major in Bt: B[kk][n] = Bt[n * ldb + kk], n < 8 NS.
template <class DT, int MT, int KD, int NS>
__device__ __forceinline__ void warp_abt_smem(float (&acc)[MT][NS][4], const u16* As, int lda,
                                              int a_row0, const u16* Bt, int ldb, int lane) {
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a(a[mt], As, lda, a_row0 + 16 * mt, kk * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NS; nt += 2) {
            u32 b[4];
            load_b2_trans(b, Bt, ldb, nt * 8, kk * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816<DT>(acc[mt][nt], a[mt], b[0], b[1]);
                mma16816<DT>(acc[mt][nt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The same with A already in registers: af[mt][kk] is the A fragment of m-tile mt,
// columns 16 kk .. 16 kk + 15.
template <class DT, int MT, int KD, int NS>
__device__ __forceinline__ void warp_abt_regs(float (&acc)[MT][NS][4], const u32 (&af)[MT][KD][4],
                                              const u16* Bt, int ldb, int lane) {
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int nt = 0; nt < NS; nt += 2) {
            u32 b[4];
            load_b2_trans(b, Bt, ldb, nt * 8, kk * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816<DT>(acc[mt][nt], af[mt][kk], b[0], b[1]);
                mma16816<DT>(acc[mt][nt + 1], af[mt][kk], b[2], b[3]);
            }
        }
    }
}

// af[mt][kk] = A fragments of rows a_row0 + 16 mt .., all 16 KD columns, of As.
template <int MT, int KD>
__device__ __forceinline__ void load_a_frags(u32 (&af)[MT][KD][4], const u16* As, int lda,
                                             int a_row0, int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            load_a(af[mt][kk], As, lda, a_row0 + 16 * mt, kk * 16, lane);
}

// acc[mt][nt] += P_mt B over 16 KP rows of B: P_mt (16 x 16 KP) is the C tiles p[mt][..]
// rounded to DT (the A fragment of columns 16 kp .. is p[mt][2 kp], p[mt][2 kp + 1]);
// B row-major in Bs: B[kk][n] = Bs[kk * ldb + n], n < 8 NO.
template <class DT, int MT, int KP, int NO>
__device__ __forceinline__ void warp_pb(float (&acc)[MT][NO][4], const float (&p)[MT][2 * KP][4],
                                        const u16* Bs, int ldb, int lane) {
#pragma unroll
    for (int kp = 0; kp < KP; ++kp) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) c_to_a<DT>(a[mt], p[mt][2 * kp], p[mt][2 * kp + 1]);
#pragma unroll
        for (int nt = 0; nt < NO; nt += 2) {
            u32 b[4];
            load_b2_rows(b, Bs, ldb, kp * 16, nt * 8, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816<DT>(acc[mt][nt], a[mt], b[0], b[1]);
                mma16816<DT>(acc[mt][nt + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

template <int MT, int N>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][N][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
}

// ===================================================================== v2: tensor-core forward
// Block: BR = 64 MT query rows, 4 warps; warp w owns rows 16 MT w .. 16 MT (w + 1) - 1 as
// MT m-tiles. Key tiles of BC stream through two shared stages.
// Shared (16-bit): Qs[BR][D+8], then per stage s (0, 1): Ks[BC][D+8], Vs[BC][D+8].
// Running max m is in raw score units (so s * scale_log2 - m * scale_log2 is one FFMA;
// scale_log2 > 0 is required, the launcher uses v1 otherwise).
template <class DT, int D, int MT, int BC, bool QREGS>
__device__ __forceinline__ void fwd_mma2(const u16* __restrict__ q, const u16* __restrict__ k,
                                         const u16* __restrict__ v, u16* __restrict__ o,
                                         float* __restrict__ lse, int H, int Hkv, int Tq, int Tk,
                                         float scale_log2, int causal) {
    constexpr int NT = 128, BR = 64 * MT, LDH = D + 8;
    constexpr int KD = D / 16, NS = BC / 8, NO = D / 8, KP = BC / 16;
    static_assert(BC % 16 == 0 && D % 16 == 0, "tile shape");
    u16* Qs = reinterpret_cast<u16*>(fa_smem);  // [BR][LDH]
    u16* KV = Qs + BR * LDH;                      // stage s: K at KV + 2 s BC LDH, V after it
    require_smem(2u * (BR + 4 * BC) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // heaviest (causal) tiles first
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const u16* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const u16* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);
    const int wrow = warp * 16 * MT;  // this warp's first row in the tile
    const int r_lo = q0 + wrow + g;   // row of (mt, half): r_lo + 16 mt + 8 half

    mma_load_tile_async<D, BR, LDH, NT>(Qs, q + (long long)bh * Tq * D, q0, Tq, tid);
    if (n_kt > 0) {
        mma_load_tile_async<D, BC, LDH, NT>(KV, kb, 0, Tk, tid);
        mma_load_tile_async<D, BC, LDH, NT>(KV + BC * LDH, vb, 0, Tk, tid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[QREGS ? MT : 1][QREGS ? KD : 1][4];  // used when QREGS
    if constexpr (QREGS) load_a_frags<MT, KD>(qf, Qs, LDH, wrow, lane);

    float m[MT][2], l[MT][2], oacc[MT][NO][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = FA_NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }
    zero_acc(oacc);

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        if (kt > 0) {
            cp_async_wait<0>();  // my copies of tile kt have landed
            __syncthreads();     // everyone's have; everyone is done with tile kt - 1
        }
        if (kt + 1 < n_kt) {  // tile kt + 1 into the stage tile kt - 1 used
            u16* nxt = KV + ((kt + 1) & 1) * 2 * BC * LDH;
            mma_load_tile_async<D, BC, LDH, NT>(nxt, kb, k0 + BC, Tk, tid);
            mma_load_tile_async<D, BC, LDH, NT>(nxt + BC * LDH, vb, k0 + BC, Tk, tid);
        }
        cp_async_commit();
        const u16* Ks = KV + (kt & 1) * 2 * BC * LDH;
        const u16* Vs = Ks + BC * LDH;

        float s[MT][NS][4];  // raw scores Q K^T, this warp's 16 MT rows x BC keys
        zero_acc(s);
        if constexpr (QREGS) warp_abt_regs<DT, MT, KD, NS>(s, qf, Ks, LDH, lane);
        else warp_abt_smem<DT, MT, KD, NS>(s, Qs, LDH, wrow, Ks, LDH, lane);

        const bool edge = (k0 + BC > Tk) || (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = k0 + nt * 8 + 2 * t + (e & 1);
                    if (edge && !visible(r_lo + 16 * mt + 8 * (e >> 1), c, Tk, shift, causal))
                        s[mt][nt][e] = FA_NEG_INF;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][nt][e]);
                }
            }
            float mu[2], alpha[2], rs[2] = {0.f, 0.f};  // mu: the max in base-2 units
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float m_new = fmaxf(m[mt][half], allreduce_max4(mx[half]));
                // a row that sees nothing yet: mu = 0 (its p are exp2(-inf) = 0)
                mu[half] = (m_new == FA_NEG_INF) ? 0.f : m_new * scale_log2;
                alpha[half] = exp2f(fmaf(m[mt][half], scale_log2, -mu[half]));  // 0 at first
                m[mt][half] = m_new;
            }
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    // masked: exp2(-inf) = 0
                    const float p = exp2f(fmaf(s[mt][nt][e], scale_log2, -mu[e >> 1]));
                    s[mt][nt][e] = p;
                    rs[e >> 1] += p;
                }
            }
            l[mt][0] = l[mt][0] * alpha[0] + rs[0];
            l[mt][1] = l[mt][1] * alpha[1] + rs[1];
#pragma unroll
            for (int nt = 0; nt < NO; ++nt) {
                oacc[mt][nt][0] *= alpha[0];
                oacc[mt][nt][1] *= alpha[0];
                oacc[mt][nt][2] *= alpha[1];
                oacc[mt][nt][3] *= alpha[1];
            }
        }
        warp_pb<DT, MT, KP, NO>(oacc, s, Vs, LDH, lane);  // O += P V, P from the S fragments
    }
    cp_async_wait<0>();  // nothing in flight at exit (only matters when n_kt == 0)

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float lt = allreduce_sum4(l[mt][half]);
            const int r = r_lo + 16 * mt + 8 * half;
            if (r < Tq) {
                const long long row = (long long)bh * Tq + r;
                mma_store_row<DT, D>(o + row * D, oacc[mt], half, lt > 0.f ? 1.f / lt : 0.f, t);
                if (t == 0)
                    lse[row] = lt > 0.f ? (m[mt][half] * scale_log2 + log2f(lt)) * FA_LN2
                                        : FA_NEG_INF;
            }
        }
    }
}

// ===================================================================== v2: backward pre-pass
// delta[row] = sum_d dO[row][d] * O[row][d], and lse2[row] = lse[row] * log2(e) (+inf
// where lse = -inf: such a row saw no key, and exp2(s - inf) = 0 keeps it out of every
// gradient). One warp per row, 8 rows per block.
template <class DT, int D>
__device__ __forceinline__ void bwd_pre2(const typename DT::T* __restrict__ o,
                                         const typename DT::T* __restrict__ dout,
                                         const float* __restrict__ lse, float* __restrict__ delta,
                                         float* __restrict__ lse2, int nrows) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 8 + warp;
    if (row >= nrows) return;  // whole warp leaves together; no barrier in this kernel
    float acc = 0.f;
#pragma unroll
    for (int c = lane; c < D; c += 32)
        acc = fmaf(to_f32<DT>(o[row * D + c]), to_f32<DT>(dout[row * D + c]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FA_FULL_MASK, acc, off);
    if (lane == 0) {
        delta[row] = acc;
        const float x = lse[row];
        lse2[row] = x == FA_NEG_INF ? FA_POS_INF : x * FA_LOG2E;
    }
}

// Issue the copies of dk/dv work item i (query head gi = i / nqt of the group, query
// tile qt_first + i % nqt) into stage `stage`: its Q and dO tiles (QD + 2 stage BR LDH,
// then dO) and its rows of lse2, delta (LD + 2 stage BR, then delta).
template <int D, int BR>
__device__ __forceinline__ void dkdv2_issue(u16* QD, float* LD, const u16* __restrict__ q,
                                            const u16* __restrict__ dout,
                                            const float* __restrict__ lse2,
                                            const float* __restrict__ delta, int i, int stage,
                                            int nqt, int qt_first, int b, int H, int hk, int group,
                                            int Tq, int tid) {
    constexpr int NT = 128, LDH = D + 8;
    const int gi = i / nqt, q0 = (qt_first + i % nqt) * BR;
    const long long bh = (long long)b * H + hk * group + gi;
    u16* Qs = QD + stage * 2 * BR * LDH;
    float* Ls = LD + stage * 2 * BR;
    mma_load_tile_async<D, BR, LDH, NT>(Qs, q + bh * Tq * D, q0, Tq, tid);
    mma_load_tile_async<D, BR, LDH, NT>(Qs + BR * LDH, dout + bh * Tq * D, q0, Tq, tid);
    load_rows_async<BR, NT>(Ls, lse2 + bh * Tq, q0, Tq, tid);
    load_rows_async<BR, NT>(Ls + BR, delta + bh * Tq, q0, Tq, tid);
}

// ============================================================ v2: tensor-core backward: dk, dv
// Block: BC = 64 keys (warp w owns keys 16 w .. 16 w + 15); loops over the work items
// (query head of the group, query tile of BR rows that sees these keys), streaming each
// item's Q, dO, lse2, delta through two shared stages. Per warp, keys as rows:
//   S^T = K Q^T, dP^T = V dO^T (16 x BR); P^T = exp2(S^T scale_log2 - lse2),
//   dS^T = P^T (dP^T - delta); dV += P^T dO, dK += dS^T Q.
// KVREGS: the warp's K and V fragments stay in registers (D <= 64).
// Shared: per stage s: Ls[BR], Dd[BR] (float); Ks, Vs [64][D+8]; per stage: Qs, dOs [BR][D+8].
template <class DT, int D, int BR, bool KVREGS>
__device__ __forceinline__ void dkdv_mma2(const u16* __restrict__ q, const u16* __restrict__ k,
                                          const u16* __restrict__ v, const u16* __restrict__ dout,
                                          const float* __restrict__ lse2,
                                          const float* __restrict__ delta, u16* __restrict__ dk,
                                          u16* __restrict__ dv, int H, int Hkv, int Tq, int Tk,
                                          float scale, float scale_log2, int causal) {
    constexpr int NT = 128, BC = 64, LDH = D + 8;
    constexpr int KD = D / 16, NS = BR / 8, NO = D / 8, KP = BR / 16;
    static_assert(BR % 16 == 0 && D % 16 == 0, "tile shape");
    float* LD = reinterpret_cast<float*>(fa_smem);  // stage s: Ls = LD + 2 s BR, Dd = Ls + BR
    u16* Ks = reinterpret_cast<u16*>(LD + 4 * BR);    // [BC][LDH]  (offset 16 BR bytes)
    u16* Vs = Ks + BC * LDH;                          // [BC][LDH]
    u16* QD = Vs + BC * LDH;                          // stage s: Qs = QD + 2 s BR LDH, dOs after
    require_smem(16u * BR + 2u * (2 * BC + 4 * BR) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * BC;
    const int bkv = blockIdx.y, b = bkv / Hkv, hk = bkv - b * Hkv, group = H / Hkv;
    const int shift = Tk - Tq;
    const int c_lo = k0 + warp * 16 + g;  // keys of half 0 and half 1: c_lo, c_lo + 8
    const int nq = (Tq + BR - 1) / BR;
    const int qt_first = first_query_tile<BR>(k0, Tq, Tk, causal);
    const int nqt = nq > qt_first ? nq - qt_first : 0;
    const int n_items = group * nqt;  // item i: query head gi = i / nqt, tile qt_first + i % nqt

    mma_load_tile_async<D, BC, LDH, NT>(Ks, k + (long long)bkv * Tk * D, k0, Tk, tid);
    mma_load_tile_async<D, BC, LDH, NT>(Vs, v + (long long)bkv * Tk * D, k0, Tk, tid);
    if (n_items > 0) dkdv2_issue<D, BR>(QD, LD, q, dout, lse2, delta, 0, 0, nqt, qt_first, b, H, hk,
                                        group, Tq, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 kf[1][KVREGS ? KD : 1][4], vf[1][KVREGS ? KD : 1][4];  // used when KVREGS
    if constexpr (KVREGS) {
        load_a_frags<1, KD>(kf, Ks, LDH, warp * 16, lane);
        load_a_frags<1, KD>(vf, Vs, LDH, warp * 16, lane);
    }

    float dka[1][NO][4], dva[1][NO][4];
    zero_acc(dka);
    zero_acc(dva);

    for (int it = 0; it < n_items; ++it) {
        if (it > 0) {
            cp_async_wait<0>();
            __syncthreads();
        }
        if (it + 1 < n_items)
            dkdv2_issue<D, BR>(QD, LD, q, dout, lse2, delta, it + 1, (it + 1) & 1, nqt, qt_first, b,
                               H, hk, group, Tq, tid);
        cp_async_commit();
        const int q0 = (qt_first + it % nqt) * BR;
        const u16* Qs = QD + (it & 1) * 2 * BR * LDH;
        const u16* dOs = Qs + BR * LDH;
        const float* Ls = LD + (it & 1) * 2 * BR;
        const float* Dd = Ls + BR;

        float st[1][NS][4], dpt[1][NS][4];  // this warp's 16 keys x BR queries
        zero_acc(st);
        zero_acc(dpt);
        if constexpr (KVREGS) {
            warp_abt_regs<DT, 1, KD, NS>(st, kf, Qs, LDH, lane);    // S^T = K Q^T
            warp_abt_regs<DT, 1, KD, NS>(dpt, vf, dOs, LDH, lane);  // dP^T = V dO^T
        } else {
            warp_abt_smem<DT, 1, KD, NS>(st, Ks, LDH, warp * 16, Qs, LDH, lane);
            warp_abt_smem<DT, 1, KD, NS>(dpt, Vs, LDH, warp * 16, dOs, LDH, lane);
        }

        const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                          (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
            const int rl = nt * 8 + 2 * t;  // this lane's query columns rl, rl + 1
            const float2 L2 = *reinterpret_cast<const float2*>(Ls + rl);
            const float2 Dl = *reinterpret_cast<const float2*>(Dd + rl);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = c_lo + 8 * (e >> 1), r = q0 + rl + (e & 1);
                const float Lr = (e & 1) ? L2.y : L2.x, Dr = (e & 1) ? Dl.y : Dl.x;
                float p = exp2f(fmaf(st[0][nt][e], scale_log2, -Lr));
                if (edge && !(r < Tq && visible(r, c, Tk, shift, causal))) p = 0.f;
                st[0][nt][e] = p;                           // P^T
                dpt[0][nt][e] = p * (dpt[0][nt][e] - Dr);  // dS^T
            }
        }
        warp_pb<DT, 1, KP, NO>(dva, st, dOs, LDH, lane);  // dV += P^T dO
        warp_pb<DT, 1, KP, NO>(dka, dpt, Qs, LDH, lane);  // dK += dS^T Q
    }
    cp_async_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int c = c_lo + 8 * half;
        if (c < Tk) {
            const long long row = (long long)bkv * Tk + c;
            mma_store_row<DT, D>(dk + row * D, dka[0], half, scale, t);
            mma_store_row<DT, D>(dv + row * D, dva[0], half, 1.f, t);
        }
    }
}

// ================================================================ v2: tensor-core backward: dq
// Block: BR = 64 queries (warp w owns rows 16 w .. 16 w + 15); key tiles of BC stream
// through two shared stages.
//   S = Q K^T, dP = dO V^T, P = exp2(S scale_log2 - lse2), dS = P (dP - delta), dQ += dS K.
// QREGS: the warp's Q and dO fragments stay in registers (D <= 64).
// Shared: Qs, dOs [64][D+8]; per stage: Ks, Vs [BC][D+8] (16-bit).
template <class DT, int D, int BC, bool QREGS>
__device__ __forceinline__ void dq_mma2(const u16* __restrict__ q, const u16* __restrict__ k,
                                        const u16* __restrict__ v, const u16* __restrict__ dout,
                                        const float* __restrict__ lse2,
                                        const float* __restrict__ delta, u16* __restrict__ dq,
                                        int H, int Hkv, int Tq, int Tk, float scale,
                                        float scale_log2, int causal) {
    constexpr int NT = 128, BR = 64, LDH = D + 8;
    constexpr int KD = D / 16, NS = BC / 8, NO = D / 8, KP = BC / 16;
    static_assert(BC % 16 == 0 && D % 16 == 0, "tile shape");
    u16* Qs = reinterpret_cast<u16*>(fa_smem);  // [BR][LDH]
    u16* dOs = Qs + BR * LDH;                     // [BR][LDH]
    u16* KV = dOs + BR * LDH;                     // stage s: Ks = KV + 2 s BC LDH, Vs after it
    require_smem(2u * (2 * BR + 4 * BC) * LDH);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const int bh = blockIdx.y, b = bh / H, h = bh - b * H, hk = h / (H / Hkv);
    const u16* kb = k + ((long long)b * Hkv + hk) * Tk * D;
    const u16* vb = v + ((long long)b * Hkv + hk) * Tk * D;
    const int shift = Tk - Tq;
    const int n_kt = visible_key_tiles<BR, BC>(q0, Tq, Tk, causal);
    const int r_lo = q0 + warp * 16 + g;

    mma_load_tile_async<D, BR, LDH, NT>(Qs, q + (long long)bh * Tq * D, q0, Tq, tid);
    mma_load_tile_async<D, BR, LDH, NT>(dOs, dout + (long long)bh * Tq * D, q0, Tq, tid);
    if (n_kt > 0) {
        mma_load_tile_async<D, BC, LDH, NT>(KV, kb, 0, Tk, tid);
        mma_load_tile_async<D, BC, LDH, NT>(KV + BC * LDH, vb, 0, Tk, tid);
    }
    cp_async_commit();

    float L[2], Dr[2];  // lse2 and delta of rows r_lo, r_lo + 8 (+inf, 0 past Tq)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lo + 8 * half;
        L[half] = r < Tq ? lse2[(long long)bh * Tq + r] : FA_POS_INF;
        Dr[half] = r < Tq ? delta[(long long)bh * Tq + r] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[1][QREGS ? KD : 1][4], dof[1][QREGS ? KD : 1][4];  // used when QREGS
    if constexpr (QREGS) {
        load_a_frags<1, KD>(qf, Qs, LDH, warp * 16, lane);
        load_a_frags<1, KD>(dof, dOs, LDH, warp * 16, lane);
    }
    float dqa[1][NO][4];
    zero_acc(dqa);

    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * BC;
        if (kt > 0) {
            cp_async_wait<0>();
            __syncthreads();
        }
        if (kt + 1 < n_kt) {
            u16* nxt = KV + ((kt + 1) & 1) * 2 * BC * LDH;
            mma_load_tile_async<D, BC, LDH, NT>(nxt, kb, k0 + BC, Tk, tid);
            mma_load_tile_async<D, BC, LDH, NT>(nxt + BC * LDH, vb, k0 + BC, Tk, tid);
        }
        cp_async_commit();
        const u16* Ks = KV + (kt & 1) * 2 * BC * LDH;
        const u16* Vs = Ks + BC * LDH;

        float s[1][NS][4], dp[1][NS][4];
        zero_acc(s);
        zero_acc(dp);
        if constexpr (QREGS) {
            warp_abt_regs<DT, 1, KD, NS>(s, qf, Ks, LDH, lane);    // S = Q K^T
            warp_abt_regs<DT, 1, KD, NS>(dp, dof, Vs, LDH, lane);  // dP = dO V^T
        } else {
            warp_abt_smem<DT, 1, KD, NS>(s, Qs, LDH, warp * 16, Ks, LDH, lane);
            warp_abt_smem<DT, 1, KD, NS>(dp, dOs, LDH, warp * 16, Vs, LDH, lane);
        }

        const bool edge = (q0 + BR > Tq) || (k0 + BC > Tk) ||
                          (causal && k0 + BC - 1 > q0 + shift);
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e >> 1, r = r_lo + 8 * half;
                const int c = k0 + nt * 8 + 2 * t + (e & 1);
                float p = exp2f(fmaf(s[0][nt][e], scale_log2, -L[half]));
                if (edge && !(r < Tq && visible(r, c, Tk, shift, causal))) p = 0.f;
                dp[0][nt][e] = p * (dp[0][nt][e] - Dr[half]);  // dS
            }
        }
        warp_pb<DT, 1, KP, NO>(dqa, dp, Ks, LDH, lane);  // dQ += dS K
    }
    cp_async_wait<0>();

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lo + 8 * half;
        if (r < Tq) mma_store_row<DT, D>(dq + ((long long)bh * Tq + r) * D, dqa[0], half, scale, t);
    }
}

// ===================================================================== the kernels of this module

#if FA_DTYPE_ID == 0
typedef F32 FA_DT;
#elif FA_DTYPE_ID == 1
typedef F16 FA_DT;
#elif FA_DTYPE_ID == 2
typedef BF16 FA_DT;
#else
#error "FA_DTYPE_ID must be 0 (float32), 1 (float16) or 2 (bfloat16)"
#endif
#if FA_HEAD_DIM != 32 && FA_HEAD_DIM != 64 && FA_HEAD_DIM != 128
#error "FA_HEAD_DIM must be 32, 64 or 128"
#endif
typedef FA_DT::T fa_t;

// FA_KERNELS picks the kernel families of the module (a bit mask; the pre-passes are
// always there): 1 SIMT, 2 tensor-core v1, 4 tensor-core v2 (16-bit dtypes only). The
// launcher compiles one family per module so a process builds only what it runs.
#ifndef FA_KERNELS
#define FA_KERNELS 7
#endif

extern "C" __global__ void __launch_bounds__(256, 2)
fa_bwd_pre(const fa_t* o, const fa_t* dout, float* delta, int nrows) {
    bwd_pre<FA_DT, FA_HEAD_DIM>(o, dout, delta, nrows);
}

// fa_bwd_pre2 writes lse2 for the v2 backward kernels, which take it in place of lse.
extern "C" __global__ void __launch_bounds__(256, 2)
fa_bwd_pre2(const fa_t* o, const fa_t* dout, const float* lse, float* delta, float* lse2,
            int nrows) {
    bwd_pre2<FA_DT, FA_HEAD_DIM>(o, dout, lse, delta, lse2, nrows);
}

#if FA_KERNELS & 1
extern "C" __global__ void __launch_bounds__(256, 2)
fa_fwd_simt(const fa_t* q, const fa_t* k, const fa_t* v, fa_t* o, float* lse, int H, int Hkv,
            int Tq, int Tk, float scale_log2, int causal) {
    fwd_simt<FA_DT, FA_HEAD_DIM, FA_SIMT_FWD_BR, FA_SIMT_FWD_BC>(q, k, v, o, lse, H, Hkv, Tq, Tk,
                                                                 scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(256, 2)
fa_bwd_dkdv_simt(const fa_t* q, const fa_t* k, const fa_t* v, const fa_t* dout, const float* lse,
                 const float* delta, fa_t* dk, fa_t* dv, int H, int Hkv, int Tq, int Tk,
                 float scale, float scale_log2, int causal) {
    dkdv_simt<FA_DT, FA_HEAD_DIM, FA_SIMT_KV_BR, FA_SIMT_KV_BC>(
        q, k, v, dout, lse, delta, dk, dv, H, Hkv, Tq, Tk, scale, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(256, 2)
fa_bwd_dq_simt(const fa_t* q, const fa_t* k, const fa_t* v, const fa_t* dout, const float* lse,
               const float* delta, fa_t* dq, int H, int Hkv, int Tq, int Tk, float scale,
               float scale_log2, int causal) {
    dq_simt<FA_DT, FA_HEAD_DIM, FA_SIMT_Q_BR, FA_SIMT_Q_BC>(q, k, v, dout, lse, delta, dq, H, Hkv,
                                                            Tq, Tk, scale, scale_log2, causal);
}

// v2 SIMT backward: lse2 in place of lse (from fa_bwd_pre2), FA_SIMT2_* tiles.
extern "C" __global__ void __launch_bounds__(256, FA_SIMT2_KV_MINB)
fa_bwd_dkdv_simt2(const fa_t* q, const fa_t* k, const fa_t* v, const fa_t* dout,
                  const float* lse2, const float* delta, fa_t* dk, fa_t* dv, int H, int Hkv,
                  int Tq, int Tk, float scale, float scale_log2, int causal) {
    dkdv_simt<FA_DT, FA_HEAD_DIM, FA_SIMT2_KV_BR, FA_SIMT2_KV_BC, true>(
        q, k, v, dout, lse2, delta, dk, dv, H, Hkv, Tq, Tk, scale, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(256, FA_SIMT2_Q_MINB)
fa_bwd_dq_simt2(const fa_t* q, const fa_t* k, const fa_t* v, const fa_t* dout, const float* lse2,
                const float* delta, fa_t* dq, int H, int Hkv, int Tq, int Tk, float scale,
                float scale_log2, int causal) {
    dq_simt<FA_DT, FA_HEAD_DIM, FA_SIMT2_Q_BR, FA_SIMT2_Q_BC, true>(
        q, k, v, dout, lse2, delta, dq, H, Hkv, Tq, Tk, scale, scale_log2, causal);
}
#endif

#if FA_DTYPE_ID != 0 && (FA_KERNELS & 2)
extern "C" __global__ void __launch_bounds__(128)
fa_fwd_mma(const u16* q, const u16* k, const u16* v, u16* o, float* lse, int H, int Hkv, int Tq,
           int Tk, float scale_log2, int causal) {
    fwd_mma<FA_DT, FA_HEAD_DIM, FA_MMA_FWD_BC>(q, k, v, o, lse, H, Hkv, Tq, Tk, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(128)
fa_bwd_dkdv_mma(const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse,
                const float* delta, u16* dk, u16* dv, int H, int Hkv, int Tq, int Tk, float scale,
                float scale_log2, int causal) {
    dkdv_mma<FA_DT, FA_HEAD_DIM, FA_MMA_KV_BR>(q, k, v, dout, lse, delta, dk, dv, H, Hkv, Tq, Tk,
                                               scale, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(128)
fa_bwd_dq_mma(const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse,
              const float* delta, u16* dq, int H, int Hkv, int Tq, int Tk, float scale,
              float scale_log2, int causal) {
    dq_mma<FA_DT, FA_HEAD_DIM, FA_MMA_Q_BC>(q, k, v, dout, lse, delta, dq, H, Hkv, Tq, Tk, scale,
                                            scale_log2, causal);
}
#endif

#if FA_DTYPE_ID != 0 && (FA_KERNELS & 4)
// v2: see "v2: cp.async" above.
extern "C" __global__ void __launch_bounds__(128)
fa_fwd_mma2(const u16* q, const u16* k, const u16* v, u16* o, float* lse, int H, int Hkv, int Tq,
            int Tk, float scale_log2, int causal) {
    fwd_mma2<FA_DT, FA_HEAD_DIM, FA_MMA2_FWD_MT, FA_MMA2_FWD_BC, FA_MMA2_FWD_QREGS != 0>(
        q, k, v, o, lse, H, Hkv, Tq, Tk, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(128)
fa_bwd_dkdv_mma2(const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse2,
                 const float* delta, u16* dk, u16* dv, int H, int Hkv, int Tq, int Tk, float scale,
                 float scale_log2, int causal) {
    dkdv_mma2<FA_DT, FA_HEAD_DIM, FA_MMA2_KV_BR, FA_MMA2_KV_REGS != 0>(
        q, k, v, dout, lse2, delta, dk, dv, H, Hkv, Tq, Tk, scale, scale_log2, causal);
}

extern "C" __global__ void __launch_bounds__(128)
fa_bwd_dq_mma2(const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse2,
               const float* delta, u16* dq, int H, int Hkv, int Tq, int Tk, float scale,
               float scale_log2, int causal) {
    dq_mma2<FA_DT, FA_HEAD_DIM, FA_MMA2_Q_BC, FA_MMA2_Q_REGS != 0>(
        q, k, v, dout, lse2, delta, dq, H, Hkv, Tq, Tk, scale, scale_log2, causal);
}
#endif
