// fusebackend component library: compute operations. Each is a struct with a static exec on the compute
// type T (float for f16/bf16/f32, double, int64_t, bool); the emitter folds them into flat expressions.
#pragma once
#include "fb_math.h"

#if FB_CUDA
#define FB_FN static __host__ __device__ __forceinline__
#else
#define FB_FN static inline __attribute__((always_inline))
#endif

namespace fb {

template <class T> FB_HD bool isnan_(T a) { return a != a; }

#define FB_UNARY(NAME, EXPR) struct NAME { template <class T> FB_FN T exec(T a) { return EXPR; } };
FB_UNARY(Identity, a)
FB_UNARY(Neg, -a)
FB_UNARY(Abs, a < (T)0 ? -a : a)
FB_UNARY(Exp, exp_(a))
FB_UNARY(Exp2, exp2_(a))
FB_UNARY(Log, log_(a))
FB_UNARY(Log2, log2_(a))
FB_UNARY(Log10, log10_(a))
FB_UNARY(Log1p, log1p_(a))
FB_UNARY(Expm1, expm1_(a))
FB_UNARY(Sqrt, sqrt_(a))
FB_UNARY(Rsqrt, rsqrt_(a))
FB_UNARY(Reciprocal, (T)1 / a)
FB_UNARY(Sin, sin(a))
FB_UNARY(Cos, cos(a))
FB_UNARY(Tan, tan(a))
FB_UNARY(Atan, atan(a))
FB_UNARY(Asin, asin(a))
FB_UNARY(Acos, acos(a))
FB_UNARY(Sinh, sinh_(a))
FB_UNARY(Cosh, cosh_(a))
FB_UNARY(Erfc, erfc(a))
FB_UNARY(Tanh, tanh_(a))
FB_UNARY(Erf, erf_(a))
FB_UNARY(Sigmoid, (T)1 / ((T)1 + exp_(-a)))
FB_UNARY(Silu, a / ((T)1 + exp_(-a)))
FB_UNARY(Relu, a < (T)0 ? (T)0 : a)
FB_UNARY(Gelu, mul_rn((T)0.5 * a, (T)1 + erf_(a * (T)0.70710678118654752440)))
FB_UNARY(GeluTanh, mul_rn((T)0.5 * a, (T)1 + tanh_((T)0.79788456080286535588 * (a + (T)0.044715 * a * a * a))))
FB_UNARY(Floor, floor_(a))
FB_UNARY(Ceil, -floor_(-a))
FB_UNARY(Round, rint_(a))
FB_UNARY(Trunc, a < (T)0 ? -floor_(-a) : floor_(a))
FB_UNARY(Sign, (T)((a > (T)0) - (a < (T)0)))  // NaN -> 0, as torch.sign
FB_UNARY(Square, mul_rn(a, a))
FB_UNARY(Cube, mul_rn(a * a, a))
FB_UNARY(BitwiseNot, ~a)
#undef FB_UNARY

// abs(-0.0) is +0.0 (a < 0 ? -a : a would keep the sign of a negative zero)
template <> FB_HD float Abs::exec<float>(float a) { return fabsf(a); }
template <> FB_HD double Abs::exec<double>(double a) { return fabs(a); }

struct LogicalNot { template <class T> FB_FN bool exec(T a) { return !a; } };
struct IsNan { template <class T> FB_FN bool exec(T a) { return a != a; } };
struct IsInf { template <class T> FB_FN bool exec(T a) { return a == (T)inf_f() || a == -(T)inf_f(); } };
template <> FB_HD bool IsInf::exec<int64_t>(int64_t) { return false; }
template <> FB_HD bool IsInf::exec<bool>(bool) { return false; }

// Ops whose value ends in a product use mul_rn (fb_math.h): a consumer's add is not contracted with it.
#define FB_BINARY(NAME, R, EXPR) struct NAME { template <class T> FB_FN R exec(T a, T b) { return EXPR; } };
FB_BINARY(Add, T, a + b)
FB_BINARY(Sub, T, a - b)
FB_BINARY(Mul, T, mul_rn(a, b))
FB_BINARY(MulExact, T, a * b)   // by a power of two (emit/exprs.py): exact, so contracting it changes nothing
FB_BINARY(Div, T, a / b)
// A tie between -0.0 and 0.0 returns what ATen's vectorized loop returns: the second operand for maximum and
// minimum (_mm256_max_ps), the first for fmax and fmin. (Its scalar loop -- tensors under 8 elements, loop
// tails -- returns the first for maximum/minimum: eager itself is not consistent there.)
FB_BINARY(Maximum, T, isnan_(a) ? a : (isnan_(b) ? b : (a > b ? a : b)))
FB_BINARY(Minimum, T, isnan_(a) ? a : (isnan_(b) ? b : (a < b ? a : b)))
FB_BINARY(Fmax, T, isnan_(a) ? b : (isnan_(b) ? a : (a < b ? b : a)))
FB_BINARY(Fmin, T, isnan_(a) ? b : (isnan_(b) ? a : (b < a ? b : a)))
FB_BINARY(Eq, bool, a == b)
FB_BINARY(Ne, bool, a != b)
FB_BINARY(Lt, bool, a < b)
FB_BINARY(Le, bool, a <= b)
FB_BINARY(Gt, bool, a > b)
FB_BINARY(Ge, bool, a >= b)
FB_BINARY(LogicalAnd, bool, (bool)a && (bool)b)
FB_BINARY(LogicalOr, bool, (bool)a || (bool)b)
FB_BINARY(LogicalXor, bool, (bool)a != (bool)b)
FB_BINARY(BitwiseAnd, T, a & b)
FB_BINARY(BitwiseOr, T, a | b)
FB_BINARY(BitwiseXor, T, a ^ b)
FB_BINARY(Atan2, T, atan2(a, b))
FB_BINARY(Pow, T, pow(a, b))
FB_BINARY(Fmod, T, fmod(a, b))
#undef FB_BINARY

// Integer forms where C++ differs from torch (and integer division by zero must not trap).
template <> FB_HD int64_t Div::exec<int64_t>(int64_t a, int64_t b) { return b == 0 ? 0 : a / b; }
template <> FB_HD int64_t Fmod::exec<int64_t>(int64_t a, int64_t b) { return b == 0 ? 0 : a % b; }
template <> FB_HD int64_t Pow::exec<int64_t>(int64_t a, int64_t b) {
  int64_t r = 1;
  if (b < 0) return a == 1 ? 1 : (a == -1 ? ((b & 1) ? -1 : 1) : 0);
  while (b) { if (b & 1) r *= a; a *= a; b >>= 1; }
  return r;
}
template <> FB_HD bool Add::exec<bool>(bool a, bool b) { return a || b; }
template <> FB_HD bool BitwiseNot::exec<bool>(bool a) { return !a; }  // ~ on a C++ bool is never false
template <> FB_HD bool Mul::exec<bool>(bool a, bool b) { return a && b; }

struct DivTrunc {
  template <class T> FB_FN T exec(T a, T b) { T q = a / b; return q < (T)0 ? -floor_(-q) : floor_(q); }
};
template <> FB_HD int64_t DivTrunc::exec<int64_t>(int64_t a, int64_t b) { return b == 0 ? 0 : a / b; }

struct DivFloor {  // Python floor division, as torch computes it for floats
  template <class T> FB_FN T exec(T a, T b) {
    if (b == (T)0) return a / b;
    T mod = fmod(a, b);
    T div = (a - mod) / b;
    if (mod != (T)0 && ((b < (T)0) != (mod < (T)0))) div -= (T)1;
    if (div == (T)0) return copysign((T)0, a / b);  // 0 / -0.5 is -0, as in ATen (a test `< 0` gave +0)
    T fl = floor_(div);
    return (div - fl > (T)0.5) ? fl + (T)1 : fl;
  }
};
template <> FB_HD int64_t DivFloor::exec<int64_t>(int64_t a, int64_t b) {
  if (b == 0) return 0;
  int64_t q = a / b;
  return ((a % b != 0) && ((a < 0) != (b < 0))) ? q - 1 : q;
}

struct Remainder {
  template <class T> FB_FN T exec(T a, T b) {
    T r = fmod(a, b);
    return (r != (T)0 && ((r < (T)0) != (b < (T)0))) ? r + b : r;
  }
};
template <> FB_HD int64_t Remainder::exec<int64_t>(int64_t a, int64_t b) {
  if (b == 0) return 0;
  int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}

struct AddAlpha { template <class T> FB_FN T exec(T a, T b, T alpha) { return a + alpha * b; } };
struct Where { template <class T> FB_FN T exec(bool c, T a, T b) { return c ? a : b; } };
struct Clamp {  // a NaN bound (scalar or tensor) makes the result NaN, as in eager
  template <class T> FB_FN T exec(T x, T lo, T hi) {
    if (isnan_(x)) return x;
    if (isnan_(lo)) return lo;
    if (isnan_(hi)) return hi;
    T y = x < lo ? lo : x;
    return y > hi ? hi : y;
  }
};
struct ThresholdBackward { template <class T> FB_FN T exec(T g, T x, T thr) { return x <= thr ? (T)0 : g; } };
struct LeakyRelu { template <class T> FB_FN T exec(T x, T slope) { return x > (T)0 ? x : mul_rn(x, slope); } };
struct Const { template <class T> FB_FN T exec(T v) { return v; } };

}  // namespace fb
