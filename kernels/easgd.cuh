// easgd.cuh -- the per-element math of every EASGD update rule (docs/ARCHITECTURE.md §2 and §6).
//
// One inline function per fused method of easgd_mpi.backend.numpy_backend.NumpyBackend, which is
// the reference. Each function evaluates its formula in float32, one rounding per operation, in
// exactly the order NumpyBackend does, so that a host build matches NumPy bit for bit and a device
// build does too (NumPy never fuses a*b+c, so neither may we). One exception on the device: CuPy
// compiles with -ftz=true, which flushes subnormal floats (|v| < 1.2e-38) to zero.
//
// The same text compiles three ways:
//   * nvcc / NVRTC, device code: __host__ __device__ __forceinline__; the arithmetic goes through
//     the __fmul_rn/__fadd_rn/__fsub_rn intrinsics, which the compiler never contracts into FMA,
//     so the result does not depend on --fmad.
//   * g++ (host shim for tests): static inline with plain operators; build with
//     -ffp-contract=off (and no -ffast-math) so that g++ does not contract either.
//   * nvcc host pass: same as g++.
// No includes: NVRTC compiles this without any CUDA or C++ headers.
//
// Notation: lr = eta, alpha = eta*rho, beta = p*alpha, delta = momentum, wd = weight decay.
// Outputs are passed by reference; every input is read before any output is written, so an
// output may alias an input of the same element.

#ifndef EASGD_CUH
#define EASGD_CUH

#if defined(__CUDACC__)
#define EASGD_FN __host__ __device__ __forceinline__
#else
#define EASGD_FN static inline
#endif

namespace easgd {

// ---- float32 arithmetic, one rounding each, never fused ------------------------------------
EASGD_FN float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

EASGD_FN float add(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

EASGD_FN float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

// ---- the rules ---------------------------------------------------------------------------------

// a <- s*a
EASGD_FN void scale(float& a, float s) { a = mul(a, s); }

// x <- x - lr*(g + wd*x)
EASGD_FN void sgd_step(float& x, float g, float lr, float wd) {
    const float t = add(g, mul(wd, x));
    x = sub(x, mul(lr, t));
}

// e <- alpha*(x - c);  x <- x - e
EASGD_FN void exchange(float& x, float c, float& e, float alpha) {
    const float ee = mul(sub(x, c), alpha);
    x = sub(x, ee);
    e = ee;
}

// e <- alpha*(x - c);  x <- (x - e) - lr*(g + wd*x)   (gradient term from the old x)
EASGD_FN void exchange_sgd_step(float& x, float c, float g, float& e,
                                float alpha, float lr, float wd) {
    const float t = mul(add(g, mul(wd, x)), lr);
    const float ee = mul(sub(x, c), alpha);
    x = sub(sub(x, ee), t);
    e = ee;
}

// y <- x + delta*v   (NumPy computes v*delta, then adds x)
EASGD_FN void nesterov_lookahead(float x, float v, float delta, float& y) {
    y = add(mul(v, delta), x);
}

// v <- delta*v - lr*(g + wd*(x + delta*v));  x <- x + v   (old x and v on the right)
EASGD_FN void nesterov_step(float& x, float& v, float g, float lr, float delta, float wd) {
    const float dv = mul(delta, v);
    const float t = mul(add(g, mul(wd, add(x, dv))), lr);
    const float vv = sub(dv, t);
    x = add(x, vv);
    v = vv;
}

// e <- alpha*(x - c);  v <- delta*v - lr*(g + wd*(x + delta*v));  x <- (x - e) + v
EASGD_FN void exchange_nesterov_step(float& x, float& v, float c, float g, float& e,
                                     float alpha, float lr, float delta, float wd) {
    const float dv = mul(delta, v);
    const float t = mul(add(g, mul(wd, add(x, dv))), lr);
    const float ee = mul(sub(x, c), alpha);
    const float vv = sub(dv, t);
    x = add(sub(x, ee), vv);
    v = vv;
    e = ee;
}

// d <- -lr*(g + wd*x);  x <- x + d;  acc <- acc + d
EASGD_FN void downpour_step(float& x, float& acc, float g, float lr, float wd) {
    const float t = add(g, mul(wd, x));
    const float d = mul(-lr, t);  // negation is exact: same as NumPy's float32(-lr)
    x = add(x, d);
    acc = add(acc, d);
}

// x <- x - alpha*(x - c);  c <- (1 - beta)*c + beta*xmean   (both from the old x and c)
EASGD_FN void sync_easgd_update(float& x, float& c, float xmean, float alpha, float beta) {
    const float diff = mul(sub(x, c), alpha);
    const float cc = add(mul(c, sub(1.0f, beta)), mul(beta, xmean));
    x = sub(x, diff);
    c = cc;
}

}  // namespace easgd

#endif  // EASGD_CUH
