// easgd.cu -- fused CUDA kernels, one per fused method of NumpyBackend (docs/ARCHITECTURE.md §6.3).
//
// Each kernel is one grid-stride pass over flat float32 vectors of n elements, updated in place;
// its parameters are the NumPy method's parameters in the same order, followed by n. The
// per-element math lives in easgd.cuh (shared with the host build the tests check against NumPy).
//
// Memory access: 16-byte float4 loads and stores when every pointer has the same address modulo
// 16 (always the case for 16-byte aligned flat buffers and for equal-offset views into them). A
// short scalar head brings the pointers to a 16-byte boundary and a scalar tail finishes the last
// n % 4 elements. Pointers that disagree modulo 16 (e.g. a chunk of a flat buffer against a
// staging buffer that starts at 0) take the scalar path for the whole vector: still coalesced,
// only with 4-byte instead of 16-byte transactions per thread.
//
// Dependency-free on purpose (no includes), so CuPy's NVRTC compiles it as it is. CupyBackend
// inlines easgd.cuh in place of the #include below, so the text compiled is exactly these files.

#include "easgd.cuh"

namespace {

// Which elements go through float4: [head, head + 4*nvec); the rest are scalar.
struct Plan {
    long long head;  // scalar elements before the first 16-byte boundary
    long long nvec;  // float4 groups after the head
};

__device__ __forceinline__ unsigned phase16(const void* p) {
    return static_cast<unsigned>(reinterpret_cast<unsigned long long>(p) & 15ull);
}

template <int K>
__device__ __forceinline__ Plan make_plan(const void* const (&ptrs)[K], long long n) {
    const unsigned ph = phase16(ptrs[0]);
    bool same = (ph & 3u) == 0u;  // a float that is not 4-byte aligned cannot be vectorised
    for (int k = 1; k < K; ++k) same = same && phase16(ptrs[k]) == ph;
    Plan p;
    if (!same) {
        p.head = n;
        p.nvec = 0;
        return p;
    }
    const long long head = static_cast<long long>(((16u - ph) & 15u) / 4u);
    p.head = head < n ? head : n;
    p.nvec = (n - p.head) / 4;
    return p;
}

__device__ __forceinline__ long long first_index() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}

// The j-th scalar element: the head first, then the tail after the vector body.
__device__ __forceinline__ long long scalar_index(long long j, const Plan& p) {
    return j < p.head ? j : j + 4 * p.nvec;
}

__device__ __forceinline__ long long scalar_count(const Plan& p, long long n) {
    return n - 4 * p.nvec;
}

template <typename T>
__device__ __forceinline__ float4* vec(T* p, const Plan& pl) {
    return reinterpret_cast<float4*>(const_cast<float*>(p) + pl.head);
}

}  // namespace

// Apply OP to the four lanes of float4 registers: OP(x) OP(y) OP(z) OP(w).
#define EASGD_LANES(OP) OP(x) OP(y) OP(z) OP(w)

extern "C" __global__ void easgd_scale(float* a, float s, long long n) {
    const void* ptrs[] = {a};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* a4 = vec(a, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 av = a4[i];
#define OP(l) easgd::scale(av.l, s);
        EASGD_LANES(OP)
#undef OP
        a4[i] = av;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::scale(a[i], s);
    }
}

extern "C" __global__ void easgd_sgd_step(float* x, const float* g, float lr, float wd,
                                          long long n) {
    const void* ptrs[] = {x, g};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    const float4* g4 = vec(g, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        const float4 gv = g4[i];
#define OP(l) easgd::sgd_step(xv.l, gv.l, lr, wd);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::sgd_step(x[i], g[i], lr, wd);
    }
}

extern "C" __global__ void easgd_exchange(float* x, const float* c, float* e, float alpha,
                                          long long n) {
    const void* ptrs[] = {x, c, e};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    const float4* c4 = vec(c, pl);
    float4* e4 = vec(e, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        const float4 cv = c4[i];
        float4 ev;
#define OP(l) easgd::exchange(xv.l, cv.l, ev.l, alpha);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        e4[i] = ev;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::exchange(x[i], c[i], e[i], alpha);
    }
}

extern "C" __global__ void easgd_exchange_sgd_step(float* x, const float* c, const float* g,
                                                   float* e, float alpha, float lr, float wd,
                                                   long long n) {
    const void* ptrs[] = {x, c, g, e};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    const float4* c4 = vec(c, pl);
    const float4* g4 = vec(g, pl);
    float4* e4 = vec(e, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        const float4 cv = c4[i];
        const float4 gv = g4[i];
        float4 ev;
#define OP(l) easgd::exchange_sgd_step(xv.l, cv.l, gv.l, ev.l, alpha, lr, wd);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        e4[i] = ev;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::exchange_sgd_step(x[i], c[i], g[i], e[i], alpha, lr, wd);
    }
}

extern "C" __global__ void easgd_nesterov_lookahead(const float* x, const float* v, float delta,
                                                    float* y, long long n) {
    const void* ptrs[] = {x, v, y};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    const float4* x4 = vec(x, pl);
    const float4* v4 = vec(v, pl);
    float4* y4 = vec(y, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        const float4 xv = x4[i];
        const float4 vv = v4[i];
        float4 yv;
#define OP(l) easgd::nesterov_lookahead(xv.l, vv.l, delta, yv.l);
        EASGD_LANES(OP)
#undef OP
        y4[i] = yv;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::nesterov_lookahead(x[i], v[i], delta, y[i]);
    }
}

