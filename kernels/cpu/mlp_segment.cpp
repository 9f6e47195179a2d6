// One segment of a prompt through the MLP memory on the CPU: the tokens of one chunk (or of its part a call
// holds), their reads and the memory after the last, exactly models.memory.memory_segment (the Python side is
// kernels/cpu_native.py). Per sequence and head, with the chunk's anchor (A_in, A_out), the running memory
// before the segment (W_in, W_out) and n tokens:
//     factors at the anchor:  Z = K A_in^T, A = gelu(Z), U = A A_out^T, GU = LN'(d l / d y), GZ = (GU A_out) * gelu'(Z)
//     reads:  ZQ = decay * (Q W_in^T) - (C * Q K^T) GZ,  AQ = gelu(ZQ),  UQ = decay * (AQ W_out^T) - (C * AQ A^T) GU,
//             out = q + LN(UQ)
//     memory: W_in' = decay_n W_in - GZ^T (c_n * K),  W_out' = decay_n W_out - GU^T (c_n * A)
// with decay_t = prod_{j<=t} alpha_j and C[t, i] = eta_i prod_{i<j<=t} alpha_j (i <= t), c_n = C[n-1, :].
//
// Why native: in PyTorch a segment is ~250 small ops, most of them elementwise over [B, H, n, D] (GELU's erf, the
// bias's gradient, two LayerNorms and one backward), each a pass over memory and a dispatch from Python; they were
// two thirds of a chat turn's prefill. Here the products stay ATen's batched matrix products (the BLAS) and every
// elementwise chain is one fused pass, parallel over the rows on ATen's thread pool.

#include "memory_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace miras_cpu;

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be an fp32 CPU tensor");
}

// Grain of the row loops: a few rows of the hidden width per task, so a small segment runs inline.
constexpr int64_t kRowGrain = 16;

// The factors of n tokens' gradients at the anchor (models.memory.mlp_factors): Z = K A_in^T, A = gelu(Z),
// GU (LayerNorm's backward of the bias's output gradient), GZ = (GU A_out) * gelu'(Z), and each token's loss.
struct Factors {
  at::Tensor z, a, gu, gz, loss;
};

Factors factors_at_anchor(const Rule& rule, const at::Tensor& anchor_in, const at::Tensor& anchor_out,
                          const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, bool want_surprise) {
  const int64_t B = k.size(0), H = k.size(1), n = k.size(2), d = k.size(3), D = anchor_in.size(2);
  const int64_t rows = B * H * n;
  at::Tensor z = at::matmul(k, anchor_in.transpose(-1, -2));  // [B, H, n, D]
  at::Tensor a = at::empty_like(z);
  {
    const float* z_p = z.data_ptr<float>();
    float* a_p = a.data_ptr<float>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      gelu(z_p + begin * D, a_p + begin * D, (end - begin) * D);
    });
  }
  at::Tensor u = at::matmul(a, anchor_out.transpose(-1, -2));  // [B, H, n, d]
  at::Tensor gu = at::empty_like(u);
  at::Tensor loss = want_surprise ? at::empty({B, H, n}, k.options()) : at::empty({0}, k.options());
  {
    const float *u_p = u.data_ptr<float>(), *k_p = k.data_ptr<float>(), *v_p = v.data_ptr<float>();
    const float *lw = ln_weight.data_ptr<float>(), *lb = ln_bias.data_ptr<float>();
    const float* delta_p = delta ? delta->data_ptr<float>() : nullptr;
    float *gu_p = gu.data_ptr<float>(), *loss_p = want_surprise ? loss.data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> u_hat(d), g(d), magnitude(d);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row / n % H;
        const float l = key_output_grad(rule, delta_p ? delta_p[row] : 0.0f, u_p + row * d, k_p + row * d,
                                        v_p + row * d, lw + h * d, lb + h * d, u_hat.data(), g.data(),
                                        magnitude.data(), gu_p + row * d, d);
        if (loss_p != nullptr) loss_p[row] = l;
      }
    });
  }
  at::Tensor gz = at::matmul(gu, anchor_out);  // [B, H, n, D], then * gelu'(z)
  {
    const float* z_p = z.data_ptr<float>();
    float* gz_p = gz.data_ptr<float>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      times_gelu_grad(gz_p + begin * D, z_p + begin * D, (end - begin) * D);
    });
  }

  return {z, a, gu, gz, loss};
}

}  // namespace

