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

EASGD_FN float div(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

// The nearest integer, halves to even (NumPy's rint); |a| < 2^31.
EASGD_FN int round_even(float a) {
#if defined(__CUDA_ARCH__)
    return __float2int_rn(a);
#else
    return static_cast<int>(__builtin_rintf(a));
#endif
}

EASGD_FN unsigned int bits_of(float a) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(a);
#else
    unsigned int u;
    __builtin_memcpy(&u, &a, sizeof u);
    return u;
#endif
}

EASGD_FN float float_of(unsigned int u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float a;
    __builtin_memcpy(&a, &u, sizeof a);
    return a;
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

// ---- compressed pushes with error feedback (docs/ARCHITECTURE.md section 2.10) -----------------
// NumpyBackend.compress / decompress are the reference. Per block of B consecutive elements:
//   v = e + r;  s = max|v| / Q;  q = code(v / s);  d = value(q) * s;  r = v - d;  e = d
// Q = 127 (int8: round half to even, clamp to +-127) or 448 (fp8 E4M3, round half to even).
// s = 0 codes every element as 0 (d = 0); a non-finite s (a non-finite v) also codes 0, and
// d = 0 * s is NaN, so the caller's finiteness test (section 2.8) drops the block's chunk.

enum Codec { INT8 = 0, FP8 = 1 };

template <int C>
EASGD_FN float codec_max() { return C == INT8 ? 127.0f : 448.0f; }

// max(m, |v|), NaN once any v is NaN (as NumPy's max)
EASGD_FN float absmax(float m, float v) {
    const float a = float_of(bits_of(v) & 0x7FFFFFFFu);
    return (a > m || a != a) ? a : m;
}

EASGD_FN bool usable_scale(float s) { return s > 0.0f && sub(s, s) == 0.0f; }

// FP8 E4M3 (OCP "e4m3fn"): 4 exponent bits (bias 7), 3 mantissa bits, subnormals, largest 448.
EASGD_FN unsigned int e4m3_encode(float y) {
    const unsigned int sign = (bits_of(y) >> 31) << 7;
    const float a = float_of(bits_of(y) & 0x7FFFFFFFu);
    unsigned int code;
    if (a < 0.015625f) {  // below 2^-6: subnormal codes, multiples of 2^-9 (8 is 2^-6's code)
        code = static_cast<unsigned int>(round_even(mul(a, 512.0f)));
    } else {  // keep 3 mantissa bits, halves to even; saturate at 448 = 1.75 * 2^8
        unsigned int b = bits_of(a);
        b = (b + 0x7FFFFu + ((b >> 20) & 1u)) & 0xFFF00000u;
        if (b > 0x43E00000u) b = 0x43E00000u;
        code = (((b >> 23) - 120u) << 3) | ((b >> 20) & 7u);
    }
    return (sign | code) & 0xFFu;
}

EASGD_FN float e4m3_decode(unsigned int code) {
    const unsigned int exp = (code >> 3) & 15u, man = code & 7u;
    const float a = exp == 0u ? mul(static_cast<float>(man), 0.001953125f)  // man * 2^-9
                              : float_of(((exp + 120u) << 23) | (man << 20));
    return (code & 0x80u) ? -a : a;
}

// The value a code stands for, before its block's scale.
template <int C>
EASGD_FN float code_value(unsigned int code) {
    if (C == INT8) return static_cast<float>(code < 128u ? static_cast<int>(code)
                                                         : static_cast<int>(code) - 256);
    return e4m3_decode(code);
}

// q = code(v / s); d = value(q) * s
template <int C>
EASGD_FN void quantize(float v, float s, unsigned char& code, float& d) {
    unsigned int q = 0u;
    if (usable_scale(s)) {
        const float y = div(v, s);
        if (C == INT8) {
            int k = round_even(y);
            k = k > 127 ? 127 : (k < -127 ? -127 : k);
            q = static_cast<unsigned int>(k) & 0xFFu;
        } else {
            q = e4m3_encode(y);
        }
    }
    code = static_cast<unsigned char>(q);
    d = mul(code_value<C>(q), s);
}

// One block [lo, hi) of e (and r; r == nullptr: no error feedback), scale scales[b].
template <int C>
EASGD_FN void compress_block(float* e, float* r, unsigned char* codes, float* scales,
                             long long lo, long long hi, long long b) {
    float m = 0.0f;
    for (long long i = lo; i < hi; ++i) m = absmax(m, r ? add(e[i], r[i]) : e[i]);
    const float s = div(m, codec_max<C>());
    scales[b] = s;
    for (long long i = lo; i < hi; ++i) {
        const float v = r ? add(e[i], r[i]) : e[i];
        float d;
        quantize<C>(v, s, codes[i], d);
        if (r) r[i] = sub(v, d);
        e[i] = d;
    }
}

// out = value(code) * s of the element's block
template <int C>
EASGD_FN void decompress_element(unsigned char code, float s, float& out) {
    out = mul(code_value<C>(code), s);
}

}  // namespace easgd

#endif  // EASGD_CUH
