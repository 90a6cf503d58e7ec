// Runs tinylm/kernels/fused.cu on the CPU, so its indexing, reductions and barrier
// placement are tested without a GPU. The execution model is tests/cuda_emu.h (shared
// with tests/flash_attention_emu.cpp, which adds mma, ldmatrix and cp.async, none of
// which fused.cu uses): every thread of a block is a ucontext fiber; the scheduler runs
// ONE warp at a time as far as it can go (through its shuffles, up to the next
// __syncthreads), lowest warp first (highest with FZ_EMU_ORDER=reverse), so a warp runs
// ahead of the others and a missing __syncthreads shows up as a read of shared data
// another warp has not written yet, or has already overwritten.
//   __syncthreads()   all live threads of the block, at the same barrier count
//   __shfl_xor_sync   all 32 lanes of the warp (deposit, rendezvous, read, rendezvous)
// A deadlock, a barrier reached by some threads only, lanes of a warp at different
// shuffles, a shared-memory write past the launch's dynamic size, a launch with a block
// size other than FZ_THREADS, or a global write outside an array aborts with a message.
// Shared memory and every output start as NaN bytes (0xFF), so an unwritten output
// element or unwritten shared read shows up as NaN.
//
// Built and driven by tests/test_fused_kernels.py:
//   g++ -std=c++17 -O1 -DFZ_HOST_EMULATION -DFZ_CU_PATH='"…/fused.cu"' <module -D flags>
//       fused_emu.cpp -o emu
//   emu norm  SMEM N D CENTER HAS_W HAS_B EPS P                    IN OUT
//   emu ce    SMEM N V IGNORE ONE_MINUS_EPS EPS_OVER_V SMOOTH GSIZE USE_COUNT IN OUT
//   emu adamw SMEM N BLOCKS DECAY OMB1 B2 OMB2 STEP_SIZE BC2 EPS USE_DECAY AMSGRAD IN OUT
// with launch shapes and scalars as the launcher computes them. IN / OUT: raw arrays:
//   norm   in x (N D), w (D), b (D), dy (N D)    out y, mean, rstd, dx, dw, db
//   ce     in logits (N V), targets (N, int64), grad (GSIZE), count (1)
//          out loss (N), lse (N), dlogits (N V)
//   adamw  in p, g, m, v, vmax (N each)          out p, m, v, vmax
//   emu launch NAME GX GY THREADS SMEM IN OUT: one kernel with the Python launcher's own
//   argument tuple (see run_launch), so the launcher's argument order and types are
//   checked against the kernels' signatures too.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_emu.h"

#include FZ_CU_PATH

constexpr size_t SMEM_BYTES = 48 * 1024;
alignas(16) float fz_smem[SMEM_BYTES / 4];

// ---------------------------------------------------------------- driver

// A global array with 4 KB of 0xFF guard bytes on each side; writes outside are caught.
template <class T>
struct Guarded {
    static constexpr size_t G = 4096;
    std::vector<unsigned char> raw;
    size_t n;
    const char* name;
    Guarded(size_t n_, const char* name_) : raw(n_ * sizeof(T) + 2 * G, 0xff), n(n_), name(name_) {}
    T* ptr() { return reinterpret_cast<T*>(raw.data() + G); }
    void check() const {
        for (size_t i = 0; i < G; ++i)
            if (raw[i] != 0xff || raw[raw.size() - 1 - i] != 0xff)
                fail(std::string("write outside the array ") + name);
    }
    void read(FILE* f) {
        if (std::fread(ptr(), sizeof(T), n, f) != n) fail(std::string("short input for ") + name);
    }
    void write(FILE* f) { std::fwrite(ptr(), sizeof(T), n, f); }
};

static unsigned ceil_div(long long a, unsigned b) { return (unsigned)((a + b - 1) / b); }

static FILE* open(const char* path, const char* mode) {
    FILE* f = std::fopen(path, mode);
    if (!f) fail(std::string("cannot open ") + path);
    return f;
}

