// fusebackend component library: reduction operations (identity + combine), accumulated in the compute type.
#pragma once
#include "fb_ops.h"

namespace fb {

struct SumR {
  template <class T> FB_FN T identity() { return (T)0; }
  template <class T> FB_FN T combine(T a, T b) { return a + b; }
};
struct ProdR {
  template <class T> FB_FN T identity() { return (T)1; }
  template <class T> FB_FN T combine(T a, T b) { return a * b; }
};
struct MaxR {  // NaN propagates, as torch.amax does
  template <class T> FB_FN T identity() { return -(T)inf_f(); }
  template <class T> FB_FN T combine(T a, T b) { return Maximum::exec(a, b); }
};
struct MinR {
  template <class T> FB_FN T identity() { return (T)inf_f(); }
  template <class T> FB_FN T combine(T a, T b) { return Minimum::exec(a, b); }
};
template <> FB_HD int64_t MaxR::identity<int64_t>() { return (int64_t)(-9223372036854775807LL - 1); }
template <> FB_HD int64_t MinR::identity<int64_t>() { return (int64_t)9223372036854775807LL; }
template <> FB_HD bool MaxR::identity<bool>() { return false; }
template <> FB_HD bool MinR::identity<bool>() { return true; }
struct AnyR {
  template <class T> FB_FN T identity() { return (T)0; }
  template <class T> FB_FN T combine(T a, T b) { return (T)((bool)a || (bool)b); }
};
struct AllR {
  template <class T> FB_FN T identity() { return (T)1; }
  template <class T> FB_FN T combine(T a, T b) { return (T)((bool)a && (bool)b); }
};

}  // namespace fb

#if !FB_CUDA
// OpenMP SIMD reductions for the combines that are not built into OpenMP (NaN-propagating max/min).
#pragma omp declare reduction(fbmax : float : omp_out = fb::MaxR::combine(omp_out, omp_in)) initializer(omp_priv = -__builtin_inff())
#pragma omp declare reduction(fbmin : float : omp_out = fb::MinR::combine(omp_out, omp_in)) initializer(omp_priv = __builtin_inff())
#pragma omp declare reduction(fbmax : double : omp_out = fb::MaxR::combine(omp_out, omp_in)) initializer(omp_priv = -__builtin_inf())
#pragma omp declare reduction(fbmin : double : omp_out = fb::MinR::combine(omp_out, omp_in)) initializer(omp_priv = __builtin_inf())
#endif
