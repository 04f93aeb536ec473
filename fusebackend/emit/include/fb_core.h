// fusebackend component library: core types and conversions.
// Every function is __host__ __device__-clean so the same components build with NVRTC (CUDA) and g++ (CPU).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FB_CUDA 1
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_CUDA 0
#define FB_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDACC_RTC__)
// NVRTC has no system headers: the few fixed-width types we need.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#endif

// An index out of its tensor's range (embedding, gather, index_select, x[idx]) is an error, as in eager:
// CUDA kernels trap (eager fails a device assert); CPU kernels raise the library's flag, which the runtime
// turns into IndexError, and read position 0 so that no load leaves the tensor.
#if defined(__CUDA_ARCH__)
#define FB_CHECK_INDEX(r, n) do { if ((uint64_t)(r) >= (uint64_t)(n)) __trap(); } while (0)
#elif FB_CUDA
#define FB_CHECK_INDEX(r, n) do { if ((uint64_t)(r) >= (uint64_t)(n)) abort(); } while (0)
#else
extern "C" { __attribute__((visibility("default"))) int fb_index_error = 0; }
#define FB_CHECK_INDEX(r, n) do { if ((uint64_t)(r) >= (uint64_t)(n)) { fb_index_error = 1; (r) = 0; } } while (0)
#endif

namespace fb {

FB_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}
FB_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}
FB_HD float inf_f() { return bits_to_float(0x7f800000u); }
FB_HD float nan_f() { return bits_to_float(0x7fc00000u); }

// bfloat16 storage: the upper 16 bits of a float; stores round to nearest even, NaN kept quiet.
struct bf16 { uint16_t x; };
FB_HD float to_float(bf16 v) { return bits_to_float(((uint32_t)v.x) << 16); }
#if FB_CUDA
FB_HD bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (uint16_t)((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.x = (uint16_t)(u >> 16);
  return r;
}
#else
// CPU: the same bits in fewer vector ops (a bf16 row kernel is bound by them: rmsnorm 1024x4096 spent ~20% of
// its time rounding). The rounding bias as one select on the kept LSB, NaN tested as a float compare (one op,
// not an and plus an integer compare), the select kept on 32-bit lanes before the narrowing shift.
FB_HD uint32_t bf16_rne_bits(float f) {  // the float's bits rounded so that the upper 16 are the bf16
  uint32_t u = float_to_bits(f);
  uint32_t t = u + ((u & 0x10000u) ? 0x8000u : 0x7fffu);
  return f != f ? (u | 0x400000u) : t;
}
FB_HD bf16 to_bf16(float f) {
  bf16 r;
  r.x = (uint16_t)(bf16_rne_bits(f) >> 16);
  return r;
}
#endif

// float16 storage: hardware conversions on the GPU and with g++; bit arithmetic for nvcc's host pass.
struct half { uint16_t x; };
FB_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: value = man * 2^-24
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
FB_HD uint16_t float_to_half_bits(float f) {
  uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);      // rounds to infinity
  if (a < 0x38800000u) {                                          // subnormal half (or zero)
    float v = bits_to_float(a) * 16777216.0f;                     // scale by 2^24, round to integer
    uint32_t m = (uint32_t)v; float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return (uint16_t)(sign | m);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return (uint16_t)(sign | (r >> 13));
}
#if !FB_CUDA
// CPU: the same conversions without branches, so g++ vectorises a loop that loads or stores float16 (a
// _Float16 cast is one F16C instruction per element, and without AVX512-FP16 the vectoriser rejects the
// type, so the whole loop ran scalar). Bit-exact with the hardware conversion for every half and float
// (round to nearest even, subnormals, infinities; a NaN stays a NaN of the same sign).
FB_HD float half_bits_to_float_cpu(uint16_t h) {
  uint32_t o = ((uint32_t)h & 0x7fffu) << 13, e = o & 0x0f800000u;
  o += 112u << 23;                                                   // rebias the exponent 15 -> 127
  uint32_t infnan = o + (112u << 23);                                // exponent 31 -> 255
  uint32_t sub = float_to_bits(bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23));  // man * 2^-24
  uint32_t r = e == 0x0f800000u ? infnan : (e == 0 ? sub : o);
  return bits_to_float(r | (((uint32_t)h & 0x8000u) << 16));
}
FB_HD uint16_t float_to_half_bits_cpu(float f) {
  // signed 32-bit lanes: with unsigned ones g++ narrowed the selects below together with a following
  // half_range into a conditional it could not vectorise
  int32_t u = (int32_t)float_to_bits(f), a = u & 0x7fffffff;
  int32_t nrm = (a - (112 << 23) + 0xfff + ((a >> 13) & 1)) >> 13;                  // round on bit 13
  int32_t sub = (int32_t)float_to_bits(bits_to_float((uint32_t)a) + 0.5f) - 0x3f000000;  // rounds to 2^-24
  int32_t big = a > 0x7f800000 ? 0x7e00 : 0x7c00;                    // NaN, or rounds to infinity
  int32_t r = a >= 0x477ff000 ? big : (a < 0x38800000 ? sub : nrm);
  return (uint16_t)(r | ((u >> 16) & 0x8000));
}
#endif
FB_HD float to_float(half v) {
#if defined(__CUDA_ARCH__)
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f;
#elif FB_CUDA
  return half_bits_to_float(v.x);
#else
  return half_bits_to_float_cpu(v.x);
#endif
}
FB_HD half to_half(float f) {
  half r;
#if defined(__CUDA_ARCH__)
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f));
#elif FB_CUDA
  r.x = float_to_half_bits(f);