static int run_norm(char** a) {  // SMEM N D CENTER HAS_W HAS_B EPS P IN OUT
    const unsigned smem = std::atoi(a[0]);
    const int N = std::atoi(a[1]), D = std::atoi(a[2]), center = std::atoi(a[3]);
    const int has_w = std::atoi(a[4]), has_b = std::atoi(a[5]);
    const float eps = std::strtof(a[6], nullptr);
    const int P = std::atoi(a[7]);
    const size_t nd = (size_t)N * D;
    Guarded<float> x(nd, "x"), w(D, "w"), b(D, "b"), dy(nd, "dy"), y(nd, "y"), mean(N, "mean"),
        rstd(N, "rstd"), dx(nd, "dx"), dw(D, "dw"), db(D, "db"), pw((size_t)P * D, "pw"),
        pb((size_t)P * D, "pb");
    FILE* in = open(a[8], "rb");
    x.read(in), w.read(in), b.read(in), dy.read(in);
    std::fclose(in);
    emu::launch(N, 1, FZ_THREADS, smem, [&] {
        fz_norm_fwd(x.ptr(), w.ptr(), b.ptr(), y.ptr(), mean.ptr(), rstd.ptr(), D, eps, center,
                    has_w, has_b);
    });
    emu::launch(N, 1, FZ_THREADS, smem, [&] {
        fz_norm_bwd_dx(dy.ptr(), x.ptr(), w.ptr(), mean.ptr(), rstd.ptr(), dx.ptr(), D, center,
                       has_w);
    });
    const unsigned cols = ceil_div(D, FZ_THREADS);
    emu::launch(cols, P, FZ_THREADS, smem, [&] {
        fz_norm_bwd_params(dy.ptr(), x.ptr(), mean.ptr(), rstd.ptr(), pw.ptr(), pb.ptr(), N, D,
                           has_w, has_b);
    });
    emu::launch(cols, 1, FZ_THREADS, smem, [&] {
        fz_colsum(pw.ptr(), pb.ptr(), dw.ptr(), db.ptr(), P, D, has_w, has_b);
    });
    for (auto* g : {&x, &w, &b, &dy, &y, &mean, &rstd, &dx, &dw, &db, &pw, &pb}) g->check();
    FILE* out = open(a[9], "wb");
    y.write(out), mean.write(out), rstd.write(out), dx.write(out), dw.write(out), db.write(out);
    std::fclose(out);
    return 0;
}

static int run_ce(char** a) {  // SMEM N V IGNORE OME EOV SMOOTH GSIZE USE_COUNT IN OUT
    const unsigned smem = std::atoi(a[0]);
    const int N = std::atoi(a[1]), V = std::atoi(a[2]);
    const long long ignore = std::atoll(a[3]);
    const float ome = std::strtof(a[4], nullptr), eov = std::strtof(a[5], nullptr);
    const int smooth = std::atoi(a[6]), gsize = std::atoi(a[7]), use_count = std::atoi(a[8]);
    const size_t nv = (size_t)N * V;
    Guarded<float> logits(nv, "logits"), grad(gsize, "grad"), count(1, "count"), loss(N, "loss"),
        lse(N, "lse"), dl(nv, "dlogits");
    Guarded<long long> targets(N, "targets");
    FILE* in = open(a[9], "rb");
    logits.read(in), targets.read(in), grad.read(in), count.read(in);
    std::fclose(in);
    emu::launch(N, 1, FZ_THREADS, smem, [&] {
        fz_ce_fwd(logits.ptr(), targets.ptr(), loss.ptr(), lse.ptr(), V, ignore, ome, eov, smooth);
    });
    emu::launch(N, 1, FZ_THREADS, smem, [&] {
        fz_ce_bwd(logits.ptr(), targets.ptr(), lse.ptr(), grad.ptr(), count.ptr(), dl.ptr(), V,
                  ignore, ome, eov, smooth, gsize != 1, use_count);
    });
    logits.check(), grad.check(), count.check(), loss.check(), lse.check(), dl.check();
    targets.check();
    FILE* out = open(a[10], "wb");
    loss.write(out), lse.write(out), dl.write(out);
    std::fclose(out);
    return 0;
}

static int run_adamw(char** a) {  // SMEM N BLOCKS DECAY OMB1 B2 OMB2 SS BC2 EPS UD AMS IN OUT
    const unsigned smem = std::atoi(a[0]);
    const long long n = std::atoll(a[1]);
    const unsigned blocks = std::atoi(a[2]);
    float f[7];
    for (int i = 0; i < 7; ++i) f[i] = std::strtof(a[3 + i], nullptr);
    const int use_decay = std::atoi(a[10]), amsgrad = std::atoi(a[11]);
    Guarded<float> p(n, "p"), g(n, "g"), m(n, "m"), v(n, "v"), vmax(n, "vmax");
    FILE* in = open(a[12], "rb");
    p.read(in), g.read(in), m.read(in), v.read(in), vmax.read(in);
    std::fclose(in);
    emu::launch(blocks, 1, FZ_THREADS, smem, [&] {
        fz_adamw(p.ptr(), g.ptr(), m.ptr(), v.ptr(), amsgrad ? vmax.ptr() : v.ptr(), n, f[0], f[1],
                 f[2], f[3], f[4], f[5], f[6], use_decay, amsgrad);
    });
    p.check(), g.check(), m.check(), v.check(), vmax.check();
    FILE* out = open(a[13], "wb");
    p.write(out), m.write(out), v.write(out), vmax.write(out);
    std::fclose(out);
    return 0;
}

// ---------------------------------------------------------------- generic launch
// "launch": one kernel with the launcher's own argument list, marshalled the way
// cuLaunchKernel takes it (a pointer to each argument's value), and each argument's
// kind and size checked against the kernel's parameter type. IN:
//   int32 nbufs; per buffer: int64 nbytes, bytes
//   int32 nargs; per argument: int32 kind (0 buffer, 1 scalar), int32 size (the element
//     size for a buffer), int32 is_float, then int32 buffer index or `size` raw bytes
// OUT: every buffer's bytes, in order, after the kernel ran.

struct ArgSpec { int kind, size, is_float; };

