// fusebackend component library, CUDA only: kernel arguments by value, 16-byte vector loads and stores,
// warp- and block-wide all-reductions. Include it only from CUDA kernels (NVRTC or nvcc).
#pragma once
#include "fb_reduce.h"

#if !FB_CUDA
#error "fb_cuda.h is for CUDA kernels only"
#endif

#define FB_DEV static __device__ __forceinline__

namespace fb {

// Every kernel takes one argument by value: the operand pointers, then the int64 meta array (domain sizes,
// then each operand's strides). Kernel parameters live in the constant bank: no device buffer, no copy.
template <int NP, int NM> struct KArgs {
  void* p[NP];
  int64_t m[NM];
};

// A horizontal batch: up to K problems of one kernel in one launch (the kernel's `_batch` entry). Problem q's
// pointers are p[q * NP ...] (written every call), its meta array is meta + q * NM (device memory written once),
// its blocks are [start[q], start[q + 1]). A block finds its problem by a binary search of `start`, indexing the
// parameter array directly (taking its address could copy the whole struct to local memory).
template <int NP, int K> struct BArgs {
  void* p[NP * K];
  const int64_t* meta;
  int32_t nprob;
  int32_t start[K + 1];
};

// N consecutive elements of T; aligned to min(16, N * sizeof(T)) so a copy is 16-byte (or narrower) accesses.
template <int B> struct VAlign { static constexpr int value = B >= 16 ? 16 : (B >= 8 ? 8 : (B >= 4 ? 4 : (B >= 2 ? 2 : 1))); };
template <class T, int N> struct alignas(VAlign<(int)sizeof(T) * N>::value) Vec { T v[N]; };

// Loads and stores of a whole vector through the widest aligned word. The 16- and 8-byte forms use the
// load/store intrinsics, which are single instructions (a plain struct copy may be split into scalars).
template <int N, class T> FB_DEV Vec<T, N> ldv(const T* p) {
  Vec<T, N> r;
  constexpr int B = (int)sizeof(T) * N;
  if constexpr (B % 16 == 0) {
#pragma unroll
    for (int i = 0; i < B / 16; ++i) reinterpret_cast<uint4*>(&r)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  } else if constexpr (B % 8 == 0) {
#pragma unroll
    for (int i = 0; i < B / 8; ++i) reinterpret_cast<uint2*>(&r)[i] = __ldg(reinterpret_cast<const uint2*>(p) + i);
  } else if constexpr (B % 4 == 0) {
#pragma unroll
    for (int i = 0; i < B / 4; ++i) reinterpret_cast<uint32_t*>(&r)[i] = reinterpret_cast<const uint32_t*>(p)[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
  }
  return r;
}
// The same for an input the kernel also writes (a store into a graph input, passes/inplace.py): plain loads,
// not the read-only path __ldg takes, which assumes nothing writes the data while the kernel runs.
template <int N, class T> FB_DEV Vec<T, N> ldv_rw(const T* p) {
  Vec<T, N> r;
  constexpr int B = (int)sizeof(T) * N;
  if constexpr (B % 16 == 0) {
#pragma unroll
    for (int i = 0; i < B / 16; ++i) reinterpret_cast<uint4*>(&r)[i] = reinterpret_cast<const uint4*>(p)[i];
  } else if constexpr (B % 8 == 0) {
#pragma unroll
    for (int i = 0; i < B / 8; ++i) reinterpret_cast<uint2*>(&r)[i] = reinterpret_cast<const uint2*>(p)[i];
  } else if constexpr (B % 4 == 0) {
#pragma unroll
    for (int i = 0; i < B / 4; ++i) reinterpret_cast<uint32_t*>(&r)[i] = reinterpret_cast<const uint32_t*>(p)[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
  }
  return r;
}
template <int N, class T> FB_DEV void stv(T* p, const Vec<T, N>& v) {
  constexpr int B = (int)sizeof(T) * N;
  if constexpr (B % 16 == 0) {
#pragma unroll
    for (int i = 0; i < B / 16; ++i) __stwb(reinterpret_cast<uint4*>(p) + i, reinterpret_cast<const uint4*>(&v)[i]);
  } else if constexpr (B % 8 == 0) {
#pragma unroll
    for (int i = 0; i < B / 8; ++i) __stwb(reinterpret_cast<uint2*>(p) + i, reinterpret_cast<const uint2*>(&v)[i]);
  } else if constexpr (B % 4 == 0) {
#pragma unroll
    for (int i = 0; i < B / 4; ++i) reinterpret_cast<uint32_t*>(p)[i] = reinterpret_cast<const uint32_t*>(&v)[i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = v.v[i];
  }
}

// True when p is aligned for a Vec<T, N> access.
template <int N, class T> FB_DEV bool vec_aligned(const T* p) {
  return (reinterpret_cast<uint64_t>(p) % VAlign<(int)sizeof(T) * N>::value) == 0;
}

// float -> bfloat16 in one instruction where the chip has it (sm_80+); the portable bit arithmetic of
// fb_core.h otherwise. Both round to nearest even; only a NaN's payload may differ.
FB_DEV bf16 cu_st_bf16(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
  return r;
#else
  return to_bf16(v);
#endif
}
FB_DEV float cu_round_bf16(float v) { return to_float(cu_st_bf16(v)); }

// Warp shuffles for every compute type (bool travels as int).
FB_DEV float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
FB_DEV double shfl_xor(double v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
FB_DEV int64_t shfl_xor(int64_t v, int m) { return (int64_t)__shfl_xor_sync(0xffffffffu, (long long)v, m); }
FB_DEV bool shfl_xor(bool v, int m) { return __shfl_xor_sync(0xffffffffu, (int)v, m) != 0; }

// Every lane of the warp gets the combination of all 32 lanes' values.
template <class R, class T> FB_DEV T warp_allreduce(T v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = R::combine(v, shfl_xor(v, m));
  return v;
}

// Every thread of the block gets the combination of all threads' values (blockDim.x a multiple of 32,
// at most 1024). `scratch` holds 32 values of at least 8 bytes; the trailing barrier makes it reusable.
template <class R, class T> FB_DEV T block_allreduce(T v, double* scratch) {
  T* s = reinterpret_cast<T*>(scratch);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_allreduce<R>(v);
  if (nwarps == 1) return v;
  if (lane == 0) s[warp] = v;
  __syncthreads();
  T w = lane < nwarps ? s[lane] : R::template identity<T>();
  w = warp_allreduce<R>(w);
  __syncthreads();
  return w;
}

// Column all-reduce (the row_column kernels: a lane per row, the block's warps splitting each row's reduced
// index): every thread gets the combination of its lane's values over all warps, in warp order. `scratch` holds
// 32 x 32 values of at least 8 bytes; the trailing barrier makes it reusable.
template <class R, class T> FB_DEV T col_allreduce(T v, double* scratch) {
  T* s = reinterpret_cast<T*>(scratch);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  if (nwarps == 1) return v;
  s[warp * 32 + lane] = v;
  __syncthreads();
  T w = s[lane];
  for (int k = 1; k < nwarps; ++k) w = R::combine(w, s[k * 32 + lane]);
  __syncthreads();
  return w;
}

}  // namespace fb
