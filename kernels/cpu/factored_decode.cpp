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
// Parallel over (row, head) on ATen's thread pool; the inner loops are contiguous fp32 (vectorised by
// -O3 -march=native with `omp simd`).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// The attentional biases, as kernels/rule.py's BIAS_CODES.
enum Bias : int64_t { kL2 = 0, kLp = 1, kHuber = 2 };

struct Rule {
  int64_t bias;
  bool kl;  // Memora: no decay inside a chunk, and the chunk's first token enters through its boundary step
  float p, abs_eps, sharpness, ln_eps;
  // lp's knee r (+inf: none) as the step uses it: r^2, r^p and r^(p-2) (beyond r, |g| = r^(p-2) s is linear)
  float knee, knee_sq, knee_pow, knee_slope;
};

// p phi(|e_j|) of the lp bias: a^p up to the knee r, then r^p + p r^(p-2) (a^2 - r^2) / 2 (its C1 continuation).
inline float lp_power(const Rule& rule, float e) {
  const float a = std::fabs(e);
  if (a <= rule.knee) return std::pow(a, rule.p);
  return rule.knee_pow + rule.p * rule.knee_slope * (a * a - rule.knee_sq) * 0.5f;
}

// |g| of the lp bias from s^2 = e^2 + eps: s^(p-1) up to the knee, r^(p-2) s beyond it.
inline float lp_magnitude(const Rule& rule, float s_sq) {
  if (s_sq <= rule.knee_sq) return std::pow(s_sq, (rule.p - 1.0f) / 2.0f);
  return rule.knee_slope * std::sqrt(s_sq);
}

inline float gelu(float z) { return 0.5f * z * (1.0f + std::erf(z * kSqrtHalf)); }

inline float gelu_grad(float z) {
  return 0.5f * (1.0f + std::erf(z * kSqrtHalf)) + z * std::exp(-0.5f * z * z) * kInvSqrt2Pi;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha x
inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// LayerNorm of u [d] into out (weight, bias [d]); keeps the normalised input and 1/std for the backward.
inline float layer_norm(const float* u, const float* weight, const float* bias, float eps, float* u_hat, float* out,
                        int64_t d) {
  float mean = 0.0f;
  for (int64_t c = 0; c < d; ++c) mean += u[c];
  mean /= static_cast<float>(d);
  float var = 0.0f;
  for (int64_t c = 0; c < d; ++c) var += (u[c] - mean) * (u[c] - mean);
  const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d; ++c) {
    u_hat[c] = (u[c] - mean) * inv_std;
    out[c] = u_hat[c] * weight[c] + bias[c];
  }
  return inv_std;
}

// The key's output gradient gu [d] at the anchor from its error e = M(k) - v (overwritten), and its loss.
inline float output_grad(const Rule& rule, float delta, float* e, int64_t d) {
  float sq = 0.0f, abs_sum = 0.0f, p_sum = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    sq += e[c] * e[c];
    abs_sum += std::fabs(e[c]);
    if (rule.bias == kLp) p_sum += lp_power(rule, e[c]);
  }
  if (rule.bias == kL2) return 0.5f * sq;
  if (rule.bias == kLp) {
    for (int64_t c = 0; c < d; ++c)
      e[c] = std::tanh(rule.sharpness * e[c]) * lp_magnitude(rule, e[c] * e[c] + rule.abs_eps);
    return p_sum / rule.p;
  }
  if (std::sqrt(sq / static_cast<float>(d)) <= delta) return 0.5f * sq;  // huber: l2 inside the radius
  for (int64_t c = 0; c < d; ++c) e[c] = delta * std::tanh(rule.sharpness * e[c]);
  return delta * abs_sum;
}

struct Scratch {
  std::vector<float> z, zq, a, gz, aq, u, u_hat, y, gu, uq;
  Scratch(int64_t D, int64_t d)
      : z(D), zq(D), a(D), gz(D), aq(D), u(d), u_hat(d), y(d), gu(d), uq(d) {}
};

