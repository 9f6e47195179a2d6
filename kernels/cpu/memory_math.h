// The memory's per-token math on the CPU, shared by the native kernels (factored_decode.cpp, mlp_segment.cpp):
// the attentional biases' output gradients and losses, GELU and its derivative, LayerNorm and its backward
// pieces, written with ATen's vectors (at::vec::Vectorized) where they run over the memory's hidden width.
#pragma once

#include "vec_products.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace miras_cpu {

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

// x^e by products for the exponents 1 to 4 the presets use (as models.memory.power): libm's pow was ~10x slower.
inline float power(float x, float e) {
  if (e == 1.0f) return x;
  if (e == 2.0f) return x * x;
  if (e == 3.0f) return x * x * x;
  if (e == 4.0f) return (x * x) * (x * x);
  return std::pow(x, e);
}

// p phi(|e_j|) of the lp bias: a^p up to the knee r, then r^p + p r^(p-2) (a^2 - r^2) / 2 (its C1 continuation).
inline float lp_power(const Rule& rule, float e) {
  const float a = std::fabs(e);
  if (a <= rule.knee) return power(a, rule.p);
  return rule.knee_pow + rule.p * rule.knee_slope * (a * a - rule.knee_sq) * 0.5f;
}

// |g| of the lp bias from s^2 = e^2 + eps: s^(p-1) up to the knee, r^(p-2) s beyond it.
inline float lp_magnitude(const Rule& rule, float s_sq) {
  if (s_sq <= rule.knee_sq) return power(s_sq, (rule.p - 1.0f) / 2.0f);
  return rule.knee_slope * std::sqrt(s_sq);
}

// out = gelu(z) over n values (out may be z). Vectorised: erf and exp one value at a time through libm cost more
// than the products around them.
inline void gelu(const float* z, float* out, int64_t n) {
  at::vec::map([](Vec x) { return Vec(0.5f) * x * (Vec(1.0f) + (x * Vec(kSqrtHalf)).erf()); }, out, z, n);
}

// g *= gelu'(z) = Phi(z) + z phi(z), over n values.
inline void times_gelu_grad(float* g, const float* z, int64_t n) {
  at::vec::map2(
      [](Vec gv, Vec x) {
        const Vec phi = (Vec(-0.5f) * x * x).exp() * Vec(kInvSqrt2Pi);
        return gv * (Vec(0.5f) * (Vec(1.0f) + (x * Vec(kSqrtHalf)).erf()) + x * phi);
      },
      g, g, z, n);
}

// The rule's constants as the kernels use them (lp_knee: +inf for none), its arguments checked (``has_delta``:
// whether the call passed huber's delta).
inline Rule make_rule(int64_t bias, bool kl, double p, double lp_knee, double abs_eps, double sharpness,
                      double ln_eps, bool has_delta) {
  TORCH_CHECK(bias != kHuber || has_delta, "the huber bias needs delta");
  TORCH_CHECK(lp_knee > 0.0, "lp_knee must be > 0 (+inf: none)");
  const float knee = static_cast<float>(lp_knee), p_f = static_cast<float>(p);
  return Rule{bias,  kl,          p_f, static_cast<float>(abs_eps), static_cast<float>(sharpness),
              static_cast<float>(ln_eps), knee, knee * knee, std::pow(knee, p_f), std::pow(knee, p_f - 2.0f)};
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
inline float output_grad(const Rule& rule, float delta, float* e, float* magnitude, int64_t d) {
  float sq = 0.0f, abs_sum = 0.0f, p_sum = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    sq += e[c] * e[c];
    abs_sum += std::fabs(e[c]);
    if (rule.bias == kLp) p_sum += lp_power(rule, e[c]);
  }
  if (rule.bias == kL2) return 0.5f * sq;
  if (rule.bias == kLp) {
    for (int64_t c = 0; c < d; ++c) magnitude[c] = lp_magnitude(rule, e[c] * e[c] + rule.abs_eps);
    const float sharpness = rule.sharpness;
    at::vec::map2([sharpness](Vec x, Vec m) { return (Vec(sharpness) * x).tanh() * m; }, e, e, magnitude, d);
    return p_sum / rule.p;
  }
  if (std::sqrt(sq / static_cast<float>(d)) <= delta) return 0.5f * sq;  // huber: l2 inside the radius
  const float sharpness = rule.sharpness;
  at::vec::map([sharpness, delta](Vec x) { return Vec(delta) * (Vec(sharpness) * x).tanh(); }, e, e, d);
  return delta * abs_sum;
}

// A key's output gradient through the memory's LayerNorm (models.memory.mlp_factors_at, one token): from
// u = A_out a [d], the error e = k + LN(u) - v, the bias's gradient d l / d y, and gu [d] = LN's backward of it.
// u_hat, g, magnitude: scratch [d]. Returns the token's loss.
inline float key_output_grad(const Rule& rule, float delta, const float* u, const float* k, const float* v,
                             const float* ln_w, const float* ln_b, float* u_hat, float* g, float* magnitude,
                             float* gu, int64_t d) {
  const float inv_std = layer_norm(u, ln_w, ln_b, rule.ln_eps, u_hat, g, d);
  for (int64_t c = 0; c < d; ++c) g[c] = k[c] + g[c] - v[c];  // the error M(k) - v
  const float loss = output_grad(rule, delta, g, magnitude, d);
  float g_mean = 0.0f, gu_mean = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    g[c] *= ln_w[c];
    g_mean += g[c];
    gu_mean += g[c] * u_hat[c];
  }
  g_mean /= static_cast<float>(d);
  gu_mean /= static_cast<float>(d);
  for (int64_t c = 0; c < d; ++c) gu[c] = inv_std * (g[c] - g_mean - u_hat[c] * gu_mean);
  return loss;
}

}  // namespace miras_cpu
