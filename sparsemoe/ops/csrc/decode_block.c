/* A transformer block of a decode step (one new position per sequence) in two native calls, for
 * sparsemoe/model/native_decode.py:
 *
 *     sparsemoe_decode_attention_half_f32 / _bf16(block, step, x [B, D], x_mid [B, D], past, cos, sin, R)
 *         h = rms_norm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T; att = attention over the cache (the new key and
 *         value written at `past`); x_mid = x + att Wo^T; h = rms_norm(x_mid) (the feed-forward's input)
 *     sparsemoe_decode_moe_half_f32 / _bf16(block, step, x_mid [B, D])
 *         logits = h Wr^T (float32); top-k routing; y = the experts from the router's choices; x_mid += y
 *
 * Each half is the kernels the modules call (the same functions on the same values in the same order, so the
 * results are bit-identical), made from here rather than from Python: at a decode step the Python between a
 * dozen small calls per block, run with caches just emptied by the weight stream, and the router's product
 * in PyTorch took about 0.7 ms of mixtral-1k's 10.2 ms bfloat16 step (docs/benchmarks.md). `block` holds what a block's calls read (prepared once per model), `step`
 * the buffers shared by the blocks. Legend: B sequences, D width, H query heads, G key/value heads, Hd head
 * width, E experts, K experts per token, F expert width, I = F or 2F (gated).
 *
 * Returns 0; the status of a failed kernel (-1 out of memory, -3 bad position, -4 bad expert id); -5 when
 * the router logits are not finite, -6 when the MoE output is not finite (x_mid then holds the block's
 * state before the MoE output was added; the caller runs the block again as modules, which raise). */
#include <stdint.h>

#include "vec.h"

typedef struct {
  /* attention half */
  const void* attn_norm; /* [D] */
  float attn_eps;
  const void* qkv[3]; /* Wq [H * Hd, D], Wk and Wv [G * Hd, D] */
  int64_t qkv_rows[3];
  const void* o_proj; /* Wo [D, H * Hd] */
  int64_t o_rows;     /* D */
  void* cache_k;      /* [B, G, L, Hd] */
  void* cache_v;
  int64_t cache_len; /* L */
  int64_t window;    /* 0: attend to every cached position */
  float scale;
  int rope;
  const void* ffn_norm;
  float ffn_eps;
  /* MoE half */
  const void* router; /* [E, D] */
  int64_t E, K;
  int sigmoid, renormalize;
  float route_scale;
  int bits; /* 0: float experts w_in [E, I, D], w_out [E, D, F]; 8 or 4: quantized (data and scales) */
  const void* w_in;
  const void* s_in;
  const void* w_out;
  const void* s_out;
  int64_t group, F, I;
  int act;
  float* logits; /* [B, E]: this block's routing, read back by the MoE layer's statistics */
  float* probs;  /* [B, E] */
  int64_t* ids;  /* [B, K] */
  float* weights; /* [B, K] */
} decode_block_t;

typedef struct {
  int64_t B, D, H, G, Hd;
  void *h, *q, *k, *v, *att, *o; /* [B, D], [B, H * Hd], [B, G * Hd] twice, [B, H * Hd], [B, D] */
  float* y;                      /* [B, D] */
  void* y_out;                   /* [B, D]: y rounded to bfloat16 (bfloat16 models) */
  int threads;
} decode_step_t;

/* The kernels (decode_mlp.c, norm.c, finite.c, decode_attention.c). */
void sparsemoe_topk_route(const float* logits, int64_t T, int64_t E, int64_t K, int sigmoid, int renormalize,
                          float scale, float* probs, int64_t* ids, float* weights);
int sparsemoe_all_finite(const void* p, int64_t n, int bf16, int threads);
int sparsemoe_decode_mlp_quant_choices(const void* x, int x_bf16, const int64_t* ids, const float* wts, int64_t T,
                                       int64_t K, int64_t E, const void* w_in, const void* s_in, const void* w_out,
                                       const void* s_out, int bits, int64_t group, int64_t D, int64_t F, int64_t I,
                                       int act, float* y, int threads);