// One (row, head): the token's factors at the anchor, the read at the updated memory, the new row.
void decode_head(const Rule& rule, const float* q, const float* k, const float* v, float eta, float log_alpha,
                 float delta, const float* a_in, const float* a_out, float* rows, float* coef, float* decay_ptr,
                 const float* ln_w, const float* ln_b, int64_t j, float* out, float* surprise, Scratch& s, int64_t D,
                 int64_t d) {
  const int64_t RW = 2 * (D + d);
  // Pass 1 over A_in: the key's and the query's pre-activations.
  for (int64_t r = 0; r < D; ++r) {
    const float* w = a_in + r * d;
    float zk = 0.0f, zq = 0.0f;
#pragma omp simd reduction(+ : zk, zq)
    for (int64_t c = 0; c < d; ++c) {
      zk += w[c] * k[c];
      zq += w[c] * q[c];
    }
    s.z[r] = zk;
    s.zq[r] = zq;
    s.a[r] = gelu(zk);
  }
  // The key's forward through A_out, its error, loss and output gradient (LayerNorm's backward).
  for (int64_t c = 0; c < d; ++c) s.u[c] = dot(a_out + c * D, s.a.data(), D);
  const float inv_std = layer_norm(s.u.data(), ln_w, ln_b, rule.ln_eps, s.u_hat.data(), s.y.data(), d);
  float* g = s.y.data();  // y becomes the error, then d l / d M(k)
  for (int64_t c = 0; c < d; ++c) g[c] = k[c] + s.y[c] - v[c];
  const float loss = output_grad(rule, delta, g, d);
  if (surprise != nullptr) *surprise = loss;
  float g_mean = 0.0f, gu_mean = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    g[c] *= ln_w[c];
    g_mean += g[c];
    gu_mean += g[c] * s.u_hat[c];
  }
  g_mean /= static_cast<float>(d);
  gu_mean /= static_cast<float>(d);
  for (int64_t c = 0; c < d; ++c) s.gu[c] = inv_std * (g[c] - g_mean - s.u_hat[c] * gu_mean);
  // The key's backward through A_out: gz = (A_out^T gu) * gelu'(z).
  std::fill(s.gz.begin(), s.gz.end(), 0.0f);
  for (int64_t c = 0; c < d; ++c) axpy(s.gu[c], a_out + c * D, s.gz.data(), D);
  for (int64_t r = 0; r < D; ++r) s.gz[r] *= gelu_grad(s.z[r]);

  // The token's gates: its alpha decays the old rows' coefficients and the anchor's; it enters with eta.
  float alpha = std::exp(log_alpha);
  if (rule.kl) {
    alpha = 1.0f;
    if (j == 0) eta = 0.0f;  // the lag token's update is its boundary step
  }
  for (int64_t i = 0; i < j; ++i) coef[i] *= alpha;
  const float decay = *decay_ptr * alpha;

  // The read: zq = W_in q, aq = gelu(zq), uq = W_out aq, through the anchor and the old rows and the new one.
  const float kq = dot(k, q, d);
  for (int64_t r = 0; r < D; ++r) s.zq[r] = decay * s.zq[r] - eta * kq * s.gz[r];
  for (int64_t i = 0; i < j; ++i) {
    const float* row = rows + i * RW;
    axpy(-coef[i] * dot(row, q, d), row + d, s.zq.data(), D);
  }
  for (int64_t r = 0; r < D; ++r) s.aq[r] = gelu(s.zq[r]);
  const float aa = dot(s.aq.data(), s.a.data(), D);
  for (int64_t c = 0; c < d; ++c) s.uq[c] = decay * dot(a_out + c * D, s.aq.data(), D) - eta * aa * s.gu[c];
  for (int64_t i = 0; i < j; ++i) {
    const float* row = rows + i * RW;
    axpy(-coef[i] * dot(row + d + D, s.aq.data(), D), row + d + 2 * D, s.uq.data(), d);
  }
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
  TORCH_CHECK(bias != kHuber || delta.has_value(), "the huber bias needs delta");
  for (const auto* t : {&slots, &pos, &lengths})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == q.size(0),
                "slots, pos and lengths must be contiguous int64 [N]");
  const int64_t N = q.size(0), H = q.size(1), d = q.size(3), D = anchor_in.size(2), b = rows.size(2);
  TORCH_CHECK(q.size(2) == 1, "one token per row");
  TORCH_CHECK(rows.size(3) == 2 * (D + d), "factor rows must be 2(D + d) wide");
  TORCH_CHECK(lp_knee > 0.0, "lp_knee must be > 0 (+inf: none)");
  const float knee = static_cast<float>(lp_knee), p_f = static_cast<float>(p);
  const Rule rule{bias, kl, p_f, static_cast<float>(abs_eps), static_cast<float>(sharpness), static_cast<float>(ln_eps),
                  knee, knee * knee, std::pow(knee, p_f), std::pow(knee, p_f - 2.0f)};
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
    Scratch scratch(D, d);
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
