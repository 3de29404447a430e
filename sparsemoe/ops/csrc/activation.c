/* Expert activations (SwiGLU, GEGLU, ReLU, GELU with the tanh approximation) and their backward, float32,
 * vectorised, one pass over each row.
 *
 * Legend: n rows, F hidden width, I in-projection width (2F gated: gate then up), h [n, I] the
 * in-projection output, a [n, F] = act(h), w [n] the router weight of each row, dA [n, F] the gradient
 * with respect to a of the expert output before weighting (dy W_out), dy the output gradient.
 *
 * The same arithmetic as PyTorch's silu / gelu(approximate="tanh") up to float rounding (exp by vexp).
 */
#include "activation.h"

#include "vec.h"

#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f

static inline vf sigmoid(vf g) { return splat(1.0f) / (splat(1.0f) + vexp(-g)); }

/* tanh(z) = 1 - 2 / (exp(2z) + 1): +-1 where exp overflows to inf or underflows to 0. */
static inline vf vtanh(vf z) { return splat(1.0f) - splat(2.0f) / (vexp(z + z) + splat(1.0f)); }

static inline vf gelu(vf x, vf* dgelu) {
  vf inner = splat(SQRT_2_OVER_PI) * (x + splat(GELU_CUBIC) * x * x * x);
  vf t = vtanh(inner);
  if (dgelu) {
    vf dinner = splat(SQRT_2_OVER_PI) * (splat(1.0f) + splat(3.0f * GELU_CUBIC) * x * x);
    *dgelu = splat(0.5f) * (splat(1.0f) + t) + splat(0.5f) * x * (splat(1.0f) - t * t) * dinner;
  }
  return splat(0.5f) * x * (splat(1.0f) + t);
}

/* act(h) for one vector of hidden units; with the derivative d act / d h when `deriv` is not NULL.
 * Gated: g the gate, u the up value; act = f(g) * u, and *deriv = f'(g), *fg = f(g). */
static inline vf act_forward(vf g, vf u, int act, vf* deriv, vf* fg) {
  switch (act) {
    case ACT_SWIGLU: {
      vf s = sigmoid(g), f = g * s; /* silu(-inf) = -inf * 0 = NaN, as in PyTorch */
      if (deriv) *deriv = s * (splat(1.0f) + g * (splat(1.0f) - s));
      if (fg) *fg = f;
      return f * u;
    }
    case ACT_GEGLU: {
      vf f = gelu(g, deriv);
      if (fg) *fg = f;
      return f * u;
    }
    case ACT_RELU: { /* NaN is not <= 0: it passes through, and so does its gradient, as in PyTorch */
      vi not_positive = g <= splat(0.0f);
      if (deriv) *deriv = vselect(not_positive, splat(0.0f), splat(1.0f));
      return vselect(not_positive, splat(0.0f), g);
    }
    default:
      return gelu(g, deriv);
  }
}

void sparsemoe_activate_row(const float* h, float* a, int64_t F, int act) {
  const int gated = act == ACT_SWIGLU || act == ACT_GEGLU;
  const float* up = gated ? h + F : h;
  for (int64_t f = 0; f < F; f += VL) {
    int64_t m = F - f < VL ? F - f : VL;
    vf g = m == VL ? load(h + f) : load_part(h + f, m);
    vf u = gated ? (m == VL ? load(up + f) : load_part(up + f, m)) : g;
    vf out = act_forward(g, u, act, 0, 0);
    if (m == VL) store(a + f, out);
    else store_part(a + f, out, m);
  }
}

/* a [n, F] = act(h [n, I]). */
void sparsemoe_activate_f32(const float* h, float* a, int64_t n, int64_t F, int64_t I, int act, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < n; r++) sparsemoe_activate_row(h + r * I, a + r * F, F, act);
}

/* For o[r] = w[r] * (W_out act(h[r])), given dA (see the legend), in one pass per row:
 *   aw [n, F] = w[r] act(h[r])  (the W_out gradient is then dy^T aw),  d_w [n] = <dA[r], act(h[r])>,
 *   dH [n, I] = d loss / d h = (w[r] dA[r]) * act'(h[r])  (gated: gate part dA w u f'(g), up part dA w f(g)). */
void sparsemoe_activation_backward_f32(const float* h, const float* dA, const float* w, float* aw, float* dH,
                                       float* d_w, int64_t n, int64_t F, int64_t I, int act, int threads) {
  const int gated = act == ACT_SWIGLU || act == ACT_GEGLU;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < n; r++) {
    const float* hr = h + r * I;
    const float* up = gated ? hr + F : hr;
    const float* dAr = dA + r * F;
    float* awr = aw + r * F;
    float* dHr = dH + r * I;
    vf dot = splat(0.0f), wr = splat(w[r]);
    for (int64_t f = 0; f < F; f += VL) {
      int64_t m = F - f < VL ? F - f : VL;
      int full = m == VL;
      vf g = full ? load(hr + f) : load_part(hr + f, m);
      vf u = gated ? (full ? load(up + f) : load_part(up + f, m)) : g;
      vf d = full ? load(dAr + f) : load_part(dAr + f, m);
      vf deriv, fg = splat(0.0f);
      vf out = act_forward(g, u, act, &deriv, &fg);
      dot += d * out; /* zero-padded tails add nothing */
      vf dw = d * wr;
      vf d_first = gated ? dw * u * deriv : dw * deriv;
      if (full) {
        store(awr + f, out * wr);
        store(dHr + f, d_first);
        if (gated) store(dHr + F + f, dw * fg);
      } else {
        store_part(awr + f, out * wr, m);
        store_part(dHr + f, d_first, m);
        if (gated) store_part(dHr + F + f, dw * fg, m);
      }
    }
    d_w[r] = hsum(dot);
  }
}
