// tests/cuda_emu.h: a header-only CPU emulation of one CUDA thread block, shared by the
// kernel emulators tests/flash_attention_emu.cpp and tests/fused_emu.cpp. A driver
// includes it, then the kernel source (.cu compiled as C++), then defines the kernel's
// extern __shared__ array and registers it with emu::shared_memory().
//
// What it emulates:
//   CUDA spellings      __global__, __device__, __shared__, __forceinline__,
//                       __launch_bounds__, __align__, threadIdx / blockIdx / gridDim,
//                       float2 / float4 / uint2 / uint4, __int_as_float, __uint_as_float
//   __syncthreads()     all live threads of the block, at the same barrier count
//   __shfl_xor_sync     all 32 lanes of the warp (deposit, rendezvous, read, rendezvous)
// Further warp collectives (a driver's mma, ldmatrix, ...) are built from
// emu::warp_rendezvous(), which every lane of the warp must reach before any goes on.
//
// Scheduling model: every thread of a block is a ucontext fiber, and blocks run one
// after another (blockIdx.y outer, blockIdx.x inner). The scheduler runs ONE warp at a
// time as far as it can go (through its warp collectives, up to the next __syncthreads
// or its exit), lowest warp first and lanes lowest first (highest first with
// emu::reverse, e.g. set from an environment variable by emu::order_from_env), so a
// warp runs ahead of the others: a missing __syncthreads shows up as a read of shared
// data another warp has not written yet, or has already overwritten. A warp collective
// is released once all 32 lanes of the warp wait at it; a barrier once every thread of
// the block waits at it.
//
// Errors print "EMULATION ERROR: <why>" on stderr and exit with status 3 (fail(), with
// _Exit: no static destructors, which would free the fiber stack it may run on): a
// deadlock, a barrier reached by some threads only (or in a branch), lanes of a warp at
// different collectives, a block size that is not a multiple of 32, dynamic shared
// memory above the registered capacity, or a shared-memory write past the launch's
// dynamic size. The whole shared memory starts every block as 0xFF bytes (NaN as
// float32, float16 and bfloat16), so reading unwritten shared memory shows up as NaN.
//
// Hooks a driver may set: emu::on_launch (checks a launch's shape), emu::on_block
// (resets per-thread state before a block starts), emu::on_exit (checks a thread that
// returned from the kernel).

#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#ifndef CUDA_EMU_STACK_BYTES
#define CUDA_EMU_STACK_BYTES (64 * 1024)  // per fiber
#endif

[[noreturn]] inline void fail(const std::string& why) {
    std::fprintf(stderr, "EMULATION ERROR: %s\n", why.c_str());
    std::fflush(nullptr);
    std::_Exit(3);  // not exit(): static destructors would free the fiber stack we run on
}

// ---------------------------------------------------------------- CUDA spellings

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

