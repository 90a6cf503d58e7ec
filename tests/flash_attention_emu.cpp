// Runs tinylm/kernels/flash_attention.cu on the CPU, so its indexing, masking, tiling
// and barrier placement are tested without a GPU.
//
// The .cu is compiled as C++ with FA_HOST_EMULATION and the same -D flags the launcher
// gives NVRTC. The fiber runtime (threads as ucontext fibers, ONE warp at a time as far
// as it can go, lowest warp first or highest with FA_EMU_ORDER=reverse; __syncthreads,
// __shfl_xor_sync, NaN-poisoned shared memory, error aborts) is tests/cuda_emu.h. This
// file adds the collectives and copies of the tensor-core kernels:
//   mma.sync m16n8k16 all 32 lanes: the warp's fragments are decoded into full A, B
//                     with the PTX ISA's documented layouts and multiplied in double
//   ldmatrix.x4       all 32 lanes: lane L gives row L % 8 of matrix L / 8; each lane
//                     gets its (row, column pair), or with .trans its (row pair, column)
// cp.async (16 or 4 bytes, zero-fill past src-size) per thread, with commit_group and
// wait_group N. FA_EMU_CPASYNC=late (the default) models an asynchronous copy at its
// most adversarial: at issue the destination turns to NaN bytes, and the data lands
// only when the issuing thread's wait_group retires the group, so reading a chunk
// before its copier's wait + a barrier, or refilling a buffer someone still reads,
// gives NaN. FA_EMU_CPASYNC=early copies at issue. A thread may not exit with copies
// in flight; a source outside every input array is an error.
// A global write outside an array aborts with a message (as do the runtime's errors:
// deadlock, a barrier reached by some threads only, a shared-memory write past the
// launch's dynamic size). Shared memory and every output start as NaN bytes (0xFF), so
// reading unwritten shared memory or leaving an output element unwritten shows up as NaN.
//
// Built and driven by tests/test_flash_attention_kernel.py:
//   g++ -std=c++17 -O1 -DFA_HOST_EMULATION -DFA_CU_PATH='"…/flash_attention.cu"'
//       <module -D flags> flash_attention_emu.cpp -o emu
//   emu B H Hkv Tq Tk CAUSAL SCALE  (NAME ROWS THREADS SMEM) x 4  IN OUT
// with the kernels of the forward, the pre-pass, dk/dv and dq (names and launch shapes
// as the launcher picks them: fa.kernel_plan, fa.launch_shape). IN holds q, k, v, do
// as raw elements of the module's dtype; OUT gets o, dq, dk, dv (same dtype) then lse,
// delta (float32).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#define CUDA_EMU_STACK_BYTES (128 * 1024)
#include "cuda_emu.h"

// ---------------------------------------------------------------- CUDA spellings

using std::max;
using std::min;

[[noreturn]] void __trap() {
    fail("__trap() (dynamic shared memory smaller than the kernel's layout?)");
}

unsigned fa_emu_dynamic_smem_size();
void fa_emu_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, bool bf16);
void fa_emu_ldmatrix_x4(unsigned (&r)[4], const unsigned short* p, bool trans);
void fa_emu_cp_async(void* dst, const void* src, int cp_size, unsigned src_size);
void fa_emu_cp_async_commit();
void fa_emu_cp_async_wait(int n);

inline float fa_emu_f16_to_f32(unsigned short x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return (float)h;
}
inline unsigned short fa_emu_f32_to_f16(float x) {
    const _Float16 h = (_Float16)x;  // IEEE round to nearest even
    unsigned short u;
    std::memcpy(&u, &h, 2);
    return u;
}
inline float fa_emu_bf16_to_f32(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }
inline unsigned short fa_emu_f32_to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#include FA_CU_PATH

// ---------------------------------------------------------------- mma, ldmatrix, cp.async

constexpr size_t SMEM_BYTES = 232448;  // 227 KB, the most a Hopper block may have
alignas(16) unsigned char fa_smem[SMEM_BYTES];

