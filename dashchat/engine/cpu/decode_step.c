// A decode step's decoder layers in one call, for models whose linears are all GGUF blocks on one
// CPU (dashchat/engine/cpu/decode_step.py builds the layer table). A layer's MLP is dense or a
// mixture of experts: the router's product, its softmax and top k (moe_kernels.c's dc_moe_route, as
// the module path routes), the routed experts in one call (dc_moe_gguf_routed), and Qwen2-MoE's
// shared expert under its sigmoid gate.
//
// An eager decode step through PyTorch modules costs ~20 Python-level operations a layer (module
// calls, views, tensor allocations, ctypes calls): ~5 ms a step for a 24-layer model, a fifth of a
// one-stream decode step of the 0.5B default model. Here the same kernels run in the same order on
// the same values, so the hidden states are bit-identical to the module path's (a test holds them
// to it); only the Python between them is gone.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// the kernels this step chains (kernels.c, gguf_kernels.c)
void dc_rms_norm(const float *x, const float *weight, float *out, int rows, int cols, float eps);
void dc_silu_and_mul(const float *gate_up, float *out, int rows, int cols);
void dc_rope_neox(float *x, int rows, int heads, int d, int64_t row_stride, const float *cos, const float *sin);
int dc_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                              const int64_t *lens, float *out, int n, int hq, int hkv, int d, int width,
                              int block_size, float scale, int window);
int dc_gguf_activation_span(int parts, const int *types, const int *k0, int k);
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs, int span);
int dc_gguf_matmul_parts(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                         const int *rows, const float *const *bias, const int8_t *xq, const float *xd,
                         const float *xs, float *y, int m, int k, int ldy, int span);
void dc_linear_ab64a(const float *x, const float *w, const float *bias, float *y, int m, int n, int k);
void dc_sigmoid(const float *x, float *out, int count);
int dc_moe_route(const float *logits, int m, int n, int k, int norm, float *weights, int64_t *chosen);
int dc_moe_gguf_routed(int m, int k, int n_experts, const float *weights, const int64_t *chosen, const float *x,
                       int hidden, int width, const int *types, const int64_t *row_bytes, const int *k_full,
                       const int *k0, const uint8_t *const *gate_w, const uint8_t *const *up_w,
                       const uint8_t *const *down_w, float *out);

#define DC_MAX_PARTS 4

// A GGUFLinear on one device: n outputs over k inputs, the rows of each source tensor in turn.
typedef struct {
  int n, k, parts;
  int type[DC_MAX_PARTS], rows[DC_MAX_PARTS];
  const uint8_t *blocks[DC_MAX_PARTS];
  const float *bias[DC_MAX_PARTS];  // this part's slice of the layer's bias, or NULL
} dc_qlinear;

// A float32 linear layer held in oneDNN's Ab64a layout, as PackedLinear runs it up to 16 rows and
// PanelGate at any (kernels.c's dc_linear_ab64a): the routers, which GGUF files keep in F32.
typedef struct {
  const float *weight, *bias;  // weight NULL: none
  int n, k;
} dc_packed_linear;

// A mixture of experts: the router (GGUF blocks, or packed float32 when router.parts is 0), the routed
// experts (each projection's weight rows at gate[e], up[e], down[e], as dc_moe_gguf reads them) and,
// with shared_width > 0, a shared expert scaled by sigmoid(shared_gate . x).
typedef struct {
  dc_qlinear router;
  dc_packed_linear router_f32, shared_gate_f32;
  int experts, top_k, norm_topk, width, shared_width;
  int types[3], k_full[3], k0[3];
  int64_t row_bytes[3];
  const uint8_t *const *gate, *const *up, *const *down;
  dc_qlinear shared_gate, shared_gate_up, shared_down;  // shared_gate.parts 0: shared_gate_f32
} dc_moe_block;