extern "C" __global__ void easgd_nesterov_step(float* x, float* v, const float* g, float lr,
                                               float delta, float wd, long long n) {
    const void* ptrs[] = {x, v, g};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    float4* v4 = vec(v, pl);
    const float4* g4 = vec(g, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        float4 vv = v4[i];
        const float4 gv = g4[i];
#define OP(l) easgd::nesterov_step(xv.l, vv.l, gv.l, lr, delta, wd);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        v4[i] = vv;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::nesterov_step(x[i], v[i], g[i], lr, delta, wd);
    }
}

extern "C" __global__ void easgd_exchange_nesterov_step(float* x, float* v, const float* c,
                                                        const float* g, float* e, float alpha,
                                                        float lr, float delta, float wd,
                                                        long long n) {
    const void* ptrs[] = {x, v, c, g, e};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    float4* v4 = vec(v, pl);
    const float4* c4 = vec(c, pl);
    const float4* g4 = vec(g, pl);
    float4* e4 = vec(e, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        float4 vv = v4[i];
        const float4 cv = c4[i];
        const float4 gv = g4[i];
        float4 ev;
#define OP(l) easgd::exchange_nesterov_step(xv.l, vv.l, cv.l, gv.l, ev.l, alpha, lr, delta, wd);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        v4[i] = vv;
        e4[i] = ev;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::exchange_nesterov_step(x[i], v[i], c[i], g[i], e[i], alpha, lr, delta, wd);
    }
}

extern "C" __global__ void easgd_downpour_step(float* x, float* acc, const float* g, float lr,
                                               float wd, long long n) {
    const void* ptrs[] = {x, acc, g};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    float4* a4 = vec(acc, pl);
    const float4* g4 = vec(g, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        float4 av = a4[i];
        const float4 gv = g4[i];
#define OP(l) easgd::downpour_step(xv.l, av.l, gv.l, lr, wd);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        a4[i] = av;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::downpour_step(x[i], acc[i], g[i], lr, wd);
    }
}

extern "C" __global__ void easgd_sync_easgd_update(float* x, float* c, const float* xmean,
                                                   float alpha, float beta, long long n) {
    const void* ptrs[] = {x, c, xmean};
    const Plan pl = make_plan(ptrs, n);
    const long long i0 = first_index(), st = grid_stride();
    float4* x4 = vec(x, pl);
    float4* c4 = vec(c, pl);
    const float4* m4 = vec(xmean, pl);
    for (long long i = i0; i < pl.nvec; i += st) {
        float4 xv = x4[i];
        float4 cv = c4[i];
        const float4 mv = m4[i];
#define OP(l) easgd::sync_easgd_update(xv.l, cv.l, mv.l, alpha, beta);
        EASGD_LANES(OP)
#undef OP
        x4[i] = xv;
        c4[i] = cv;
    }
    for (long long j = i0; j < scalar_count(pl, n); j += st) {
        const long long i = scalar_index(j, pl);
        easgd::sync_easgd_update(x[i], c[i], xmean[i], alpha, beta);
    }
}

#undef EASGD_LANES

// ---- compressed pushes (docs/ARCHITECTURE.md section 2.10) --------------------------------------
// One thread per block of `block` elements: it finds the block's largest magnitude, then codes
// the block (easgd::compress_block). No shared memory and no synchronisation between threads,
// so host_grid_emulation.cpp runs it exactly. Each thread walks its own block: the accesses of
// a warp are `block` floats apart rather than coalesced; a chunk of 2^22 floats still has
// 16384 blocks of 256 in flight. r == nullptr: no error feedback (the residual is not kept).
#define EASGD_COMPRESS_KERNEL(NAME, CODEC)                                                    \
    extern "C" __global__ void NAME(float* e, float* r, unsigned char* codes, float* scales,   \
                                    long long block, long long n) {                           \
        const long long blocks = (n + block - 1) / block;                                     \
        for (long long b = first_index(); b < blocks; b += grid_stride()) {                    \
            const long long lo = b * block;                                                   \
            const long long hi = lo + block < n ? lo + block : n;                             \
            easgd::compress_block<CODEC>(e, r, codes, scales, lo, hi, b);                     \
        }                                                                                     \
    }

// Element by element (coalesced): out = value(code) * scale of the element's block.
#define EASGD_DECOMPRESS_KERNEL(NAME, CODEC)                                                  \
    extern "C" __global__ void NAME(const unsigned char* codes, const float* scales,           \
                                    float* out, long long block, long long n) {               \
        for (long long i = first_index(); i < n; i += grid_stride()) {                         \
            easgd::decompress_element<CODEC>(codes[i], scales[i / block], out[i]);             \
        }                                                                                     \
    }

EASGD_COMPRESS_KERNEL(easgd_compress_int8, easgd::INT8)
EASGD_COMPRESS_KERNEL(easgd_compress_fp8, easgd::FP8)
EASGD_DECOMPRESS_KERNEL(easgd_decompress_int8, easgd::INT8)
EASGD_DECOMPRESS_KERNEL(easgd_decompress_fp8, easgd::FP8)

#undef EASGD_COMPRESS_KERNEL
#undef EASGD_DECOMPRESS_KERNEL