namespace emu {

struct Payload { unsigned u[6]; float c[4]; const unsigned short* p; };  // a lane's mma / ldmatrix input
struct Copy { unsigned char* dst; unsigned char data[16]; int size; };
struct Async {  // one thread's cp.async state
    std::vector<Copy> open;                  // issued since the last commit
    std::deque<std::vector<Copy>> groups;    // committed, not yet retired (oldest first)
};

std::vector<Payload> scratch;
struct MmaWarp { long tag = -1; float d[32][4]; };  // one mma's D for every lane of a warp
std::vector<MmaWarp> mma_warps;
std::vector<Async> asyncs;
bool cp_early = false;  // FA_EMU_CPASYNC=early: copies land at issue
std::vector<std::pair<const unsigned char*, const unsigned char*>> inputs;  // readable ranges

void reset_block(unsigned nthreads) {
    scratch.assign(nthreads, Payload());
    mma_warps.assign(nthreads / 32, MmaWarp());
    asyncs.assign(nthreads, Async());
}

void check_exit(unsigned tid) {
    const Async& a = asyncs[tid];
    if (!a.open.empty() || !a.groups.empty())
        fail("a thread exited with cp.async copies in flight");
}

}  // namespace emu

unsigned fa_emu_dynamic_smem_size() { return emu::smem_size; }

// f16 -> f32 by table (the soft conversion dominated the emulator's time)
static const float* f16_table() {
    static std::vector<float> t = [] {
        std::vector<float> v(65536);
        for (unsigned x = 0; x < 65536; ++x) v[x] = fa_emu_f16_to_f32((unsigned short)x);
        return v;
    }();
    return t.data();
}

