// host_shim.cpp -- host loops over the per-element math of easgd.cuh, for tests only.
//
// Built by tests/unit/test_kernels_host.py as a shared library and called through ctypes, so the
// kernel math is checked against the NumPy reference on machines without a GPU. Every function
// has the parameters of the CUDA kernel of the same name in easgd.cu (the NumPy method's
// parameters followed by n).
//
// Build: g++ -O3 -fPIC -shared -ffp-contract=off host_shim.cpp -o libeasgd_host.so
// -ffp-contract=off keeps g++ from fusing a*b+c into FMA (NumPy never does), which would break
// the bit-for-bit comparison on CPUs that have FMA.

#include "easgd.cuh"

extern "C" {

void easgd_scale(float* a, float s, long long n) {
    for (long long i = 0; i < n; ++i) easgd::scale(a[i], s);
}

void easgd_sgd_step(float* x, const float* g, float lr, float wd, long long n) {
    for (long long i = 0; i < n; ++i) easgd::sgd_step(x[i], g[i], lr, wd);
}

void easgd_exchange(float* x, const float* c, float* e, float alpha, long long n) {
    for (long long i = 0; i < n; ++i) easgd::exchange(x[i], c[i], e[i], alpha);
}

void easgd_exchange_sgd_step(float* x, const float* c, const float* g, float* e, float alpha,
                             float lr, float wd, long long n) {
    for (long long i = 0; i < n; ++i) {
        easgd::exchange_sgd_step(x[i], c[i], g[i], e[i], alpha, lr, wd);
    }
}

void easgd_nesterov_lookahead(const float* x, const float* v, float delta, float* y,
                              long long n) {
    for (long long i = 0; i < n; ++i) easgd::nesterov_lookahead(x[i], v[i], delta, y[i]);
}

void easgd_nesterov_step(float* x, float* v, const float* g, float lr, float delta, float wd,
                         long long n) {
    for (long long i = 0; i < n; ++i) easgd::nesterov_step(x[i], v[i], g[i], lr, delta, wd);
}

void easgd_exchange_nesterov_step(float* x, float* v, const float* c, const float* g, float* e,
                                  float alpha, float lr, float delta, float wd, long long n) {
    for (long long i = 0; i < n; ++i) {
        easgd::exchange_nesterov_step(x[i], v[i], c[i], g[i], e[i], alpha, lr, delta, wd);
    }
}

void easgd_downpour_step(float* x, float* acc, const float* g, float lr, float wd,
                         long long n) {
    for (long long i = 0; i < n; ++i) easgd::downpour_step(x[i], acc[i], g[i], lr, wd);
}

void easgd_sync_easgd_update(float* x, float* c, const float* xmean, float alpha, float beta,
                             long long n) {
    for (long long i = 0; i < n; ++i) easgd::sync_easgd_update(x[i], c[i], xmean[i], alpha, beta);
}

// Compressed pushes: the blocks one after the other (the kernel gives each to a thread).
#define EASGD_HOST_CODEC(CODEC, COMPRESS, DECOMPRESS)                                          \
    void COMPRESS(float* e, float* r, unsigned char* codes, float* scales, long long block,    \
                  long long n) {                                                              \
        for (long long b = 0; b * block < n; ++b) {                                            \
            const long long hi = (b + 1) * block < n ? (b + 1) * block : n;                    \
            easgd::compress_block<CODEC>(e, r, codes, scales, b * block, hi, b);               \
        }                                                                                     \
    }                                                                                         \
    void DECOMPRESS(const unsigned char* codes, const float* scales, float* out,               \
                    long long block, long long n) {                                           \
        for (long long i = 0; i < n; ++i) {                                                    \
            easgd::decompress_element<CODEC>(codes[i], scales[i / block], out[i]);             \
        }                                                                                     \
    }

EASGD_HOST_CODEC(easgd::INT8, easgd_compress_int8, easgd_decompress_int8)
EASGD_HOST_CODEC(easgd::FP8, easgd_compress_fp8, easgd_decompress_fp8)
#undef EASGD_HOST_CODEC

}  // extern "C"