// anchor_in, memory_in [B, H, D, d]; anchor_out, memory_out [B, H, d, D]; q, k, v [B, H, n, d]; eta, log_alpha
// (and delta, huber's) [B, H, n]; ln_weight, ln_bias [H, 1, d]. Returns the reads [B, H, n, d], the new
// (W_in, W_out), each token's loss at the anchor [B, H, n] (empty unless want_surprise) and the tokens' factors
// at the anchor (A [B, H, n, D], GZ [B, H, n, D], GU [B, H, n, d]: a prompt's last chunk keeps them as its rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_segment(
    const at::Tensor& anchor_in_any, const at::Tensor& anchor_out_any, const at::Tensor& memory_in_any,
    const at::Tensor& memory_out_any, const at::Tensor& q_any, const at::Tensor& k_any, const at::Tensor& v_any,
    const at::Tensor& eta_any, const at::Tensor& log_alpha_any, const std::optional<at::Tensor>& delta_any,
    const at::Tensor& ln_weight_any, const at::Tensor& ln_bias_any, bool want_surprise, int64_t bias, double p,
    double lp_knee, double abs_eps, double sharpness, double ln_eps) {
  // A segment of a longer prompt arrives as strided views of the whole prompt's tensors: contiguous copies here
  // (no-ops for contiguous inputs) cost less than a call each from Python.
  const at::Tensor anchor_in = anchor_in_any.contiguous(), anchor_out = anchor_out_any.contiguous();
  const at::Tensor memory_in = memory_in_any.contiguous(), memory_out = memory_out_any.contiguous();
  const at::Tensor q = q_any.contiguous(), k = k_any.contiguous(), v = v_any.contiguous();
  const at::Tensor eta = eta_any.contiguous(), log_alpha = log_alpha_any.contiguous();
  const at::Tensor ln_weight = ln_weight_any.contiguous(), ln_bias = ln_bias_any.contiguous();
  const std::optional<at::Tensor> delta = delta_any ? std::optional<at::Tensor>(delta_any->contiguous()) : std::nullopt;
  for (const auto& [t, name] : {std::pair{&anchor_in, "anchor_in"}, {&anchor_out, "anchor_out"},
                                {&memory_in, "memory_in"}, {&memory_out, "memory_out"}, {&q, "q"}, {&k, "k"},
                                {&v, "v"}, {&eta, "eta"}, {&log_alpha, "log_alpha"}, {&ln_weight, "ln_weight"},
                                {&ln_bias, "ln_bias"}})
    check_f32(*t, name);
  if (delta) check_f32(*delta, "delta");
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), d = q.size(3), D = anchor_in.size(2);
  TORCH_CHECK(n >= 1 && anchor_in.sizes() == memory_in.sizes() && anchor_out.sizes() == memory_out.sizes() &&
                  anchor_in.sizes() == at::IntArrayRef({B, H, D, d}) &&
                  anchor_out.sizes() == at::IntArrayRef({B, H, d, D}),
              "memory shapes must be [B, H, D, d] and [B, H, d, D] for q [B, H, n, d]");
  const Rule rule = make_rule(bias, false, p, lp_knee, abs_eps, sharpness, ln_eps, delta.has_value());
  const int64_t rows = B * H * n;

  // The chunk's coefficients: cum_t = sum_{j<=t} log alpha_j (accumulated in double, as torch's CPU cumsum),
  // decay_t = exp(cum_t), C[t, i] = eta_i exp(cum_t - cum_i) for i <= t, else 0.
  at::Tensor decay = at::empty({B, H, n}, q.options());
  at::Tensor coeff = at::empty({B, H, n, n}, q.options());
  {
    const float *eta_p = eta.data_ptr<float>(), *la_p = log_alpha.data_ptr<float>();
    float *decay_p = decay.data_ptr<float>(), *coeff_p = coeff.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> cum(n);
      for (int64_t bh = begin; bh < end; ++bh) {
        double running = 0.0;
        for (int64_t t = 0; t < n; ++t) {
          running += la_p[bh * n + t];
          cum[t] = static_cast<float>(running);
          decay_p[bh * n + t] = std::exp(cum[t]);
        }
        float* c = coeff_p + bh * n * n;
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < n; ++i) c[t * n + i] = i <= t ? eta_p[bh * n + i] * std::exp(cum[t] - cum[i]) : 0.0f;
      }
    });
  }

  Factors f = factors_at_anchor(rule, anchor_in, anchor_out, k, v, delta, ln_weight, ln_bias, want_surprise);
  at::Tensor &z = f.z, &a = f.a, &gu = f.gu, &gz = f.gz, &loss = f.loss;

  // The reads at the updated memory: zq, aq = gelu(zq) (into z's storage, no longer needed), uq, out.
  at::Tensor zq = at::matmul(q, memory_in.transpose(-1, -2));
  at::Tensor zq_rows = at::matmul(at::matmul(q, k.transpose(-1, -2)).mul_(coeff), gz);
  {
    const float *decay_p = decay.data_ptr<float>(), *rows_p = zq_rows.data_ptr<float>();
    float *zq_p = zq.data_ptr<float>(), *aq_p = z.data_ptr<float>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float scale = decay_p[row];
        at::vec::map2([scale](Vec x, Vec r) { return Vec(scale) * x - r; }, zq_p + row * D, zq_p + row * D,
                      rows_p + row * D, D);
      }
      gelu(zq_p + begin * D, aq_p + begin * D, (end - begin) * D);
    });
  }
  const at::Tensor& aq = z;
  at::Tensor uq = at::matmul(aq, memory_out.transpose(-1, -2));  // [B, H, n, d]
  at::Tensor uq_rows = at::matmul(at::matmul(aq, a.transpose(-1, -2)).mul_(coeff), gu);
  at::Tensor out = at::empty_like(q);
  {
    const float *decay_p = decay.data_ptr<float>(), *rows_p = uq_rows.data_ptr<float>(), *q_p = q.data_ptr<float>();
    const float *lw = ln_weight.data_ptr<float>(), *lb = ln_bias.data_ptr<float>();
    float *uq_p = uq.data_ptr<float>(), *out_p = out.data_ptr<float>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> u_hat(d);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row / n % H;
        float* x = uq_p + row * d;
        for (int64_t c = 0; c < d; ++c) x[c] = decay_p[row] * x[c] - rows_p[row * d + c];
        layer_norm(x, lw + h * d, lb + h * d, rule.ln_eps, u_hat.data(), out_p + row * d, d);
        for (int64_t c = 0; c < d; ++c) out_p[row * d + c] += q_p[row * d + c];
      }
    });
  }

  // The memory after the segment.
  const at::Tensor last = coeff.select(2, n - 1).unsqueeze(-1);  // [B, H, n, 1]: C[n-1, i]
  const at::Tensor decay_last = decay.select(2, n - 1).view({B, H, 1, 1});
  at::Tensor new_in = memory_in * decay_last;
  new_in.sub_(at::matmul(gz.transpose(-1, -2), k * last));
  at::Tensor new_out = memory_out * decay_last;
  new_out.sub_(at::matmul(gu.transpose(-1, -2), a * last));
  return {out, new_in, new_out, loss, a, gz, gu};
}

