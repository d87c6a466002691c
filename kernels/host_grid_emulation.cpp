// host_grid_emulation.cpp -- runs the __global__ kernels of easgd.cu on the host, for tests only.
//
// The kernels are grid-stride loops with no shared memory and no synchronisation, so running
// every (block, thread) of a grid one after the other computes exactly what the GPU computes.
// This lets machines without a GPU test the launch logic itself: the float4 body, the scalar
// head that aligns equal-offset views, the scalar tail, and the all-scalar path for pointers
// that disagree modulo 16. tests/unit/test_kernels_host.py builds it with g++ and calls
//   easgd_emu_set_thread(block, thread, grid_dim, block_dim)
// before each call of a kernel (same name and parameters as in easgd.cu) through ctypes, and
//   easgd_emu_misaligned()
// afterwards: the number of float4 accesses that were not 16-byte aligned (then resets it).
//
// Build: g++ -O2 -fPIC -shared -ffp-contract=off -fno-strict-aliasing -I kernels
//            host_grid_emulation.cpp -o libeasgd_emu.so
// (-fno-strict-aliasing: the kernels read float buffers through float4 pointers, which the
// device allows and host C++ formally does not.)

#if defined(__CUDACC__)
#error "host_grid_emulation.cpp is for a host compiler; nvcc compiles easgd.cu itself"
#endif

// The CUDA vocabulary easgd.cu uses, reduced to plain C++.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// A GPU faults on a float4 access that is not 16-byte aligned; x86 does not. So every copy of
// a float4 from or to memory checks the address and counts offenders, which the tests read
// through easgd_emu_misaligned(). (Not alignas(16) on purpose: then g++ would use aligned SSE
// moves and crash the test process instead of reporting.)
static long long emu_misaligned = 0;

static inline void emu_check_aligned(const void* p) {
    if (reinterpret_cast<unsigned long long>(p) % 16 != 0) ++emu_misaligned;
}

struct float4 {
    float x, y, z, w;
    float4() = default;
    float4(const float4& o) : x(o.x), y(o.y), z(o.z), w(o.w) { emu_check_aligned(&o); }
    float4& operator=(const float4& o) {
        emu_check_aligned(this);
        emu_check_aligned(&o);
        x = o.x;
        y = o.y;
        z = o.z;
        w = o.w;
        return *this;
    }
};

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};

static EmuDim3 blockIdx, threadIdx, blockDim, gridDim;

extern "C" long long easgd_emu_misaligned() {
    const long long n = emu_misaligned;
    emu_misaligned = 0;
    return n;
}

extern "C" void easgd_emu_set_thread(unsigned block, unsigned thread, unsigned grid_dim,
                                     unsigned block_dim) {
    blockIdx.x = block;
    threadIdx.x = thread;
    gridDim.x = grid_dim;
    blockDim.x = block_dim;
}

#include "easgd.cu"