typedef struct {
  const float *input_norm, *post_norm, *q_norm, *k_norm;  // q_norm/k_norm: NULL without per-head norms
  dc_qlinear qkv, o, gate_up, down;  // gate_up, down: a dense MLP's (unused with moe)
  float *k_cache, *v_cache;  // [slots, kv_heads, head_dim]
  const dc_moe_block *moe;  // NULL: a dense MLP
} dc_decoder_layer;

typedef struct {
  int layers, hidden, heads, kv_heads, head_dim, intermediate, block_size;
  float eps, scale;
} dc_decoder_shape;

typedef struct {
  int8_t *xq;
  float *xd, *xs;
} activations;

static int product(const dc_qlinear *l, const float *x, int m, activations *a, float *y) {
  int span = dc_gguf_activation_span(l->parts, l->type, NULL, l->k);
  dc_gguf_quantize_x(x, m, l->k, a->xq, a->xd, a->xs, span);
  return dc_gguf_matmul_parts(l->parts, l->type, l->blocks, NULL, NULL, l->rows, l->bias, a->xq, a->xd, a->xs, y, m,
                              l->k, l->n, span);
}

static void add_into(float *x, const float *y, size_t count) {
#pragma omp simd
  for (size_t i = 0; i < count; i++) x[i] = x[i] + y[i];
}

// y [m, n] = a linear layer of either form applied to x [m, k].
static int either_product(const dc_qlinear *q, const dc_packed_linear *f, const float *x, int m, activations *a,
                          float *y) {
  if (q->parts) return product(q, x, m, a, y);
  dc_linear_ab64a(x, f->weight, f->bias, y, m, f->n, f->k);
  return 0;
}

// y [m, hidden] = the mixture of experts on h [m, hidden], in the module path's order: routed experts
// summed into zeros, then + sigmoid(gate) * shared expert. gate_up/act: [m, 2 * shared_width] and
// [m, shared_width] of scratch. Returns 0, -1 (a kernel refused a weight), -2 (no memory).
static int moe_mlp(const dc_moe_block *b, const float *h, int m, int hidden, activations *a, float *gate_up,
                   float *act, float *y) {
  size_t choices = (size_t)m * b->top_k;
  float *scratch = malloc(sizeof(float) * ((size_t)m * b->experts + choices + 2 * (size_t)m * hidden + m));
  int64_t *chosen = malloc(sizeof(int64_t) * (choices + 1));
  if (!scratch || !chosen) {
    free(scratch), free(chosen);
    return -2;
  }
  float *logits = scratch, *weights = logits + (size_t)m * b->experts, *shared = weights + choices;
  float *gate = shared + (size_t)m * hidden;
  int status = either_product(&b->router, &b->router_f32, h, m, a, logits);
  if (!status) status = dc_moe_route(logits, m, b->experts, b->top_k, b->norm_topk, weights, chosen);
  if (!status) {
    memset(y, 0, sizeof(float) * m * hidden);
    status = dc_moe_gguf_routed(m, b->top_k, b->experts, weights, chosen, h, hidden, b->width, b->types,
                                b->row_bytes, b->k_full, b->k0, b->gate, b->up, b->down, y);
  }
  if (!status && b->shared_width) {
    status = either_product(&b->shared_gate, &b->shared_gate_f32, h, m, a, gate);
    if (!status) status = product(&b->shared_gate_up, h, m, a, gate_up);
    if (!status) {
      dc_silu_and_mul(gate_up, act, m, b->shared_width);
      status = product(&b->shared_down, act, m, a, shared);
    }
    if (!status) {
      dc_sigmoid(gate, gate, m);
      for (int t = 0; t < m; t++)
        for (int c = 0; c < hidden; c++) {
          size_t i = (size_t)t * hidden + c;
          y[i] = y[i] + gate[t] * shared[i];
        }
    }
  }
  free(scratch), free(chosen);
  return status;
}

