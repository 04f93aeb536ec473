// fusebackend component library: float math that auto-vectorizes on CPU (no libm calls inside loops);
// on CUDA the device's own accurate functions. Double precision uses the C library / device functions.
#pragma once
#include "fb_core.h"

namespace fb {

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

FB_HD float expm1_(float x) {
  // Taylor series near 0, where exp(x) - 1 would cancel.
  float p = 1.0f / 362880.0f;
  p = fma_(p, x, 1.0f / 40320.0f); p = fma_(p, x, 1.0f / 5040.0f); p = fma_(p, x, 1.0f / 720.0f);
  p = fma_(p, x, 1.0f / 120.0f); p = fma_(p, x, 1.0f / 24.0f); p = fma_(p, x, 1.0f / 6.0f); p = fma_(p, x, 0.5f);
  float small = fma_(x * x, p, x);
  float big = exp_(x) - 1.0f;
  return (x > -0.34657359f && x < 0.34657359f) ? small : big;
}

// log: x = m * 2^e with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m-1)/(m+1), odd series.
FB_HD float log_(float x) {
  bool tiny = x < 1.17549435e-38f;
  float xs = tiny ? x * 8388608.0f : x;  // lift denormals
  uint32_t u = float_to_bits(xs);
  uint32_t eb = ((u >> 23) & 0xffu) - (tiny ? 150u : 127u);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);
  bool hi = m > 1.41421356f;
  m = hi ? m * 0.5f : m;
  eb = hi ? eb + 1u : eb;
  float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 2.0f / 11.0f;
  p = fma_(p, s2, 2.0f / 9.0f); p = fma_(p, s2, 2.0f / 7.0f); p = fma_(p, s2, 2.0f / 5.0f); p = fma_(p, s2, 2.0f / 3.0f);
  float lm = fma_(s * s2, p, 2.0f * s);
  float fe = (float)(int32_t)eb;
  float y = fma_(fe, 0.693145751953125f, fma_(fe, 1.428606765330187e-06f, lm));
  y = x == 0.0f ? -inf_f() : y;
  y = x < 0.0f ? nan_f() : y;
  y = x == inf_f() ? x : y;
  return x != x ? x : y;
}

FB_HD float tanh_(float x) {
  uint32_t sign = float_to_bits(x) & 0x80000000u;
  float ax = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  float t = expm1_(2.0f * ax);  // inf for large ax is replaced below (no clamp: it would narrow int lanes)
  float y = t / (t + 2.0f);
  y = ax > 9.0f ? 1.0f : y;
  y = bits_to_float(float_to_bits(y) | sign);
  return x != x ? x : y;
}

// erf: |x| < 1: x * P(x^2); 1 <= |x| < 4: 1 - exp(-x^2) * Q(1/(1+|x|)); beyond: +-1. Fitted polynomials.
FB_HD float erf_(float x) {
  uint32_t sign = float_to_bits(x) & 0x80000000u;
  float ax = bits_to_float(float_to_bits(x) & 0x7fffffffu);
  float x2 = x * x;
  float p = 7.9332549537467647e-05f;
  p = fma_(p, x2, -0.00080347784975812902f); p = fma_(p, x2, 0.0051912110469394613f);
  p = fma_(p, x2, -0.026855395768201441f); p = fma_(p, x2, 0.11283625638555582f);
  p = fma_(p, x2, -0.37612629869499503f); p = fma_(p, x2, 1.1283791665912066f);
  float small = x * p;
  float t = 1.0f / (1.0f + ax);
  float q = 0.98100923924615213f;
  q = fma_(q, t, -3.3506224383880134f); q = fma_(q, t, 4.6242499122709582f); q = fma_(q, t, -2.8797580296486656f);
  q = fma_(q, t, 0.3185997948030504f); q = fma_(q, t, 0.17646548414119628f); q = fma_(q, t, 0.57576838354314208f);
  q = fma_(q, t, 0.56346941935162098f); q = fma_(q, t, 1.9301868427346467e-05f);
  float big = fma_(-exp_(-(ax < 4.0f ? x2 : 16.0f)), q, 1.0f);
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

}  // namespace fb
