// One decode token per row on the factored state pool of an MLP memory, on the CPU, in place (the CPU
// counterpart of kernels/factored.py's fused kernel; the Python side is kernels/cpu_native.py).
//
// Per pool slot and head: the anchor A_in [D, d], A_out [d, D], the chunk's factor rows [b, 2(D + d)] laid out
// as (k_i, gz_i, a_i, gu_i), their coefficients C_i [b] and the decay. The running memory is never formed:
//     W_in = decay A_in - sum_i C_i gz_i k_i^T,    W_out = decay A_out - sum_i C_i gu_i a_i^T.
// The token of row n becomes factor row j = pos[n] % b of its chunk. A token that starts a chunk (j == 0) has
// had its chunk started already (rows folded into the anchor, the rule's boundary map, rows cleared): the
// caller runs that step first (models/backend.py), once per chunk. Here every live row reads A_in once (the
// key's and the query's first layers in one pass), A_out three times while it sits in L1/L2 (forward,
// backward, read), and its j filled rows; it writes its row, the coefficients and the decay. Nothing of the
// memory's size is written. Rows with a negative slot or length 0 are skipped (their read and surprise: 0).
// Parallel over (row, head) on ATen's thread pool. The inner loops are written with ATen's vectors
// (at::vec::Vectorized, AVX2 with -march=native on x86): register-blocked matrix-vector products and vectorised
// erf/exp/tanh. Written as plain loops they ran at ~7 GFLOP/s, bound by FMA chains, accumulators kept on the
// stack and libm calls one value at a time; see docs/kernels.md for the measurement.

#include "memory_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using namespace miras_cpu;

// Per-thread scratch: D-sized for the hidden layer, d-sized for the output, b-sized for the rows' weights.
struct Scratch {
  std::vector<float> z, zq, a, gz, aq, sum_d, u, u_hat, y, gu, uq, magnitude, sum_o, weight;
  Scratch(int64_t D, int64_t d, int64_t b)
      : z(D), zq(D), a(D), gz(D), aq(D), sum_d(D), u(d), u_hat(d), y(d), gu(d), uq(d), magnitude(d), sum_o(d),
        weight(b) {}
};

