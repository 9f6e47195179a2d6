// Moneta's boundary map on the CPU (models.memory.lq_normalise): each head's matrix W onto the lq ball,
//     nu^q = mean |W_ij|^q / init_std^q,   W <- W (radius^q / max(nu^q, radius^q))^(1/q),
// in two passes over W (the sum of |W_ij|^q, then the scale) where PyTorch takes ~8 ops and four passes. A prompt
// crosses a chunk boundary every 64 tokens in every layer: in PyTorch each map of a 64 KB matrix took ~0.11 ms,
// mostly dispatch, ~3.3 ms of a 266-token chat turn's prefill (moneta-tiny, 2 threads).

#include "memory_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

using miras_cpu::kLanes;
using miras_cpu::Vec;

// sum |x_i|^q over n values; q = 1 to 4 in vectors (products, as miras_cpu::power), other q one value at a time.
// Partial sums of at most kBlock values in float, added up in double.
double sum_abs_power(const float* x, int64_t n, float q) {
  constexpr int64_t kBlock = 1024;
  const bool by_products = q == 1.0f || q == 2.0f || q == 3.0f || q == 4.0f;
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    int64_t i = start;
    float block = 0.0f;
    if (by_products) {
      Vec acc(0.0f);
      for (; i + kLanes <= end; i += kLanes) {
        const Vec a = Vec::loadu(x + i).abs();
        const Vec sq = a * a;
        acc = acc + (q == 1.0f ? a : q == 2.0f ? sq : q == 3.0f ? sq * a : sq * sq);
      }
      block = acc.reduce_add();
    }
    for (; i < end; ++i) block += miras_cpu::power(std::fabs(x[i]), q);
    total += block;
  }
  return total;
}

// w [..., R, C] (fp32): every [R, C] matrix mapped on its own.
at::Tensor lq_normalise(const at::Tensor& w_any, double q, double radius, double init_std) {
  TORCH_CHECK(w_any.device().is_cpu() && w_any.scalar_type() == at::kFloat && w_any.dim() >= 2,
              "lq_normalise takes an fp32 CPU tensor of matrices [..., R, C]");
  TORCH_CHECK(q > 0.0 && radius > 0.0 && init_std > 0.0, "lq_normalise: q, radius and init_std must be > 0");
  const at::Tensor w = w_any.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t inner = w.size(-1) * w.size(-2), matrices = inner == 0 ? 0 : w.numel() / inner;
  const float* w_p = w.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const float q_f = static_cast<float>(q);
  const double radius_q = std::pow(radius, q), std_q = std::pow(init_std, q);
  at::parallel_for(0, matrices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* x = w_p + m * inner;
      const double nu_q = sum_abs_power(x, inner, q_f) / static_cast<double>(inner) / std_q;
      const float scale = static_cast<float>(std::pow(radius_q / std::max(nu_q, radius_q), 1.0 / q));
      at::vec::map([scale](Vec v) { return v * Vec(scale); }, out_p + m * inner, x, inner);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miras_serve, m) {
  m.def("lq_normalise(Tensor w, float q, float radius, float init_std) -> Tensor");
}

TORCH_LIBRARY_IMPL(miras_serve, CPU, m) { m.impl("lq_normalise", &lq_normalise); }
