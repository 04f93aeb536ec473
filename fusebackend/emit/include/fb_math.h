// fusebackend component library: float math that auto-vectorizes on CPU (no libm calls inside loops: exp,
// exp2, expm1, log, log2, log10, log1p, tanh, erf, sinh, cosh; within ~1.4 ulp, tests/test_cpu_math.py); on CUDA
// the device's own accurate functions. Double precision uses the C library / device functions.
#pragma once
#include "fb_core.h"

namespace fb {

// A product that a following add or subtract is never fused with (an FMA keeps the product unrounded): what a
// graph's own multiply computes. CUDA kernels build with --fmad=true (the device math library is ~16% slower
// on a softmax without contraction); a graph-level a*b - c then still rounds a*b first, as eager's separate
// kernels do. Contracted, softmax(a*b) took exp of the product's rounding error (~1e3 for |a*b| ~ 1e10):
// inf/inf = NaN where eager gives 1 (GPU fuzzer, 2026-12-02). The CPU build has -ffp-contract=off.
template <class T> FB_HD T mul_rn(T a, T b) { return a * b; }
#if defined(__CUDA_ARCH__)   // device code only (nvcc's host pass and the CPU build keep a * b)
template <> FB_HD float mul_rn<float>(float a, float b) { return __fmul_rn(a, b); }
template <> FB_HD double mul_rn<double>(double a, double b) { return __dmul_rn(a, b); }
#endif

#if FB_CUDA
FB_HD float exp_(float x) { return expf(x); }
FB_HD float expm1_(float x) { return expm1f(x); }
FB_HD float log_(float x) { return logf(x); }
FB_HD float tanh_(float x) { return tanhf(x); }
FB_HD float erf_(float x) { return erff(x); }
FB_HD float sqrt_(float x) { return sqrtf(x); }
FB_HD float rsqrt_(float x) { return rsqrtf(x); }
FB_HD float floor_(float x) { return floorf(x); }
FB_HD float rint_(float x) { return rintf(x); }
FB_HD float sinh_(float x) { return sinhf(x); }
FB_HD float cosh_(float x) { return coshf(x); }
FB_HD float exp2_(float x) { return exp2f(x); }
FB_HD float log2_(float x) { return log2f(x); }
FB_HD float log10_(float x) { return log10f(x); }
FB_HD float log1p_(float x) { return log1pf(x); }
#else
FB_HD float floor_(float x) { return __builtin_floorf(x); }
FB_HD float rint_(float x) { return __builtin_rintf(x); }
FB_HD float sqrt_(float x) { return __builtin_sqrtf(x); }
FB_HD float rsqrt_(float x) { return 1.0f / __builtin_sqrtf(x); }
// Kernels build with -ffp-contract=off, so graph arithmetic rounds after every op as eager does (a*b+c is not
// fused into an FMA behind the user's back); the polynomials below ask for their FMAs explicitly.
FB_HD float fma_(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp: n = round(x / ln2); e^x = 2^n * e^r with |r| <= ln2/2, e^r by its Taylor series to degree 7.
FB_HD float exp_(float x) {
  float xc = x > 88.7228393f ? 88.7228393f : (x < -103.972084f ? -103.972084f : x);
  float n = rint_(xc * 1.44269504088896341f);
  float r = fma_(-n, 0.693145751953125f, xc);
  r = fma_(-n, 1.428606765330187e-06f, r);
  float p = 1.0f / 5040.0f;
  p = fma_(p, r, 1.0f / 720.0f); p = fma_(p, r, 1.0f / 120.0f); p = fma_(p, r, 1.0f / 24.0f);
  p = fma_(p, r, 1.0f / 6.0f); p = fma_(p, r, 0.5f); p = fma_(p, r, 1.0f); p = fma_(p, r, 1.0f);
  // 2^n as two factors (keeps denormal results exact); exponent bits from 32-bit integer ops only,
  // so the loop vectorizes at one lane width.
  uint32_t nb = float_to_bits(n + 12582912.0f) - 0x4B400000u;
  uint32_t n1 = (uint32_t)((int32_t)nb >> 1), n2 = nb - n1;
  float s1 = bits_to_float((n1 + 127u) << 23);
  float s2 = bits_to_float((n2 + 127u) << 23);
  float y = p * s1 * s2;
  y = x > 88.7228393f ? inf_f() : y;
  y = x < -103.972084f ? 0.0f : y;
  return x != x ? x : y;
}

// 2^x: n = round(x), r = x - n exactly, 2^r = e^(r ln2) by exp_'s series; exact at integers.
FB_HD float exp2_(float x) {
  float xc = x > 128.0f ? 128.0f : (x < -150.0f ? -150.0f : x);
  float n = rint_(xc);
  float r = xc - n;
  float t = fma_(r, 0.693145751953125f, r * 1.428606765330187e-06f);
  float p = 1.0f / 5040.0f;
  p = fma_(p, t, 1.0f / 720.0f); p = fma_(p, t, 1.0f / 120.0f); p = fma_(p, t, 1.0f / 24.0f);
  p = fma_(p, t, 1.0f / 6.0f); p = fma_(p, t, 0.5f); p = fma_(p, t, 1.0f); p = fma_(p, t, 1.0f);
  uint32_t nb = float_to_bits(n + 12582912.0f) - 0x4B400000u;
  uint32_t n1 = (uint32_t)((int32_t)nb >> 1), n2 = nb - n1;
  float y = p * bits_to_float((n1 + 127u) << 23) * bits_to_float((n2 + 127u) << 23);
  y = x >= 128.0f ? inf_f() : y;
  y = x < -150.0f ? 0.0f : y;
  return x != x ? x : y;
}

// e^x - 1: near 0 its Taylor series (e^x - 1 would cancel); for |x| < 16, x = n ln2 + r and
// e^x - 1 = 2^n (e^r - 1) + (2^n - 1), where 2^n - 1 is exact and one FMA rounds the sum; beyond, e^x - 1.
FB_HD float expm1_series_(float x) {  // |x| <= ln2 / 2
  float p = 1.0f / 362880.0f;
  p = fma_(p, x, 1.0f / 40320.0f); p = fma_(p, x, 1.0f / 5040.0f); p = fma_(p, x, 1.0f / 720.0f);
  p = fma_(p, x, 1.0f / 120.0f); p = fma_(p, x, 1.0f / 24.0f); p = fma_(p, x, 1.0f / 6.0f); p = fma_(p, x, 0.5f);
  return fma_(x * x, p, x);
}
FB_HD float expm1_(float x) {
  float xc = x > 16.0f ? 16.0f : (x < -16.0f ? -16.0f : x);
  float n = rint_(xc * 1.44269504088896341f);
  float r = fma_(-n, 0.693145751953125f, xc);
  r = fma_(-n, 1.428606765330187e-06f, r);
  float q = expm1_series_(r);
  float s = bits_to_float((float_to_bits(n + 12582912.0f) - 0x4B400000u + 127u) << 23);
  float mid = fma_(s, q, s - 1.0f);
  float y = (x > -16.0f && x < 16.0f) ? mid : exp_(x) - 1.0f;
  y = (x > -0.34657359f && x < 0.34657359f) ? expm1_series_(x) : y;
  return x == 0.0f ? x : y;  // the series gives +0 for -0
}

// Logarithms (FreeBSD's e_logf / musl's logf and log1pf, made branch-free): x = 2^k m, m in [sqrt(1/2),
// sqrt(2)), f = m - 1 exactly; log(1 + f) = f - hfsq + s (hfsq + R(s^2)) with s = f / (2 + f), hfsq = f^2 / 2.
FB_HD float log_reduce_(float x, float& fk) {  // returns f, sets fk = k; a subnormal x is scaled by 2^25 first
  bool sub = x < 1.17549435e-38f;
  uint32_t ix = float_to_bits(sub ? x * 33554432.0f : x) + (0x3f800000u - 0x3f3504f3u);
  fk = (float)((int32_t)(ix >> 23) - 0x7f - (sub ? 25 : 0));
  return bits_to_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
}
FB_HD float log_core_(float f, float& hfsq) {  // s (hfsq + R)
  float s = f / (2.0f + f), z = s * s, w = z * z;
  float t1 = w * fma_(w, 0.24279078841f, 0.40000972152f);
  float t2 = z * fma_(w, 0.28498786688f, 0.66666662693f);
  hfsq = 0.5f * f * f;
  return s * (hfsq + (t2 + t1));
}
FB_HD float log_special_(float x, float y) {  // log(0) = -inf, log(<0) = NaN, log(inf) = inf, NaN kept
  y = x == 0.0f ? -inf_f() : y;
  y = x < 0.0f ? nan_f() : y;
  y = x == inf_f() ? x : y;
  return x != x ? x : y;
}
FB_HD float log_(float x) {
  float k, hfsq, f = log_reduce_(x, k), r = log_core_(f, hfsq);
  return log_special_(x, r + k * 9.0580006145e-06f - hfsq + f + k * 6.9313812256e-01f);  // ln2 in two parts
}
FB_HD float log2_(float x) {  // (f - hfsq + r) / ln2 with 1/ln2 in two parts, the exact k added last
  float k, hfsq, f = log_reduce_(x, k), r = log_core_(f, hfsq);
  float hi = f - hfsq, lo = (f - hi) - hfsq + r;
  return log_special_(x, fma_(hi, 1.4428710938e+00f, fma_(lo + hi, -1.7605285393e-04f, lo * 1.4428710938e+00f)) + k);
}
FB_HD float log10_(float x) {  // k log10(2) + (f - hfsq + r) / ln10, the constants in two parts
  float k, hfsq, f = log_reduce_(x, k), r = log_core_(f, hfsq);
  float hi = f - hfsq, lo = (f - hi) - hfsq + r;
  return log_special_(x, k * 7.9034151668e-07f + (lo + hi) * -3.1689971365e-05f + lo * 4.3432617188e-01f
                             + hi * 4.3432617188e-01f + k * 3.0102920532e-01f);
}
FB_HD float log1p_(float x) {
  // u = 1 + x rounded; log1p(x) = log(u) + c / u, c = the rounding error of u. Where 1 + x stays in
  // [sqrt(1/2), sqrt(2)), f = x itself.
  float u = 1.0f + x, k, hfsq, fu = log_reduce_(u, k);
  float c = k >= 2.0f ? 1.0f - (u - x) : x - (u - 1.0f);
  c = k < 25.0f ? c / u : 0.0f;
  bool near = x > -0.29289321f && x < 0.41421356f;
  float f = near ? x : fu;
  c = near ? 0.0f : c;
  k = near ? 0.0f : k;
  float r = log_core_(f, hfsq);
  float y = r + (k * 9.0580006145e-06f + c) - hfsq + f + k * 6.9313812256e-01f;
  y = x == -1.0f ? -inf_f() : y;
  y = x < -1.0f ? nan_f() : y;
  y = x == inf_f() ? x : y;
  y = x == 0.0f ? x : y;  // log1p(-0) = -0
  return x != x ? x : y;
}

// tanh (Cephes tanhf): |x| < 0.625: x + x^3 P(x^2); beyond: 1 - 2 / (e^2|x| + 1); 1 from |x| > 9. The sign is
// set last (tanh(-0) = -0).
FB_HD float tanh_(float x) {
  uint32_t sign = float_to_bits(x) & 0x80000000u;
  float ax = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = fma_(p, z, 2.06390887954e-2f); p = fma_(p, z, -5.37397155531e-2f); p = fma_(p, z, 1.33314422036e-1f);
  p = fma_(p, z, -3.33332819422e-1f);
  float small = fma_(p * z, ax, ax);
  float e = exp_(2.0f * (ax > 9.0f ? 9.0f : ax));  // clamped: no inf/inf
  float big = ax > 9.0f ? 1.0f : 1.0f - 2.0f / (e + 1.0f);
  float y = bits_to_float(float_to_bits(ax < 0.625f ? small : big) | sign);
  return x != x ? x : y;
}

// erf: |x| < 1: x (c0 + x^2 Q(x^2)), c0 = 2/sqrt(pi) in two parts so that one FMA rounds last;
// 1 <= |x| < 4: 1 - exp(-x^2) P(1/(1+|x|)); beyond: +-1. Fitted polynomials.
FB_HD float erf_(float x) {
  uint32_t sign = float_to_bits(x) & 0x80000000u;
  float ax = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  float x2 = x * x;
  float q = 7.9332549537467647e-05f;
  q = fma_(q, x2, -0.00080347784975812902f); q = fma_(q, x2, 0.0051912110469394613f);
  q = fma_(q, x2, -0.026855395768201441f); q = fma_(q, x2, 0.11283625638555582f);
  q = fma_(q, x2, -0.37612629869499503f);
  float small = fma_(ax, 1.12837922573089599609375f, ax * fma_(q, x2, -5.913969047810497e-08f));
  small = bits_to_float(float_to_bits(small) | sign);  // erf(-0) = -0
  float t = 1.0f / (1.0f + ax);
  float p = 0.98100923924615213f;
  p = fma_(p, t, -3.3506224383880134f); p = fma_(p, t, 4.6242499122709582f); p = fma_(p, t, -2.8797580296486656f);
  p = fma_(p, t, 0.3185997948030504f); p = fma_(p, t, 0.17646548414119628f); p = fma_(p, t, 0.57576838354314208f);
  p = fma_(p, t, 0.56346941935162098f); p = fma_(p, t, 1.9301868427346467e-05f);
  float big = fma_(-exp_(-(ax < 4.0f ? x2 : 16.0f)), p, 1.0f);
  big = ax >= 4.0f ? 1.0f : big;
  big = bits_to_float(float_to_bits(big) | sign);
  return ax < 1.0f ? small : big;
}

// sinh, cosh from exp_: they overflow where exp(|x|) does (|x| > 88.72), as ATen's CPU kernels (Sleef) do
// (the C library's coshf stays finite up to 89.4); and they vectorize.
FB_HD float cosh_(float x) {
  float e = exp_(bits_to_float(float_to_bits(x) & 0x7fffffffu));
  return 0.5f * e + 0.5f / e;
}
FB_HD float sinh_(float x) {
  uint32_t sign = float_to_bits(x) & 0x80000000u;
  float ax = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  float t = expm1_(ax);                        // |x| < 1: no cancellation in e - 1/e
  float small = 0.5f * (t + t / (t + 1.0f));
  float e = exp_(ax);
  float big = 0.5f * e - 0.5f / e;
  float y = ax < 1.0f ? small : big;
  y = bits_to_float(float_to_bits(y) | sign);
  return x != x ? x : y;
}
#endif

// Double precision: the library functions (not the hot path).
FB_HD double exp_(double x) { return exp(x); }
FB_HD double expm1_(double x) { return expm1(x); }
FB_HD double log_(double x) { return log(x); }
FB_HD double tanh_(double x) { return tanh(x); }
FB_HD double erf_(double x) { return erf(x); }
FB_HD double sqrt_(double x) { return sqrt(x); }
FB_HD double rsqrt_(double x) { return 1.0 / sqrt(x); }
FB_HD double floor_(double x) { return floor(x); }
FB_HD double rint_(double x) { return rint(x); }
FB_HD double sinh_(double x) { return sinh(x); }
FB_HD double cosh_(double x) { return cosh(x); }
FB_HD double exp2_(double x) { return exp2(x); }
FB_HD double log2_(double x) { return log2(x); }
FB_HD double log10_(double x) { return log10(x); }
FB_HD double log1p_(double x) { return log1p(x); }

}  // namespace fb