template <class A>
static void check_arg(size_t i, const ArgSpec& s) {
    const std::string at = "argument " + std::to_string(i) + ": ";
    if constexpr (std::is_pointer<A>::value) {
        using E = std::remove_cv_t<std::remove_pointer_t<A>>;
        if (s.kind != 0) fail(at + "the kernel takes a pointer, the launcher passed a scalar");
        if (s.size != (int)sizeof(E) || s.is_float != (int)std::is_floating_point<E>::value)
            fail(at + "the array's element type does not match the kernel's pointer type");
    } else {
        if (s.kind != 1) fail(at + "the kernel takes a scalar, the launcher passed an array");
        if (s.size != (int)sizeof(A) || s.is_float != (int)std::is_floating_point<A>::value)
            fail(at + "the scalar's type does not match the kernel's parameter type");
    }
}

template <class... A, size_t... I>
static void call(void (*kernel)(A...), void** values, const std::vector<ArgSpec>& specs,
                 std::index_sequence<I...>) {
    if (specs.size() != sizeof...(A))
        fail("the launcher passed " + std::to_string(specs.size()) +
             " arguments, the kernel takes " + std::to_string(sizeof...(A)));
    (check_arg<A>(I, specs[I]), ...);
    emu::body = [=] { kernel(*static_cast<A*>(values[I])...); };
}

template <class... A>
static void prepare(void (*kernel)(A...), void** values, const std::vector<ArgSpec>& specs) {
    call(kernel, values, specs, std::index_sequence_for<A...>{});
}

static int run_launch(char** a) {  // NAME GX GY THREADS SMEM IN OUT
    const std::string name = a[0];
    const unsigned gx = std::atoi(a[1]), gy = std::atoi(a[2]), threads = std::atoi(a[3]);
    const unsigned smem = std::atoi(a[4]);
    FILE* in = open(a[5], "rb");
    auto get = [&](void* dst, size_t n) {
        if (std::fread(dst, 1, n, in) != n) fail("short input");
    };
    int32_t nbufs = 0, nargs = 0;
    get(&nbufs, 4);
    std::vector<Guarded<unsigned char>> bufs;
    bufs.reserve(nbufs);
    for (int i = 0; i < nbufs; ++i) {
        int64_t n = 0;
        get(&n, 8);
        bufs.emplace_back((size_t)n, "buffer");
        get(bufs.back().ptr(), (size_t)n);
    }
    get(&nargs, 4);
    std::vector<ArgSpec> specs(nargs);
    std::vector<void*> values(nargs);
    std::vector<void*> pointers(nargs);                     // storage for pointer arguments
    std::vector<std::vector<unsigned char>> scalars(nargs);  // storage for scalar arguments
    for (int i = 0; i < nargs; ++i) {
        int32_t head[3];
        get(head, 12);
        specs[i] = {head[0], head[1], head[2]};
        if (head[0] == 0) {
            int32_t index = 0;
            get(&index, 4);
            if (index < 0 || index >= nbufs) fail("bad buffer index");
            pointers[i] = bufs[index].ptr();
            values[i] = &pointers[i];
        } else {
            scalars[i].resize(head[1] < 8 ? 8 : head[1]);
            get(scalars[i].data(), head[1]);
            values[i] = scalars[i].data();
        }
    }
    std::fclose(in);
    void** v = values.data();
    if (name == "fz_norm_fwd") prepare(fz_norm_fwd, v, specs);
    else if (name == "fz_norm_bwd_dx") prepare(fz_norm_bwd_dx, v, specs);
    else if (name == "fz_norm_bwd_params") prepare(fz_norm_bwd_params, v, specs);
    else if (name == "fz_colsum") prepare(fz_colsum, v, specs);
    else if (name == "fz_ce_fwd") prepare(fz_ce_fwd, v, specs);
    else if (name == "fz_ce_bwd") prepare(fz_ce_bwd, v, specs);
    else if (name == "fz_adamw") prepare(fz_adamw, v, specs);
    else fail("unknown kernel " + name);
    const std::function<void()> kernel = emu::body;
    emu::launch(gx, gy, threads, smem, kernel);
    for (auto& b : bufs) b.check();
    FILE* out = open(a[6], "wb");
    for (auto& b : bufs) b.write(out);
    std::fclose(out);
    return 0;
}

int main(int argc, char** argv) {
    emu::order_from_env("FZ_EMU_ORDER");
    emu::shared_memory(fz_smem, SMEM_BYTES);
    emu::on_launch = [](unsigned threads, unsigned) {
        if (threads != FZ_THREADS) fail("launched with a block size other than FZ_THREADS");
    };
    const std::string op = argc > 1 ? argv[1] : "";
    if (op == "norm" && argc == 12) return run_norm(argv + 2);
    if (op == "ce" && argc == 13) return run_ce(argv + 2);
    if (op == "adamw" && argc == 16) return run_adamw(argv + 2);
    if (op == "launch" && argc == 9) return run_launch(argv + 2);
    fail("usage: emu norm|ce|adamw|launch ARGS... IN OUT (see the header of fused_emu.cpp)");
}