static float half_of(unsigned reg, int hi, bool bf16) {
    const unsigned short x = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
    return bf16 ? fa_emu_bf16_to_f32(x) : f16_table()[x];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C for the whole warp,
// fragments decoded with the layouts of the PTX ISA (groupID g = lane >> 2,
// threadID_in_group t = lane % 4):
//   A: a_i, i = 0..7 (two per register): row g for i in {0,1,4,5}, g + 8 otherwise;
//      col 2t + (i & 1), plus 8 for i >= 4
//   B: b_i, i = 0..3: row 2t + (i & 1), plus 8 for i >= 2; col g
//   C: c_i, i = 0..3: row g for i < 2, g + 8 otherwise; col 2t + (i & 1)
// The first lane of the warp to run after the rendezvous decodes the fragments and
// computes every lane's D (kept per warp, tagged with the collective's count); the
// others read theirs. Each lane's C is deposited with its fragments.

void fa_emu_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, bool bf16) {
    const unsigned tid = emu::cur->tid, base = tid & ~31u, lane = tid & 31u;
    emu::Payload& mine = emu::scratch[tid];
    for (int i = 0; i < 4; ++i) mine.u[i] = a[i];
    mine.u[4] = b0;
    mine.u[5] = b1;
    for (int i = 0; i < 4; ++i) mine.c[i] = c[i];
    emu::warp_rendezvous();
    emu::MmaWarp& mw = emu::mma_warps[tid / 32];
    if (mw.tag != emu::cur->collectives) {
        double A[16][16], B[16][8];
        for (unsigned L = 0; L < 32; ++L) {
            const emu::Payload& p = emu::scratch[base + L];
            const int g = L >> 2, t = L & 3;
            for (int i = 0; i < 8; ++i) {
                const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
                const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = half_of(p.u[i / 2], i & 1, bf16);
            }
            for (int i = 0; i < 4; ++i) {
                const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
                B[row][g] = half_of(p.u[4 + i / 2], i & 1, bf16);
            }
        }
        for (unsigned L = 0; L < 32; ++L) {
            const int g = L >> 2, t = L & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
                double s = emu::scratch[base + L].c[i];
                for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
                mw.d[L][i] = (float)s;
            }
        }
        mw.tag = emu::cur->collectives;
    }
    float out[4];
    for (int i = 0; i < 4; ++i) out[i] = mw.d[lane][i];
    emu::warp_rendezvous();  // every lane has read the others' fragments
    for (int i = 0; i < 4; ++i) c[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8 i .. 8 i + 7 give the row
// addresses of matrix i; register i of lane L receives, packed low then high,
//   M_i[L / 4][2 (L % 4)], M_i[L / 4][2 (L % 4) + 1]          without .trans
//   M_i[2 (L % 4)][L / 4], M_i[2 (L % 4) + 1][L / 4]          with .trans
// where M_i[row][col] is element col of the row addressed by lane 8 i + row.
void fa_emu_ldmatrix_x4(unsigned (&r)[4], const unsigned short* p, bool trans) {
    const unsigned tid = emu::cur->tid, base = tid & ~31u, lane = tid & 31u;
    if (reinterpret_cast<uintptr_t>(p) % 16) fail("ldmatrix row address not 16-byte aligned");
    const unsigned char* lo = fa_smem;
    if (reinterpret_cast<const unsigned char*>(p) < lo ||
        reinterpret_cast<const unsigned char*>(p + 8) > lo + emu::smem_size)
        fail("ldmatrix row outside the dynamic shared memory");
    emu::scratch[tid].p = p;
    emu::warp_rendezvous();
    unsigned out[4];
    for (int i = 0; i < 4; ++i) {
        auto M = [&](int row, int col) -> unsigned {
            return emu::scratch[base + 8 * i + row].p[col];
        };
        const int a = lane / 4, b = 2 * (lane % 4);
        out[i] = trans ? (M(b, a) | (M(b + 1, a) << 16)) : (M(a, b) | (M(a, b + 1) << 16));
    }
    emu::warp_rendezvous();
    for (int i = 0; i < 4; ++i) r[i] = out[i];
}

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size: cp_size bytes land
// at dst, the first src_size of them from src, the rest zeros. See the header for the
// late / early models; the source is read at issue (inputs do not change in a kernel).
void fa_emu_cp_async(void* dst, const void* src, int cp_size, unsigned src_size) {
    auto* d = static_cast<unsigned char*>(dst);
    const auto* sp = static_cast<const unsigned char*>(src);
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async size must be 4, 8 or 16");
    if ((int)src_size > cp_size) fail("cp.async src-size above cp-size");
    if (reinterpret_cast<uintptr_t>(d) % cp_size || reinterpret_cast<uintptr_t>(sp) % cp_size)
        fail("cp.async address not aligned to its size");
    if (d < fa_smem || d + cp_size > fa_smem + emu::smem_size)
        fail("cp.async destination outside the dynamic shared memory");
    if (src_size > 0) {
        bool inside = false;
        for (auto& r : emu::inputs) inside = inside || (sp >= r.first && sp + src_size <= r.second);
        if (!inside) fail("cp.async source outside every input array");
    }
    emu::Copy c{d, {}, cp_size};
    std::memcpy(c.data, sp, src_size);
    std::memset(c.data + src_size, 0, cp_size - src_size);
    if (emu::cp_early) {
        std::memcpy(d, c.data, cp_size);
    } else {
        std::memset(d, 0xff, cp_size);  // in flight: the contents are undefined
        emu::asyncs[emu::cur->tid].open.push_back(c);
    }
}

void fa_emu_cp_async_commit() {
    emu::Async& a = emu::asyncs[emu::cur->tid];
    a.groups.push_back(std::move(a.open));
    a.open.clear();
}

// cp.async.wait_group n: retire this thread's committed groups until at most n remain.
void fa_emu_cp_async_wait(int n) {
    emu::Async& a = emu::asyncs[emu::cur->tid];
    while ((int)a.groups.size() > n) {
        for (const emu::Copy& c : a.groups.front()) std::memcpy(c.dst, c.data, c.size);
        a.groups.pop_front();
    }
}

// ---------------------------------------------------------------- driver

// A global array with 4 KB of 0xFF guard bytes on each side; writes outside are caught.
template <class T>
struct Guarded {
    static constexpr size_t G = 4096;
    std::vector<unsigned char> raw;
    size_t n;
    explicit Guarded(size_t n_) : raw(n_ * sizeof(T) + 2 * G, 0xff), n(n_) {}
    T* ptr() { return reinterpret_cast<T*>(raw.data() + G); }
    void check(const char* name) const {
        for (size_t i = 0; i < G; ++i)
            if (raw[i] != 0xff || raw[raw.size() - 1 - i] != 0xff)
                fail(std::string("write outside the array ") + name);
    }
};

static void read_into(FILE* f, void* dst, size_t bytes) {
    if (std::fread(dst, 1, bytes, f) != bytes) fail("short input file");
}

struct Launch {
    std::string name;
    unsigned rows, threads, smem;
};

[[noreturn]] static void unknown(const std::string& name) {
    fail("kernel " + name + " is not in this module (or not known to the emulator)");
}

int main(int argc, char** argv) {
    if (argc != 26) fail("usage: emu B H Hkv Tq Tk CAUSAL SCALE (NAME ROWS THREADS SMEM)x4 IN OUT");
    emu::order_from_env("FA_EMU_ORDER");
    emu::shared_memory(fa_smem, SMEM_BYTES);
    emu::on_block = emu::reset_block;
    emu::on_exit = emu::check_exit;
    const char* cpmode = std::getenv("FA_EMU_CPASYNC");
    emu::cp_early = cpmode && std::string(cpmode) == "early";
    const int B = std::atoi(argv[1]), H = std::atoi(argv[2]), Hkv = std::atoi(argv[3]);
    const int Tq = std::atoi(argv[4]), Tk = std::atoi(argv[5]), causal = std::atoi(argv[6]);
    const double scale = std::atof(argv[7]);
    Launch plan[4];  // forward, pre-pass, dk/dv, dq
    for (int i = 0; i < 4; ++i)
        plan[i] = {argv[8 + 4 * i], (unsigned)std::atol(argv[9 + 4 * i]),
                   (unsigned)std::atol(argv[10 + 4 * i]), (unsigned)std::atol(argv[11 + 4 * i])};
    const int D = FA_HEAD_DIM;
    const size_t nq = (size_t)B * H * Tq * D, nk = (size_t)B * Hkv * Tk * D;
    const size_t nrows = (size_t)B * H * Tq;

    Guarded<fa_t> q(nq), k(nk), v(nk), dout(nq), o(nq), dq(nq), dk(nk), dv(nk);
    Guarded<float> lse(nrows), delta(nrows), lse2(nrows);
    FILE* in = std::fopen(argv[24], "rb");
    if (!in) fail("cannot open input");
    read_into(in, q.ptr(), nq * sizeof(fa_t));
    read_into(in, k.ptr(), nk * sizeof(fa_t));
    read_into(in, v.ptr(), nk * sizeof(fa_t));
    read_into(in, dout.ptr(), nq * sizeof(fa_t));
    std::fclose(in);
    auto readable = [](auto& g) {  // cp.async may read the array (not its guard bytes)
        const auto* p = reinterpret_cast<const unsigned char*>(g.ptr());
        emu::inputs.push_back({p, p + g.n * sizeof(*g.ptr())});
    };
    readable(q), readable(k), readable(v), readable(dout), readable(o);
    readable(lse), readable(delta), readable(lse2);

    const float sc = (float)scale, sl2 = (float)(scale * 1.4426950408889634);
    auto ceil_div = [](long long a, unsigned b) { return (unsigned)((a + b - 1) / b); };
    fa_t *Q = q.ptr(), *K = k.ptr(), *V = v.ptr(), *dO = dout.ptr();
    float *Lse = lse.ptr(), *Delta = delta.ptr(), *Lse2 = lse2.ptr();
    const std::string fwd = plan[0].name, pre = plan[1].name, kv = plan[2].name, dqn = plan[3].name;

    emu::launch(ceil_div(Tq, plan[0].rows), B * H, plan[0].threads, plan[0].smem, [&] {
        auto* kern = fwd == "fa_fwd_simt" ? fa_fwd_simt : nullptr;
#if FA_DTYPE_ID != 0
        if (fwd == "fa_fwd_mma") kern = fa_fwd_mma;
        if (fwd == "fa_fwd_mma2") kern = fa_fwd_mma2;
#endif
        if (!kern) unknown(fwd);
        kern(Q, K, V, o.ptr(), Lse, H, Hkv, Tq, Tk, sl2, causal);
    });
    // the pre-pass decides what dk/dv and dq get: lse (fa_bwd_pre) or lse2 (fa_bwd_pre2)
    const bool two = pre == "fa_bwd_pre2";
    float* L = two ? Lse2 : Lse;
    emu::launch(ceil_div((long long)nrows, plan[1].rows), 1, plan[1].threads, plan[1].smem, [&] {
        if (pre == "fa_bwd_pre") return fa_bwd_pre(o.ptr(), dO, Delta, (int)nrows);
        if (pre == "fa_bwd_pre2") return fa_bwd_pre2(o.ptr(), dO, Lse, Delta, Lse2, (int)nrows);
        unknown(pre);
    });
    emu::launch(ceil_div(Tk, plan[2].rows), B * Hkv, plan[2].threads, plan[2].smem, [&] {
        auto* kern = kv == "fa_bwd_dkdv_simt" ? fa_bwd_dkdv_simt : nullptr;
        if (kv == "fa_bwd_dkdv_simt2") kern = fa_bwd_dkdv_simt2;
#if FA_DTYPE_ID != 0
        if (kv == "fa_bwd_dkdv_mma") kern = fa_bwd_dkdv_mma;
        if (kv == "fa_bwd_dkdv_mma2") kern = fa_bwd_dkdv_mma2;
#endif
        if (!kern) unknown(kv);
        kern(Q, K, V, dO, L, Delta, dk.ptr(), dv.ptr(), H, Hkv, Tq, Tk, sc, sl2, causal);
    });
    emu::launch(ceil_div(Tq, plan[3].rows), B * H, plan[3].threads, plan[3].smem, [&] {
        auto* kern = dqn == "fa_bwd_dq_simt" ? fa_bwd_dq_simt : nullptr;
        if (dqn == "fa_bwd_dq_simt2") kern = fa_bwd_dq_simt2;
#if FA_DTYPE_ID != 0
        if (dqn == "fa_bwd_dq_mma") kern = fa_bwd_dq_mma;
        if (dqn == "fa_bwd_dq_mma2") kern = fa_bwd_dq_mma2;
#endif
        if (!kern) unknown(dqn);
        kern(Q, K, V, dO, L, Delta, dq.ptr(), H, Hkv, Tq, Tk, sc, sl2, causal);
    });

    const char* names[] = {"q", "k", "v", "do", "o", "dq", "dk", "dv"};
    Guarded<fa_t>* arrays[] = {&q, &k, &v, &dout, &o, &dq, &dk, &dv};
    for (int i = 0; i < 8; ++i) arrays[i]->check(names[i]);
    lse.check("lse");
    delta.check("delta");
    lse2.check("lse2");

    FILE* out = std::fopen(argv[25], "wb");
    if (!out) fail("cannot open output");
    std::fwrite(o.ptr(), sizeof(fa_t), nq, out);
    std::fwrite(dq.ptr(), sizeof(fa_t), nq, out);
    std::fwrite(dk.ptr(), sizeof(fa_t), nk, out);
    std::fwrite(dv.ptr(), sizeof(fa_t), nk, out);
    std::fwrite(lse.ptr(), sizeof(float), nrows, out);
    std::fwrite(delta.ptr(), sizeof(float), nrows, out);
    std::fclose(out);
    return 0;
}
