// Matrix-vector products on the CPU with ATen's vectors (at::vec::Vectorized, AVX2/FMA with -march=native on
// x86), shared by the native kernels: the memory's per-head products (factored_decode.cpp) and the dense
// products of a one-token decode step (row_linear.cpp).
#pragma once

// ATen's vectorised math (the same erf, exp and tanh as torch's own CPU kernels): its AVX2 specialisations are
// compiled in only with CPU_CAPABILITY_AVX2 defined, which torch's build passes on its command line.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace miras_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// The memory's per-head matrices sit in L1/L2 after their first read, so their products are bound by the latency
// of the FMA chains, not by memory: a dot product written as one loop (a single chain of n / 8 dependent FMAs and a
// horizontal sum per output) ran at ~7 GFLOP/s. So each product keeps several independent accumulators.

// The sums of four vectors' lanes, {a.sum, b.sum, c.sum, d.sum}, into y[0..3].
inline void reduce4(const Vec& a, const Vec& b, const Vec& c, const Vec& d, float* y) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // pairs of lanes summed, interleaved
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: {a, b, c, d} partial sums
  _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  y[0] = a.reduce_add();
  y[1] = b.reduce_add();
  y[2] = c.reduce_add();
  y[3] = d.reduce_add();
#endif
}

// y_x[r] = w[r] . x for NX vectors x at once (rows of w ``stride`` apart, ``cols`` long): four rows at a time,
// their 4 NX accumulators named (an array of them was kept on the stack and stored every iteration).
template <int NX>
inline void matvec(const float* w, int64_t stride, int64_t rows, int64_t cols, const float* const (&x)[NX],
                   float* const (&y)[NX]) {
  static_assert(NX == 1 || NX == 2, "one or two vectors");
  const int64_t vec_cols = cols - cols % kLanes;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *w0 = w + r * stride, *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f), b0(0.0f), b1(0.0f), b2(0.0f), b3(0.0f);
    for (int64_t c = 0; c < vec_cols; c += kLanes) {
      const Vec x0 = Vec::loadu(x[0] + c), v0 = Vec::loadu(w0 + c), v1 = Vec::loadu(w1 + c),
                v2 = Vec::loadu(w2 + c), v3 = Vec::loadu(w3 + c);
      a0 = at::vec::fmadd(v0, x0, a0);
      a1 = at::vec::fmadd(v1, x0, a1);
      a2 = at::vec::fmadd(v2, x0, a2);
      a3 = at::vec::fmadd(v3, x0, a3);
      if constexpr (NX == 2) {
        const Vec x1 = Vec::loadu(x[NX - 1] + c);
        b0 = at::vec::fmadd(v0, x1, b0);
        b1 = at::vec::fmadd(v1, x1, b1);
        b2 = at::vec::fmadd(v2, x1, b2);
        b3 = at::vec::fmadd(v3, x1, b3);
      }
    }
    reduce4(a0, a1, a2, a3, y[0] + r);
    if constexpr (NX == 2) reduce4(b0, b1, b2, b3, y[NX - 1] + r);
    for (int64_t c = vec_cols; c < cols; ++c)
      for (int n = 0; n < NX; ++n)
        for (int i = 0; i < 4; ++i) y[n][r + i] += w[(r + i) * stride + c] * x[n][c];
  }
  for (; r < rows; ++r)
    for (int n = 0; n < NX; ++n) {
      Vec acc(0.0f);
      for (int64_t c = 0; c < vec_cols; c += kLanes)
        acc = at::vec::fmadd(Vec::loadu(w + r * stride + c), Vec::loadu(x[n] + c), acc);
      float sum = acc.reduce_add();
      for (int64_t c = vec_cols; c < cols; ++c) sum += w[r * stride + c] * x[n][c];
      y[n][r] = sum;
    }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float out;
  matvec<1>(a, n, 1, n, {b}, {&out});
  return out;
}

// y[c] = sum_r g[r] w[r, c] (w's rows ``stride`` apart, ``cols`` long): blocks of four vectors of y held in
// named registers while every row streams past.
inline void matvec_t(const float* w, int64_t stride, int64_t rows, int64_t cols, const float* g, float* y) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= cols; c += 4 * kLanes) {
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    const float* wr = w + c;
    for (int64_t r = 0; r < rows; ++r, wr += stride) {
      const Vec gr(g[r]);
      a0 = at::vec::fmadd(gr, Vec::loadu(wr), a0);
      a1 = at::vec::fmadd(gr, Vec::loadu(wr + kLanes), a1);
      a2 = at::vec::fmadd(gr, Vec::loadu(wr + 2 * kLanes), a2);
      a3 = at::vec::fmadd(gr, Vec::loadu(wr + 3 * kLanes), a3);
    }
    a0.store(y + c);
    a1.store(y + c + kLanes);
    a2.store(y + c + 2 * kLanes);
    a3.store(y + c + 3 * kLanes);
  }
  for (; c < cols; c += kLanes) {
    const int64_t count = std::min(kLanes, cols - c);
    Vec acc(0.0f);
    for (int64_t r = 0; r < rows; ++r) acc = at::vec::fmadd(Vec(g[r]), Vec::loadu(w + r * stride + c, count), acc);
    acc.store(y + c, count);
  }
}

}  // namespace miras_cpu