#define DEFINE_DECODE_BLOCK(SUFFIX, T, HALF, GET, PUT)                                                             \
  void sparsemoe_rms_norm_##SUFFIX(const T* x, const T* w, int64_t n, int64_t D, float eps, T* out, int threads); \
  int sparsemoe_linear_many_##SUFFIX(const void* x_in, int x_bf16, int64_t n, int64_t K, int64_t J,               \
                                     const T* const* w, const int64_t* O, void* const* y, int y_bf16, int threads); \
  int sparsemoe_decode_attention_##SUFFIX(const T* q, const T* k, const T* v, const float* cos, const float* sin, \
                                          T* cache_k, T* cache_v, int64_t B, int64_t H, int64_t G, int64_t Hd,   \
                                          int64_t R, int64_t L, int64_t past, int64_t window, float scale, T* out, \
                                          int threads);                                                            \
  int sparsemoe_decode_mlp_choices_##SUFFIX(const T* x, const int64_t* ids, const float* wts, int64_t T_,         \
                                            int64_t K, int64_t E, const T* w_in, const T* w_out, int64_t D,       \
                                            int64_t F, int64_t I, int act, float* y, int threads);                \
                                                                                                                   \
  int sparsemoe_decode_attention_half_##SUFFIX(const decode_block_t* a, const decode_step_t* s, const T* x,        \
                                               T* x_mid, int64_t past, const float* cos, const float* sin,        \
                                               int64_t R) {                                                       \
    const int64_t B = s->B, D = s->D, n = B * D;                                                                  \
    const int threads = s->threads;                                                                               \
    sparsemoe_rms_norm_##SUFFIX(x, (const T*)a->attn_norm, B, D, a->attn_eps, (T*)s->h, threads);                 \
    void* const qkv_out[3] = {s->q, s->k, s->v};                                                                  \
    int status = sparsemoe_linear_many_##SUFFIX(s->h, HALF, B, D, 3, (const T* const*)a->qkv, a->qkv_rows,        \
                                                qkv_out, HALF, threads);                                          \
    if (status) return status;                                                                                    \
    status = sparsemoe_decode_attention_##SUFFIX(                                                                 \
        (const T*)s->q, (const T*)s->k, (const T*)s->v, a->rope ? cos : NULL, a->rope ? sin : NULL,               \
        (T*)a->cache_k, (T*)a->cache_v, B, s->H, s->G, s->Hd, a->rope ? R : s->Hd, a->cache_len, past, a->window, \
        a->scale, (T*)s->att, threads);                                                                           \
    if (status) return status;                                                                                    \
    const T* const o_w[1] = {(const T*)a->o_proj};                                                                \
    void* const o_out[1] = {s->o};                                                                                \
    status = sparsemoe_linear_many_##SUFFIX(s->att, HALF, B, s->H * s->Hd, 1, o_w, &a->o_rows, o_out, HALF,       \
                                            threads);                                                             \
    if (status) return status;                                                                                    \
    const T* o = (const T*)s->o;                                                                                  \
    for (int64_t i = 0; i < n; i++) x_mid[i] = PUT(GET(x[i]) + GET(o[i])); /* PyTorch's x + o */                  \
    sparsemoe_rms_norm_##SUFFIX(x_mid, (const T*)a->ffn_norm, B, D, a->ffn_eps, (T*)s->h, threads);               \
    return 0;                                                                                                     \
  }                                                                                                               \
                                                                                                                   \
  int sparsemoe_decode_moe_half_##SUFFIX(const decode_block_t* a, const decode_step_t* s, T* x_mid) {             \
    const int64_t B = s->B, D = s->D, n = B * D;                                                                  \
    const int threads = s->threads;                                                                               \
    const T* const r_w[1] = {(const T*)a->router};                                                                \
    void* const r_out[1] = {a->logits};                                                                           \
    int status = sparsemoe_linear_many_##SUFFIX(s->h, HALF, B, D, 1, r_w, &a->E, r_out, 0, threads);              \
    if (status) return status;                                                                                    \
    if (!sparsemoe_all_finite(a->logits, B * a->E, 0, threads)) return -5;                                        \
    sparsemoe_topk_route(a->logits, B, a->E, a->K, a->sigmoid, a->renormalize, a->route_scale, a->probs, a->ids,  \
                         a->weights);                                                                             \
    if (a->bits)                                                                                                  \
      status = sparsemoe_decode_mlp_quant_choices(s->h, HALF, a->ids, a->weights, B, a->K, a->E, a->w_in, a->s_in, \
                                                  a->w_out, a->s_out, a->bits, a->group, D, a->F, a->I, a->act,  \
                                                  s->y, threads);                                                 \
    else                                                                                                          \
      status = sparsemoe_decode_mlp_choices_##SUFFIX((const T*)s->h, a->ids, a->weights, B, a->K, a->E,           \
                                                     (const T*)a->w_in, (const T*)a->w_out, D, a->F, a->I, a->act, \
                                                     s->y, threads);                                              \
    if (status) return status;                                                                                    \
    T* out = (T*)s->y_out; /* the layer's output in the model's dtype, as the module rounds it */                 \
    for (int64_t i = 0; i < n; i++) out[i] = PUT(s->y[i]);                                                        \
    if (!sparsemoe_all_finite(out, n, HALF, threads)) return -6;                                                  \
    for (int64_t i = 0; i < n; i++) x_mid[i] = PUT(GET(x_mid[i]) + GET(out[i])); /* PyTorch's x_mid.add_(y) */   \
    return 0;                                                                                                     \
  }

#define SAME(v) (v)
DEFINE_DECODE_BLOCK(f32, float, 0, SAME, SAME)
DEFINE_DECODE_BLOCK(bf16, uint16_t, 1, bf16_to_float, float_to_bf16)
#undef SAME
#undef DEFINE_DECODE_BLOCK
