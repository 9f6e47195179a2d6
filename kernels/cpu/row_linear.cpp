// The dense products of a one-token decode step on the CPU: y = x W^T + b for a few rows of x [M, K], with W the
// linear's own weight [N, K] (row-major). Each output is one contiguous dot product along a row of W, so the
// weight streams once from memory in its stored order; the outputs are split over ATen's thread pool (OpenMP),
// in blocks of at least kGrainBytes of weight, so a small product runs inline without waking the pool. The dot
// products are the memory kernels' (vec_products.h, four weight rows at a time): as fast here as the
// compiler's vectorised reduction it replaced (moneta-tiny's 29 products, interleaved: 1.02x on 2 threads),
// bound by reading the weights.
//
// Why not the BLAS: for one row of x the product is a matrix-vector product bound by reading W, and the BLAS
// runs it on one thread; moneta-tiny's 29 products (18 MB) stream at the bandwidth of one core that way, and at
// that of both cores here (docs/kernels.md, "One-row products").

#include "vec_products.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace {

constexpr int64_t kGrainBytes = 32 * 1024;

at::Tensor row_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  for (const auto* t : {&x, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->device().is_cpu(),
                "row_linear takes contiguous fp32 CPU matrices");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "row_linear: x is [M, ", K, "] but the weight is [", N, ", ", weight.size(1), "]");
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "row_linear: the bias must be contiguous fp32 [", N, "]");
  at::Tensor out = at::empty({M, N}, x.options());
  const float *x_p = x.data_ptr<float>(), *w_p = weight.data_ptr<float>();
  const float* b_p = bias ? bias->data_ptr<float>() : nullptr;
  float* out_p = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, K * 4));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m) {
      float* y = out_p + m * N;
      miras_cpu::matvec<1>(w_p + begin * K, K, end - begin, K, {x_p + m * K}, {y + begin});
      if (b_p)
        for (int64_t n = begin; n < end; ++n) y[n] += b_p[n];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(miras_serve, m) {
  m.def("row_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(miras_serve, CPU, m) { m.impl("row_linear", &row_linear); }