// The factors alone (models.memory.mlp_factors; the factored state's rows of a prompt's last chunk): anchor_in
// [B, H, D, d], anchor_out [B, H, d, D]; k, v [B, H, n, d]; delta (huber's) [B, H, n]; ln_weight, ln_bias
// [H, 1, d]. Returns (a, gz, gu).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_factors(
    const at::Tensor& anchor_in, const at::Tensor& anchor_out, const at::Tensor& k_any, const at::Tensor& v_any,
    const std::optional<at::Tensor>& delta_any, const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t bias,
    double p, double lp_knee, double abs_eps, double sharpness, double ln_eps) {
  const at::Tensor k = k_any.contiguous(), v = v_any.contiguous();
  const std::optional<at::Tensor> delta = delta_any ? std::optional<at::Tensor>(delta_any->contiguous()) : std::nullopt;
  for (const auto& [t, name] : {std::pair{&anchor_in, "anchor_in"}, {&anchor_out, "anchor_out"}, {&k, "k"},
                                {&v, "v"}, {&ln_weight, "ln_weight"}, {&ln_bias, "ln_bias"}})
    check_f32(*t, name);
  if (delta) check_f32(*delta, "delta");
  const Rule rule = make_rule(bias, false, p, lp_knee, abs_eps, sharpness, ln_eps, delta.has_value());
  Factors f = factors_at_anchor(rule, anchor_in.contiguous(), anchor_out.contiguous(), k, v, delta,
                                ln_weight.contiguous(), ln_bias.contiguous(), false);
  return {f.a, f.gz, f.gu};
}

TORCH_LIBRARY_FRAGMENT(miras_serve, m) {
  m.def(
      "mlp_factors(Tensor anchor_in, Tensor anchor_out, Tensor k, Tensor v, Tensor? delta, Tensor ln_weight, "
      "Tensor ln_bias, int bias, float p, float lp_knee, float abs_eps, float sharpness, float ln_eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "mlp_segment(Tensor anchor_in, Tensor anchor_out, Tensor memory_in, Tensor memory_out, Tensor q, Tensor k, "
      "Tensor v, Tensor eta, Tensor log_alpha, Tensor? delta, Tensor ln_weight, Tensor ln_bias, bool want_surprise, "
      "int bias, float p, float lp_knee, float abs_eps, float sharpness, float ln_eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(miras_serve, CPU, m) {
  m.impl("mlp_segment", &mlp_segment);
  m.impl("mlp_factors", &mlp_factors);
}