// x [m, hidden]: the embeddings in, the last layer's output out (before the final norm).
// slots [m]: each token's KV cache slot; cos/sin [m, head_dim / 2]: its rotary rows; tables [m,
// width], lens [m]: the sequences' block tables and lengths (the new token included).
// s->intermediate: the widest dense MLP or shared expert (0: none).
// Returns 0; -1 for a kernel's refusal (a type or shape it lacks); -2 when scratch memory ran out.
int dc_gguf_decode_layers(const dc_decoder_layer *layers, const dc_decoder_shape *s, float *x, int m,
                          const int64_t *slots, const float *cos, const float *sin, const int64_t *tables,
                          const int64_t *lens, int width) {
  int hidden = s->hidden, d = s->head_dim, q_size = s->heads * d, kv_size = s->kv_heads * d;
  int qkv_width = q_size + 2 * kv_size, inter = s->intermediate;
  int k_max = hidden > inter ? hidden : inter;
  k_max = k_max > q_size ? k_max : q_size;
  size_t floats = (size_t)m * (hidden + qkv_width + q_size + q_size + 2 * inter + inter + hidden) +
                  (size_t)m * (k_max / 32 + k_max / 16);
  float *buf = malloc(floats * sizeof(float) + (size_t)m * k_max + 64);
  if (!buf) return -2;
  float *h = buf, *qkv = h + (size_t)m * hidden, *q = qkv + (size_t)m * qkv_width, *att = q + (size_t)m * q_size;
  float *gate_up = att + (size_t)m * q_size, *act = gate_up + (size_t)m * 2 * inter, *y = act + (size_t)m * inter;
  activations a;
  a.xd = y + (size_t)m * hidden;
  a.xs = a.xd + (size_t)m * (k_max / 32);
  a.xq = (int8_t *)(a.xs + (size_t)m * (k_max / 16));
  int status = 0;
  for (int li = 0; li < s->layers && !status; li++) {
    const dc_decoder_layer *L = &layers[li];
    // attention block
    dc_rms_norm(x, L->input_norm, h, m, hidden, s->eps);
    if (product(&L->qkv, h, m, &a, qkv)) { status = -1; break; }
    if (L->q_norm)
      for (int i = 0; i < m; i++) {
        dc_rms_norm(qkv + (size_t)i * qkv_width, L->q_norm, qkv + (size_t)i * qkv_width, s->heads, d, s->eps);
        dc_rms_norm(qkv + (size_t)i * qkv_width + q_size, L->k_norm, qkv + (size_t)i * qkv_width + q_size,
                    s->kv_heads, d, s->eps);
      }
    dc_rope_neox(qkv, m, s->heads, d, qkv_width, cos, sin);
    dc_rope_neox(qkv + q_size, m, s->kv_heads, d, qkv_width, cos, sin);
    for (int i = 0; i < m; i++) {
      const float *row = qkv + (size_t)i * qkv_width;
      memcpy(L->k_cache + (size_t)slots[i] * kv_size, row + q_size, sizeof(float) * kv_size);
      memcpy(L->v_cache + (size_t)slots[i] * kv_size, row + q_size + kv_size, sizeof(float) * kv_size);
      memcpy(q + (size_t)i * q_size, row, sizeof(float) * q_size);
    }
    if (dc_paged_decode_attention(q, L->k_cache, L->v_cache, tables, lens, att, m, s->heads, s->kv_heads, d, width,
                                  s->block_size, s->scale, 0)) { status = -2; break; }
    if (product(&L->o, att, m, &a, y)) { status = -1; break; }
    add_into(x, y, (size_t)m * hidden);
    // MLP block
    dc_rms_norm(x, L->post_norm, h, m, hidden, s->eps);
    if (L->moe) {
      int st = moe_mlp(L->moe, h, m, hidden, &a, gate_up, act, y);
      if (st) { status = st; break; }
      add_into(x, y, (size_t)m * hidden);
      continue;
    }
    if (product(&L->gate_up, h, m, &a, gate_up)) { status = -1; break; }
    dc_silu_and_mul(gate_up, act, m, inter);
    if (product(&L->down, act, m, &a, y)) { status = -1; break; }
    add_into(x, y, (size_t)m * hidden);
  }
  free(buf);
  return status;
}