// One (row, head): the token's factors at the anchor, the read at the updated memory, the new row.
void decode_head(const Rule& rule, const float* q, const float* k, const float* v, float eta, float log_alpha,
                 float delta, const float* a_in, const float* a_out, float* rows, float* coef, float* decay_ptr,
                 const float* ln_w, const float* ln_b, int64_t j, float* out, float* surprise, Scratch& s, int64_t D,
                 int64_t d) {
  const int64_t RW = 2 * (D + d);
  // Pass 1 over A_in: the key's and the query's pre-activations.
  matvec<2>(a_in, d, D, d, {k, q}, {s.z.data(), s.zq.data()});
  gelu(s.z.data(), s.a.data(), D);
  // The key's forward through A_out, its error, loss and output gradient (LayerNorm's backward).
  matvec<1>(a_out, D, d, D, {s.a.data()}, {s.u.data()});
  const float loss = key_output_grad(rule, delta, s.u.data(), k, v, ln_w, ln_b, s.u_hat.data(), s.y.data(),
                                     s.magnitude.data(), s.gu.data(), d);
  if (surprise != nullptr) *surprise = loss;
  // The key's backward through A_out: gz = (A_out^T gu) * gelu'(z).
  matvec_t(a_out, D, d, D, s.gu.data(), s.gz.data());
  times_gelu_grad(s.gz.data(), s.z.data(), D);

  // The token's gates: its alpha decays the old rows' coefficients and the anchor's; it enters with eta.
  float alpha = std::exp(log_alpha);
  if (rule.kl) {
    alpha = 1.0f;
    if (j == 0) eta = 0.0f;  // the lag token's update is its boundary step
  }
  for (int64_t i = 0; i < j; ++i) coef[i] *= alpha;
  const float decay = *decay_ptr * alpha;

  // The read: zq = W_in q, aq = gelu(zq), uq = W_out aq, through the anchor and the old rows and the new one:
  // zq = decay A_in q - sum_i C_i (k_i . q) gz_i - eta (k . q) gz, and likewise uq through (a_i, gu_i).
  float* weight = s.weight.data();
  matvec<1>(rows, RW, j, d, {q}, {weight});  // k_i . q
  for (int64_t i = 0; i < j; ++i) weight[i] *= coef[i];
  matvec_t(rows + d, RW, j, D, weight, s.sum_d.data());
  const float kq = dot(k, q, d);
  for (int64_t r = 0; r < D; ++r) s.zq[r] = decay * s.zq[r] - eta * kq * s.gz[r] - s.sum_d[r];
  gelu(s.zq.data(), s.aq.data(), D);
  const float aa = dot(s.aq.data(), s.a.data(), D);
  matvec<1>(a_out, D, d, D, {s.aq.data()}, {s.uq.data()});
  matvec<1>(rows + d + D, RW, j, D, {s.aq.data()}, {weight});  // a_i . aq
  for (int64_t i = 0; i < j; ++i) weight[i] *= coef[i];
  matvec_t(rows + d + 2 * D, RW, j, d, weight, s.sum_o.data());
  for (int64_t c = 0; c < d; ++c) s.uq[c] = decay * s.uq[c] - eta * aa * s.gu[c] - s.sum_o[c];
  layer_norm(s.uq.data(), ln_w, ln_b, rule.ln_eps, s.u_hat.data(), out, d);
  for (int64_t c = 0; c < d; ++c) out[c] += q[c];

  // The new row (k, gz, a, gu), its coefficient and the decay.
  float* row = rows + j * RW;
  std::copy(k, k + d, row);
  std::copy(s.gz.begin(), s.gz.end(), row + d);
  std::copy(s.a.begin(), s.a.end(), row + d + D);
  std::copy(s.gu.begin(), s.gu.end(), row + d + 2 * D);
  coef[j] = eta;
  *decay_ptr = decay;
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// q, k, v [N, H, 1, d]; eta, log_alpha, delta [N, H, 1]; the pool: anchor_in [P, H, D, d], anchor_out
// [P, H, d, D], rows [P, H, b, 2(D + d)], coef [P, H, b], decay [P, H]; ln_weight, ln_bias [H, 1, d]; slots, pos,
// lengths [N] int64. Returns the reads [N, H, 1, d]; surprise [N, H, 1], if given, takes each token's loss.
at::Tensor factored_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& eta,
                           const at::Tensor& log_alpha, const std::optional<at::Tensor>& delta,
                           const at::Tensor& anchor_in, const at::Tensor& anchor_out, at::Tensor& rows,
                           at::Tensor& coef, at::Tensor& decay, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                           const at::Tensor& slots, const at::Tensor& pos, const at::Tensor& lengths,
                           const std::optional<at::Tensor>& surprise, int64_t bias, bool kl, double p, double lp_knee,
                           double abs_eps, double sharpness, double ln_eps) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  check_f32(eta, "eta");
  check_f32(log_alpha, "log_alpha");
  check_f32(anchor_in, "anchor_in");
  check_f32(anchor_out, "anchor_out");
  check_f32(rows, "rows");
  check_f32(coef, "coef");
  check_f32(decay, "decay");
  check_f32(ln_weight, "ln_weight");
  check_f32(ln_bias, "ln_bias");
  if (delta) check_f32(*delta, "delta");
  if (surprise) check_f32(*surprise, "surprise");
  for (const auto* t : {&slots, &pos, &lengths})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == q.size(0),
                "slots, pos and lengths must be contiguous int64 [N]");
  const int64_t N = q.size(0), H = q.size(1), d = q.size(3), D = anchor_in.size(2), b = rows.size(2);
  TORCH_CHECK(q.size(2) == 1, "one token per row");
  TORCH_CHECK(rows.size(3) == 2 * (D + d), "factor rows must be 2(D + d) wide");
  const Rule rule = make_rule(bias, kl, p, lp_knee, abs_eps, sharpness, ln_eps, delta.has_value());
  at::Tensor out = at::zeros_like(q);
  if (surprise) surprise->zero_();
  const float *q_p = q.data_ptr<float>(), *k_p = k.data_ptr<float>(), *v_p = v.data_ptr<float>();
  const float *eta_p = eta.data_ptr<float>(), *la_p = log_alpha.data_ptr<float>();
  const float* delta_p = delta ? delta->data_ptr<float>() : nullptr;
  float* surprise_p = surprise ? surprise->data_ptr<float>() : nullptr;
  const float *a_in = anchor_in.data_ptr<float>(), *a_out = anchor_out.data_ptr<float>();
  float *rows_p = rows.data_ptr<float>(), *coef_p = coef.data_ptr<float>(), *decay_p = decay.data_ptr<float>();
  const float *ln_w = ln_weight.data_ptr<float>(), *ln_b = ln_bias.data_ptr<float>();
  const int64_t *slot_p = slots.data_ptr<int64_t>(), *pos_p = pos.data_ptr<int64_t>();
  const int64_t* len_p = lengths.data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(D, d, b);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / H, h = index % H, slot = slot_p[n];
      if (slot < 0 || len_p[n] <= 0) continue;
      const int64_t head = slot * H + h, token = n * H + h;
      decode_head(rule, q_p + token * d, k_p + token * d, v_p + token * d, eta_p[token], la_p[token],
                  delta_p ? delta_p[token] : 0.0f, a_in + head * D * d, a_out + head * D * d,
                  rows_p + head * b * 2 * (D + d), coef_p + head * b, decay_p + head, ln_w + h * d, ln_b + h * d,
                  pos_p[n] % b, out_p + token * d, surprise_p ? surprise_p + token : nullptr, scratch, D, d);
    }
  });
  return out;
}

// The schema says what it writes: the pool's rows, coefficients and decay, and the surprise buffer.
TORCH_LIBRARY(miras_serve, m) {
  m.def(
      "factored_decode(Tensor q, Tensor k, Tensor v, Tensor eta, Tensor log_alpha, Tensor? delta, Tensor anchor_in, "
      "Tensor anchor_out, Tensor(a!) rows, Tensor(b!) coef, Tensor(c!) decay, Tensor ln_weight, Tensor ln_bias, "
      "Tensor slots, Tensor pos, Tensor lengths, Tensor(d!)? surprise, int bias, bool kl, float p, float lp_knee, "
      "float abs_eps, float sharpness, float ln_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(miras_serve, CPU, m) { m.impl("factored_decode", &factored_decode); }
