/* The activation kernels for one tensor element type: included once per type by activation.c, like a C++
 * template (no include guard on purpose). Before including, define (it undefines them at its end)
 *   IO                      the element type of h, a, dA, aw and dH (float, or uint16_t holding bfloat16)
 *   WNAME(f)                the name of function f for this type (f_f32, f_bf16)
 *   IO_LOAD(p), IO_LOAD_PART(p, m)            VL (or the first m < VL, the rest zero) values as floats
 *   IO_STORE(p, v), IO_STORE_PART(p, v, m)    the same, stored (rounded to the type)
 * The router weights w and their gradient d_w are float32 for every type. */

/* a [F] = act(h [I]); gated (I = 2F): h = [gate | up], a = act(gate) * up. */
void WNAME(sparsemoe_activate_row)(const IO* h, IO* a, int64_t F, int act) {
  const int gated = act == ACT_SWIGLU || act == ACT_GEGLU;
  const IO* up = gated ? h + F : h;
  for (int64_t f = 0; f < F; f += VL) {
    int64_t m = F - f < VL ? F - f : VL;
    vf g = m == VL ? IO_LOAD(h + f) : IO_LOAD_PART(h + f, m);
    vf u = gated ? (m == VL ? IO_LOAD(up + f) : IO_LOAD_PART(up + f, m)) : g;
    vf out = act_forward(g, u, act, 0, 0);
    if (m == VL) IO_STORE(a + f, out);
    else IO_STORE_PART(a + f, out, m);
  }
}

/* a [n, F] = act(h [n, I]). */
void WNAME(sparsemoe_activate)(const IO* h, IO* a, int64_t n, int64_t F, int64_t I, int act, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < n; r++) WNAME(sparsemoe_activate_row)(h + r * I, a + r * F, F, act);
}

/* For o = w * (W_out act(h)) of one row, given dA (see the legend), in one pass:
 *   aw [F] = w act(h)  (the W_out gradient is then dy^T aw),  returns d_w = <dA, act(h)>,
 *   dH [I] = d loss / d h = (w dA) * act'(h)  (gated: gate part dA w u f'(g), up part dA w f(g)). */
float WNAME(sparsemoe_activation_backward_row)(const IO* h, const IO* dA, float w, IO* aw, IO* dH, int64_t F, int act) {
  const int gated = act == ACT_SWIGLU || act == ACT_GEGLU;
  const IO* up = gated ? h + F : h;
  vf dot = splat(0.0f), wr = splat(w);
  for (int64_t f = 0; f < F; f += VL) {
    int64_t m = F - f < VL ? F - f : VL;
    int full = m == VL;
    vf g = full ? IO_LOAD(h + f) : IO_LOAD_PART(h + f, m);
    vf u = gated ? (full ? IO_LOAD(up + f) : IO_LOAD_PART(up + f, m)) : g;
    vf d = full ? IO_LOAD(dA + f) : IO_LOAD_PART(dA + f, m);
    vf deriv, fg = splat(0.0f);
    vf out = act_forward(g, u, act, &deriv, &fg);
    dot += d * out; /* zero-padded tails add nothing */
    vf dw = d * wr;
    vf d_first = gated ? dw * u * deriv : dw * deriv;
    if (full) {
      IO_STORE(aw + f, out * wr);
      IO_STORE(dH + f, d_first);
      if (gated) IO_STORE(dH + F + f, dw * fg);
    } else {
      IO_STORE_PART(aw + f, out * wr, m);
      IO_STORE_PART(dH + f, d_first, m);
      if (gated) IO_STORE_PART(dH + F + f, dw * fg, m);
    }
  }
  return hsum(dot);
}

/* The same for n rows: aw [n, F], dH [n, I], d_w [n] for h [n, I], dA [n, F], w [n]. */
void WNAME(sparsemoe_activation_backward)(const IO* h, const IO* dA, const float* w, IO* aw, IO* dH, float* d_w,
                                          int64_t n, int64_t F, int64_t I, int act, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < n; r++)
    d_w[r] = WNAME(sparsemoe_activation_backward_row)(h + r * I, dA + r * F, w[r], aw + r * F, dH + r * I, F, act);
}

/* The parameters are this instantiation's only: the next one defines its own. */
#undef IO
#undef WNAME
#undef IO_LOAD
#undef IO_LOAD_PART
#undef IO_STORE
#undef IO_STORE_PART
