/* Expert activations and their backward, one row at a time (see activation.c). */
#ifndef SPARSEMOE_ACTIVATION_H
#define SPARSEMOE_ACTIVATION_H

#include <stdint.h>

enum { ACT_SWIGLU = 0, ACT_GEGLU = 1, ACT_RELU = 2, ACT_GELU = 3 };

/* a [F] = act(h [I]); gated (I = 2F): h = [gate | up], a = act(gate) * up. float32 (activation_rows.h). */
void sparsemoe_activate_row_f32(const float* h, float* a, int64_t F, int act);

/* For one row of o = w * (W_out act(h)) given dA = d loss / d act(h) before the weighting: aw [F] = w act(h),
 * dH [I] = d loss / d h, returns <dA, act(h)> (the gradient of w). float32 (activation_rows.h). */
float sparsemoe_activation_backward_row_f32(const float* h, const float* dA, float w, float* aw, float* dH, int64_t F,
                                            int act);

#endif
