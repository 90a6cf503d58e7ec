// Runs tinylm/kernels/quant_matmul.cu on the CPU (tests/cuda_emu.h: every thread a fiber,
// __syncthreads and __shfl_xor_sync emulated, one warp at a time run ahead of the others,
// shared memory starting as NaN bytes), so the kernels' indexing, tiling and barriers are
// tested without a GPU. Built and driven by tests/test_quant_kernels.py:
//   g++ -std=c++17 -O1 -DQM_HOST_EMULATION -DQM_CU_PATH='"…/quant_matmul.cu"' quant_emu.cpp
//   emu OP FMT GX GY THREADS SMEM N_OUT N_IN N_TOK ROW_BYTES IN OUT
// OP: gemv | gemm | gemm_t | rows; FMT: q8_0 | q4_0 | q4_1 | nf4; the launch shape (grid,
// threads, dynamic shared memory) is the Python launcher's own plan. IN holds, back to back:
//   w       N_OUT * ROW_BYTES bytes (the packed rows: GGUF bytes, or nf4 codes)
//   absmax  N_OUT * N_IN / 64 float32 (nf4 only)
//   a       gemv/gemm: x (N_TOK, N_IN) float32; gemm_t: dy (N_TOK, N_OUT); rows: ids (N_TOK) int64
// OUT: the float32 result (gemv/gemm: N_TOK x N_OUT; gemm_t, rows: N_TOK x N_IN). Every
// array has 4 KB of 0xFF guard bytes on each side (a write outside aborts), the output
// starts as NaN, so an element no thread writes comes back NaN.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_emu.h"

// CUDA's round-to-nearest intrinsics (not in cuda_emu.h): plain float arithmetic here
// (g++ for x86-64 does not contract a * b + c into an FMA without -mfma / -ffp-contract).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

#include QM_CU_PATH

constexpr size_t SMEM_BYTES = 48 * 1024;
alignas(16) float qm_smem[SMEM_BYTES / 4];

namespace {

struct Guarded {
    static constexpr size_t G = 4096;
    std::vector<unsigned char> raw;
    size_t bytes;
    std::string name;
    Guarded(size_t bytes_, const char* name_) : raw(bytes_ + 2 * G, 0xff), bytes(bytes_), name(name_) {}
    template <class T> T* ptr() { return reinterpret_cast<T*>(raw.data() + G); }
    void check() const {
        for (size_t i = 0; i < G; ++i)
            if (raw[i] != 0xff || raw[raw.size() - 1 - i] != 0xff)
                fail("write outside the array " + name);
    }
    void read(FILE* f) {
        if (bytes && std::fread(raw.data() + G, 1, bytes, f) != bytes) fail("short input for " + name);
    }
};

typedef void (*Kernel8)(const unsigned char*, const float*, const float*, float*, int, int, int,
                        long long);
typedef void (*Rows)(const unsigned char*, const float*, const long long*, float*, int, long long);

struct Entry {
    const char* fmt;
    Kernel8 gemv, gemm, gemm_t;
    Rows rows;
};

const Entry ENTRIES[] = {
    {"q8_0", qm_gemv_q8_0, qm_gemm_q8_0, qm_gemm_t_q8_0, qm_rows_q8_0},
    {"q4_0", qm_gemv_q4_0, qm_gemm_q4_0, qm_gemm_t_q4_0, qm_rows_q4_0},
    {"q4_1", qm_gemv_q4_1, qm_gemm_q4_1, qm_gemm_t_q4_1, qm_rows_q4_1},
    {"nf4", qm_gemv_nf4, qm_gemm_nf4, qm_gemm_t_nf4, qm_rows_nf4},
};

FILE* open_file(const char* path, const char* mode) {
    FILE* f = std::fopen(path, mode);
    if (!f) fail(std::string("cannot open ") + path);
    return f;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 13) fail("usage: emu OP FMT GX GY THREADS SMEM N_OUT N_IN N_TOK ROW_BYTES IN OUT");
    const std::string op = argv[1], fmt = argv[2];
    const unsigned gx = std::atoi(argv[3]), gy = std::atoi(argv[4]);
    const unsigned threads = std::atoi(argv[5]), smem = std::atoi(argv[6]);
    const int n_out = std::atoi(argv[7]), n_in = std::atoi(argv[8]), n_tok = std::atoi(argv[9]);
    const long long row_bytes = std::atoll(argv[10]);
    if (threads != QM_THREADS) fail("launch with a block size other than QM_THREADS");
    const Entry* e = nullptr;
    for (const Entry& c : ENTRIES)
        if (fmt == c.fmt) e = &c;
    if (!e) fail("unknown format " + fmt);
    const bool nf4 = fmt == "nf4";
    Guarded w((size_t)n_out * row_bytes, "w");
    Guarded absmax(nf4 ? (size_t)n_out * (n_in / 64) * 4 : 0, "absmax");
    const size_t a_bytes = op == "rows" ? (size_t)n_tok * 8
                           : op == "gemm_t" ? (size_t)n_tok * n_out * 4 : (size_t)n_tok * n_in * 4;
    const size_t out_cols = (op == "gemm_t" || op == "rows") ? n_in : n_out;
    Guarded a(a_bytes, "a"), out((size_t)n_tok * out_cols * 4, "out");
    FILE* in = open_file(argv[11], "rb");
    w.read(in), absmax.read(in), a.read(in);
    std::fclose(in);
    emu::shared_memory(qm_smem, SMEM_BYTES);
    emu::order_from_env("QM_EMU_ORDER");
    const unsigned char* wp = w.ptr<unsigned char>();
    const float* am = absmax.ptr<float>();
    if (op == "rows") {
        emu::launch(gx, gy, threads, smem, [&] {
            e->rows(wp, am, a.ptr<long long>(), out.ptr<float>(), n_in, row_bytes);
        });
    } else {
        Kernel8 k = op == "gemv" ? e->gemv : op == "gemm" ? e->gemm : op == "gemm_t" ? e->gemm_t : nullptr;
        if (!k) fail("unknown op " + op);
        emu::launch(gx, gy, threads, smem, [&] {
            k(wp, am, a.ptr<float>(), out.ptr<float>(), n_out, n_in, n_tok, row_bytes);
        });
    }
    w.check(), absmax.check(), a.check(), out.check();
    FILE* o = open_file(argv[12], "wb");
    std::fwrite(out.ptr<unsigned char>(), 1, out.bytes, o);
    std::fclose(o);
    return 0;
}