inline float __int_as_float(long long i) {  // long long: 0xff800000 is not an int
    const uint32_t u = (uint32_t)i;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct EmuDim3 { unsigned x, y, z; };
inline EmuDim3 blockIdx, gridDim;

// ---------------------------------------------------------------- fibers
// On x86-64 a fiber switch is 6 pushes, a stack swap and 6 pops (emu_switch below):
// glibc's swapcontext also saves and restores the signal mask, a system call per
// switch, which was a third of the emulators' time. Elsewhere: ucontext.

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define CUDA_EMU_FAST_SWITCH 1
// emu_switch(&save, to): push the callee-saved registers, save the stack pointer in
// *save, load `to` (a stack pointer saved the same way), pop, return into that fiber.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif

namespace emu {

enum State { READY, AT_BLOCK, AT_WARP, DONE };
struct Fiber {
    ucontext_t ctx;
    void* sp = nullptr;  // saved stack pointer (fast switch)
    State state = READY;
    unsigned tid = 0;
    long barriers = 0;     // __syncthreads calls so far
    long collectives = 0;  // warp rendezvous so far
};

inline std::vector<Fiber> fibers;
inline std::vector<float> shfl;  // one __shfl_xor_sync slot per thread
inline ucontext_t sched_ctx;
inline void* sched_sp = nullptr;
inline Fiber* cur = nullptr;
inline bool reverse = false;  // run threads and warps last-first
inline std::function<void()> body;
inline unsigned char* smem = nullptr;  // the kernel's extern __shared__ array
inline size_t smem_capacity = 0;       // its size in bytes
inline unsigned smem_size = 0;         // the current launch's dynamic shared memory
inline std::function<void(unsigned threads, unsigned smem)> on_launch;  // optional
inline std::function<void(unsigned nthreads)> on_block;                 // optional
inline std::function<void(unsigned tid)> on_exit;                       // optional
constexpr size_t STACK = CUDA_EMU_STACK_BYTES;

inline void shared_memory(void* array, size_t bytes) {
    smem = static_cast<unsigned char*>(array);
    smem_capacity = bytes;
}

// env=reverse runs warps and lanes highest first.
inline void order_from_env(const char* env) {
    const char* order = std::getenv(env);
    reverse = order && std::string(order) == "reverse";
}

inline void trampoline() {
    body();
    if (on_exit) on_exit(cur->tid);
    cur->state = DONE;  // uc_link returns to the scheduler
#ifdef CUDA_EMU_FAST_SWITCH
    void* dead;
    emu_switch(&dead, sched_sp);  // never resumed
#endif
}

// Switch from the scheduler into fiber f, until it blocks or exits.
inline void resume(Fiber& f) {
#ifdef CUDA_EMU_FAST_SWITCH
    emu_switch(&sched_sp, f.sp);
#else
    swapcontext(&sched_ctx, &f.ctx);
#endif
}

inline void block_on(State s) {
    cur->state = s;
#ifdef CUDA_EMU_FAST_SWITCH
    emu_switch(&cur->sp, sched_sp);
#else
    swapcontext(&cur->ctx, &sched_ctx);
#endif
}

// Wait until all 32 lanes of the calling thread's warp are here.
inline void warp_rendezvous() {
    cur->collectives++;
    block_on(AT_WARP);
}

inline void run_block(unsigned nthreads) {
    if (nthreads % 32) fail("block size is not a multiple of 32");
    static std::vector<std::vector<char>> stacks;  // reused from block to block
    while (stacks.size() < nthreads) stacks.emplace_back(STACK);
    fibers.assign(nthreads, Fiber());
    shfl.assign(nthreads, 0.f);
    if (on_block) on_block(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        f.tid = t;
#ifdef CUDA_EMU_FAST_SWITCH
        // a fresh stack that emu_switch "returns" into trampoline from: 6 zero registers,
        // then trampoline's address; rsp = 8 mod 16 at its entry, as after a call
        auto top = (reinterpret_cast<uintptr_t>(stacks[t].data()) + STACK) & ~uintptr_t(15);
        void** sp = reinterpret_cast<void**>(top) - 2;
        sp[0] = reinterpret_cast<void*>(&trampoline);
        sp[1] = nullptr;
        sp -= 6;
        for (int i = 0; i < 6; ++i) sp[i] = nullptr;
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].data();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &sched_ctx;
        makecontext(&f.ctx, trampoline, 0);
#endif
    }
    const unsigned nwarps = nthreads / 32;
    for (;;) {
        // Pick ONE warp that can move (lowest first, or highest with reverse): run its
        // ready lanes, or release its warp collective once all 32 lanes wait there. It
        // keeps the processor until it reaches a block barrier or exits, so it runs
        // ahead of every other warp.
        bool moved = false;
        for (unsigned i = 0; i < nwarps && !moved; ++i) {
            const unsigned w = reverse ? nwarps - 1 - i : i;
            Fiber* lanes = &fibers[32 * w];
            bool ready = false, all_at_warp = true;
            for (unsigned l = 0; l < 32; ++l) {
                ready = ready || lanes[l].state == READY;
                all_at_warp = all_at_warp && lanes[l].state == AT_WARP;
            }
            if (!ready && all_at_warp) {
                for (unsigned l = 1; l < 32; ++l)
                    if (lanes[l].collectives != lanes[0].collectives)
                        fail("lanes of one warp reached different warp collectives (divergence)");
                for (unsigned l = 0; l < 32; ++l) lanes[l].state = READY;
                ready = true;
            }
            if (!ready) continue;
            for (unsigned j = 0; j < 32; ++j) {
                Fiber& f = lanes[reverse ? 31 - j : j];
                if (f.state != READY) continue;
                cur = &f;
                resume(f);
            }
            moved = true;
        }
        if (moved) continue;
        unsigned done = 0, at_block = 0;
        for (Fiber& f : fibers) {
            done += f.state == DONE;
            at_block += f.state == AT_BLOCK;
        }
        if (done == nthreads) break;
        if (at_block == nthreads) {
            for (Fiber& f : fibers)
                if (f.barriers != fibers[0].barriers)
                    fail("threads waiting at different __syncthreads() (barrier in a branch)");
            for (Fiber& f : fibers) f.state = READY;
            continue;
        }
        if (at_block + done == nthreads) fail("__syncthreads() after some threads exited");
        fail("deadlock: a warp collective missing lanes, or lanes split between a warp "
             "collective and a block barrier");
    }
}

// Run kernel on every block of a gx x gy grid of `threads` threads each, with `smem`
// bytes of dynamic shared memory.
template <class F>
void launch(unsigned gx, unsigned gy, unsigned threads, unsigned smem_bytes, F&& kernel) {
    if (!smem) fail("no shared memory registered (emu::shared_memory)");
    if (smem_bytes > smem_capacity)
        fail("dynamic shared memory above " + std::to_string(smem_capacity / 1024) + " KB");
    if (on_launch) on_launch(threads, smem_bytes);
    gridDim = {gx, gy, 1};
    smem_size = smem_bytes;
    body = kernel;
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            blockIdx = {bx, by, 0};
            std::memset(smem, 0xff, smem_capacity);  // NaN as float, f16 and bf16
            run_block(threads);
            for (size_t i = smem_bytes; i < smem_capacity; ++i)
                if (smem[i] != 0xff) fail("shared-memory write past the dynamic size");
        }
    }
}

}  // namespace emu

// ---------------------------------------------------------------- thread-level CUDA

inline EmuDim3 emu_thread_idx() { return {emu::cur->tid, 0, 0}; }
#define threadIdx (emu_thread_idx())

inline void __syncthreads() {
    emu::cur->barriers++;
    emu::block_on(emu::AT_BLOCK);
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) fail("partial shuffle mask");
    const unsigned tid = emu::cur->tid, base = tid & ~31u, lane = tid & 31u;
    emu::shfl[tid] = v;
    emu::warp_rendezvous();  // every lane has deposited
    const float r = emu::shfl[base + (lane ^ (unsigned)lane_mask)];
    emu::warp_rendezvous();  // every lane has read
    return r;
}