#else
  r.x = float_to_half_bits_cpu(f);
#endif
  return r;
}

// Loads convert storage -> compute type; stores convert compute -> storage type.
template <class C, class S> FB_HD C ld(S v) { return (C)v; }
template <> FB_HD float ld<float, bf16>(bf16 v) { return to_float(v); }
template <> FB_HD float ld<float, half>(half v) { return to_float(v); }
template <> FB_HD double ld<double, bf16>(bf16 v) { return (double)to_float(v); }
template <> FB_HD double ld<double, half>(half v) { return (double)to_float(v); }
template <> FB_HD int64_t ld<int64_t, bf16>(bf16 v) { return (int64_t)to_float(v); }
template <> FB_HD int64_t ld<int64_t, half>(half v) { return (int64_t)to_float(v); }
template <> FB_HD bool ld<bool, bf16>(bf16 v) { return to_float(v) != 0.0f; }
template <> FB_HD bool ld<bool, half>(half v) { return to_float(v) != 0.0f; }
#if !FB_CUDA
// CPU: a bool element is read as its byte. g++ does not vectorise a loop that loads a C++ bool ("no vectype"
// for the load: a softmax under a boolean mask ran scalar); a byte load it does. Picked over the template
// above for every fb::ld<C>(p[i]) of a bool tensor, as the more specialised overload.
template <class C> FB_HD C ld(const bool& v) { return (C)(*reinterpret_cast<const uint8_t*>(&v) != 0); }
#endif

template <class S, class C> FB_HD S st(C v) { return (S)v; }
template <> FB_HD bf16 st<bf16, float>(float v) { return to_bf16(v); }
template <> FB_HD half st<half, float>(float v) { return to_half(v); }
template <> FB_HD bf16 st<bf16, double>(double v) { return to_bf16((float)v); }
template <> FB_HD half st<half, double>(double v) { return to_half((float)v); }
template <> FB_HD bf16 st<bf16, int64_t>(int64_t v) { return to_bf16((float)v); }
template <> FB_HD half st<half, int64_t>(int64_t v) { return to_half((float)v); }
template <> FB_HD bf16 st<bf16, bool>(bool v) { return to_bf16(v ? 1.0f : 0.0f); }
template <> FB_HD half st<half, bool>(bool v) { return to_half(v ? 1.0f : 0.0f); }

// int64 -> float/double where the integer may come from a float -> int cast in the same kernel: g++ (with
// -fno-trapping-math and SSE4.1) folds (float)(int64_t)x into trunc(x), which keeps the sign of a zero
// (-0.5 -> -0.0 where the integer 0 converts to +0.0). The sign is set from the integer again.
FB_HD float i2f(int64_t i) { return copysignf((float)i, (float)((i >> 63) | 1)); }
FB_HD double i2d(int64_t i) { return copysign((double)i, (double)((i >> 63) | 1)); }

// Rounding a float value to a narrower float type (an explicit cast inside a fused chain).
#if FB_CUDA
FB_HD float round_bf16(float v) { return to_float(to_bf16(v)); }
#else
FB_HD float round_bf16(float v) { return bits_to_float(bf16_rne_bits(v) & 0xffff0000u); }  // no narrowing
#endif
FB_HD float round_half(float v) { return to_float(to_half(v)); }
// A float16 result kept in float between ops of one kernel keeps its extra precision, but not its extra
// range: where eager's float16 overflows to +-inf (|v| >= 65520 rounds to inf), so does the kernel's value.
#if FB_CUDA
FB_HD float half_range(float v) { return (v >= 65520.0f || v <= -65520.0f) ? (v > 0.0f ? inf_f() : -inf_f()) : v; }
#else
// the same as a multiply by 1 or inf. The || above is control flow g++ does not if-convert in a loop that also
// branches (a cat), and selects of +-inf (nested compares, fabs/copysign) kept some float16 loops scalar after
// other ops; tests/test_cpu_math.py checks that the loops of float16 kernels vectorise.
FB_HD float half_range(float v) { return v * (__builtin_fabsf(v) >= 65520.0f ? inf_f() : 1.0f); }
#endif

}  // namespace fb
