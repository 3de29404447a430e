/* Expert activations (SwiGLU, GEGLU, ReLU, GELU with the tanh approximation) and their backward,
 * vectorised, one pass over each row, on float32 or bfloat16 tensors (computed in float32 either way).
 *
 * Legend: n rows, F hidden width, I in-projection width (2F gated: gate then up), h [n, I] the
 * in-projection output, a [n, F] = act(h), w [n] the router weight of each row, dA [n, F] the gradient
 * with respect to a of the expert output before weighting (dy W_out), dy the output gradient.
 *
 * The same arithmetic as PyTorch's silu / gelu(approximate="tanh") up to float rounding (exp by vexp).
 * bfloat16 rows are widened as they are loaded and rounded to nearest-even once as they are stored,
 * where PyTorch's bfloat16 ops round after every op.
 *
 * Exported, for T in {f32, bf16}: sparsemoe_activate_T, sparsemoe_activation_backward_T (see
 * activation_rows.h) and their one-row forms sparsemoe_activate_row_T, sparsemoe_activation_backward_row_T
 * (the float32 ones called by the decode kernel and the small-batch backward, expert_backward.c).
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

#define IO float
#define WNAME(name) name##_f32
#define IO_LOAD(p) load(p)
#define IO_LOAD_PART(p, m) load_part(p, m)
#define IO_STORE(p, v) store(p, v)
#define IO_STORE_PART(p, v, m) store_part(p, v, m)
#include "activation_rows.h"

#define IO uint16_t
#define WNAME(name) name##_bf16
#define IO_LOAD(p) load_bf16(p)
#define IO_LOAD_PART(p, m) load_part_bf16(p, m)
#define IO_STORE(p, v) store_bf16(p, v)
#define IO_STORE_PART(p, v, m) store_part_bf16(p, v, m)
#include "activation_rows.h"
