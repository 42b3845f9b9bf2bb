// The routed experts of one mixture-of-experts layer over GGUF blocks, in one call a step.
// Built with the other kernels into one library by dashchat/engine/cpu/kernels.py.
//
// The step's (token, expert) pairs come grouped by expert. In one OpenMP region:
//   1. each used expert's token rows are gathered and quantized once (as its gate/up product reads them),
//   2. gate and up products with SiLU(gate) * up, one task per (expert, chunk of its rows),
//   3. each expert's activations quantized once (as its down product reads them),
//   4. down products, one task per (expert, chunk of its output rows),
//   5. out[token] += weight * expert output, each thread over its own columns (no atomics), the
//      experts in id order for a token as the per-expert loop in Python added them.
// An expert's weights are read once a step for all of its tokens, and the (expert, chunk) tasks keep
// every thread streaming weights even when one token reads 8 experts. The products themselves are
// gguf_kernels.c's exported entry points called on a slice of rows: inside this region their own
// parallel loops run on the calling thread alone (each thread sets its own team size for nested
// regions to one: torch's runtime has nesting on).
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int dc_gguf_activation_span(int parts, const int *types, const int *k0, int k);
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs, int span);
int dc_gguf_matmul_parts(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                         const int *rows, const float *const *bias, const int8_t *xq, const float *xd,
                         const float *xs, float *y, int m, int k, int ldy, int span);
int dc_gguf_matmul16_parts(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                           const int *rows, const float *const *bias, const float *x, float *y, int m, int k,
                           int ldy);
void dc_silu_and_mul(const float *gate_up, float *out, int rows, int cols);

enum { T_F16 = 1, T_BF16 = 30 };

static int float16_type(int type) { return type == T_F16 || type == T_BF16; }

// The int8 activations of `rows` rows `k` wide as dc_gguf_quantize_x writes them, one expert's run of
// rows at a time (its rows start at row `first`).
typedef struct {
  int8_t *q;
  float *d, *s;
} Acts;

static int acts_alloc(Acts *a, size_t rows, int k) {
  a->q = malloc(rows * k + 64);
  a->d = malloc(sizeof(float) * (rows * k / 32 + 16));
  a->s = malloc(sizeof(float) * (rows * k / 16 + 16));
  return a->q && a->d && a->s;
}

static void acts_free(Acts *a) {
  free(a->q), free(a->d), free(a->s);
}

// y[:, 0:rows] = x . W[row0 : row0 + rows]^T for one expert's weight of one type.
static int project(int type, const uint8_t *w, size_t row_bytes, int k_full, int k0, int row0, int rows,
                   const float *x, const Acts *a, size_t first, int span, float *y, int m, int k, int ldy) {
  const uint8_t *wp[1] = {w + (size_t)row0 * row_bytes};
  int t[1] = {type}, kf[1] = {k_full}, ks[1] = {k0}, r[1] = {rows};
  if (float16_type(type)) return dc_gguf_matmul16_parts(1, t, wp, kf, ks, r, NULL, x, y, m, k, ldy);
  return dc_gguf_matmul_parts(1, t, wp, kf, ks, r, NULL, a->q + first * k, a->d + first * k / 32,
                              a->s + first * k / 16, y, m, k, ldy, span);
}

// The router's choice for m tokens: softmax over each row's n logits (float32, in index order), the k
// largest probabilities in descending order (a tie: the lower expert id first), divided by their sum
// (taken in that order) where `norm` is set. The module path (SparseMoE.route on the CPU kernels) and
// the fused decode step both route here, so they pick the same experts with the same weights.
// Returns 0, -2 (no memory).
int dc_moe_route(const float *logits, int m, int n, int k, int norm, float *weights, int64_t *chosen) {
  float *p = malloc(sizeof(float) * (n > 0 ? n : 1));
  if (!p) return -2;
  for (int t = 0; t < m; t++) {
    const float *l = logits + (size_t)t * n;
    float *w = weights + (size_t)t * k;
    int64_t *c = chosen + (size_t)t * k;
    float max = l[0], sum = 0.f;
    for (int j = 1; j < n; j++) max = l[j] > max ? l[j] : max;
    for (int j = 0; j < n; j++) sum += p[j] = expf(l[j] - max);
    for (int j = 0; j < n; j++) p[j] = p[j] / sum;
    for (int s = 0; s < k; s++) {
      int best = -1;
      for (int j = 0; j < n; j++)  // a probability is >= 0: -1 marks an expert already chosen
        if (p[j] != -1.f && (best < 0 || p[j] > p[best])) best = j;
      w[s] = p[best], c[s] = best, p[best] = -1.f;
    }
    if (norm) {
      float total = 0.f;
      for (int s = 0; s < k; s++) total += w[s];
      for (int s = 0; s < k; s++) w[s] = w[s] / total;
    }
  }
  free(p);
  return 0;
}

// Qwen2-MoE's shared-expert gate, 1 / (1 + e^-x), on the module path and in the fused step alike.
void dc_sigmoid(const float *x, float *out, int count) {
  for (int i = 0; i < count; i++) out[i] = 1.f / (1.f + expf(-x[i]));
}

static int round_up(int v, int to) { return (v + to - 1) / to * to; }

// Rows per task so that `used` experts give each thread about four tasks (whole rows of 16).
static int chunk_rows(int rows, int used, int threads) {
  int chunks = used >= 4 * threads ? 1 : (4 * threads + used - 1) / used;
  int n = round_up((rows + chunks - 1) / chunks, 16);
  return n < rows ? n : rows;
}

// out[tokens, hidden] += sum over pairs p of pair_weights[p] * expert(x[pair_tokens[p]]) for the
// `used` experts experts[j], whose pairs are offsets[j] .. offsets[j + 1]. Projection i (0 gate, 1 up,
// 2 down) of expert e: weight rows at w[i][e], types[i], row_bytes[i] bytes a row of k_full[i] values
// whose inputs [k0[i], k0[i] + k) are read (a tensor-parallel rank's slice). gate/up: `width` rows of
// `hidden` inputs; down: `hidden` rows of `width` inputs. Returns 0, -1 (a kernel refused a weight),
// -2 (no memory).
int dc_moe_gguf(int used, const int *experts, const int *offsets, const int64_t *pair_tokens,
                const float *pair_weights, const float *x, int hidden, int width, const int *types,
                const int64_t *row_bytes, const int *k_full, const int *k0, const uint8_t *const *gate_w,
                const uint8_t *const *up_w, const uint8_t *const *down_w, float *out) {
  if (used <= 0) return 0;
  size_t pairs = (size_t)offsets[used];
  int f16_in = float16_type(types[0]), f16_down = float16_type(types[2]);
  if (f16_in != float16_type(types[1])) return -1;  // gate and up share their input's form
  int span_in = f16_in ? 32 : dc_gguf_activation_span(2, types, k0, hidden);
  int span_down = f16_down ? 32 : dc_gguf_activation_span(1, types + 2, k0 + 2, width);
  float *xg = malloc(sizeof(float) * pairs * hidden);
  float *h = malloc(sizeof(float) * pairs * 2 * width);
  float *act = malloc(sizeof(float) * pairs * width);
  float *y = malloc(sizeof(float) * pairs * hidden);
  Acts ain = {0}, adown = {0};
  int ok = xg && h && act && y && (f16_in || acts_alloc(&ain, pairs, hidden)) &&
           (f16_down || acts_alloc(&adown, pairs, width));
  int status = ok ? 0 : -2;
  int threads = omp_get_max_threads();
  int cw = chunk_rows(width, used, threads), cd = chunk_rows(hidden, used, threads);
  int nw = (width + cw - 1) / cw, nd = (hidden + cd - 1) / cd;
#pragma omp parallel if (ok && threads > 1)
  {
    // The products' own parallel loops run on this thread: torch's OpenMP runtime allows nested
    // teams, which would start a team per product here. This sets only this implicit task's value.
    omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
    for (int j = 0; j < used; j++) {
      if (!ok) continue;
      int first = offsets[j], m = offsets[j + 1] - first;
      for (int p = first; p < first + m; p++)
        memcpy(xg + (size_t)p * hidden, x + (size_t)pair_tokens[p] * hidden, sizeof(float) * hidden);
      if (!f16_in)
        dc_gguf_quantize_x(xg + (size_t)first * hidden, m, hidden, ain.q + (size_t)first * hidden,
                           ain.d + (size_t)first * hidden / 32, ain.s + (size_t)first * hidden / 16, span_in);
    }
    // gate and up of rows [r0, r0 + n) side by side in h (the layout dc_silu_and_mul reads)
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < used * nw; task++) {
      if (!ok) continue;
      int j = task / nw, r0 = task % nw * cw, n = width - r0 < cw ? width - r0 : cw;
      int e = experts[j], first = offsets[j], m = offsets[j + 1] - first;
      float *hj = h + (size_t)first * 2 * width + 2 * r0;
      const float *xj = xg + (size_t)first * hidden;
      int s = project(types[0], gate_w[e], row_bytes[0], k_full[0], k0[0], r0, n, xj, &ain, first, span_in, hj,
                      m, hidden, 2 * width);
      if (!s)
        s = project(types[1], up_w[e], row_bytes[1], k_full[1], k0[1], r0, n, xj, &ain, first, span_in, hj + n, m,
                    hidden, 2 * width);
      if (s) {
#pragma omp atomic write
        status = s;
        continue;
      }
      for (int r = 0; r < m; r++)
        dc_silu_and_mul(hj + (size_t)r * 2 * width, act + (size_t)(first + r) * width + r0, 1, n);
    }
#pragma omp for schedule(dynamic, 1)
    for (int j = 0; j < used; j++) {
      if (!ok || f16_down) continue;
      int first = offsets[j], m = offsets[j + 1] - first;
      dc_gguf_quantize_x(act + (size_t)first * width, m, width, adown.q + (size_t)first * width,
                         adown.d + (size_t)first * width / 32, adown.s + (size_t)first * width / 16, span_down);
    }
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < used * nd; task++) {
      if (!ok) continue;
      int j = task / nd, r0 = task % nd * cd, n = hidden - r0 < cd ? hidden - r0 : cd;
      int e = experts[j], first = offsets[j], m = offsets[j + 1] - first;
      int s = project(types[2], down_w[e], row_bytes[2], k_full[2], k0[2], r0, n, act + (size_t)first * width,
                      &adown, first, span_down, y + (size_t)first * hidden + r0, m, width, hidden);
      if (s) {
#pragma omp atomic write
        status = s;
      }
    }
#pragma omp for schedule(static)
    for (int c0 = 0; c0 < hidden; c0 += 64) {
      if (!ok) continue;
      int c1 = hidden - c0 < 64 ? hidden : c0 + 64;
      for (size_t p = 0; p < pairs; p++) {
        float *o = out + (size_t)pair_tokens[p] * hidden;
        const float *yp = y + p * hidden, wp = pair_weights[p];
        for (int c = c0; c < c1; c++) o[c] += wp * yp[c];
      }
    }
  }
  free(xg), free(h), free(act), free(y);
  if (!f16_in) acts_free(&ain);
  if (!f16_down) acts_free(&adown);
  return status;
}

// dc_moe_gguf for routed tokens: token t's k choices chosen[t * k + s] (expert ids < n_experts) with
// weights[t * k + s], turned into (token, expert) pairs grouped by expert -- the experts in id order, an
// expert's pairs in token order (a stable sort of the choices by expert) -- then run. out += as there.
int dc_moe_gguf_routed(int m, int k, int n_experts, const float *weights, const int64_t *chosen, const float *x,
                       int hidden, int width, const int *types, const int64_t *row_bytes, const int *k_full,
                       const int *k0, const uint8_t *const *gate_w, const uint8_t *const *up_w,
                       const uint8_t *const *down_w, float *out) {
  size_t pairs = (size_t)m * k;
  int *count = calloc(n_experts + 1, sizeof(int)), *experts = malloc(sizeof(int) * (n_experts + 1));
  int *offsets = malloc(sizeof(int) * (n_experts + 2));
  int64_t *pair_tokens = malloc(sizeof(int64_t) * (pairs + 1));
  float *pair_weights = malloc(sizeof(float) * (pairs + 1));
  int status = count && experts && offsets && pair_tokens && pair_weights ? 0 : -2;
  if (!status) {
    for (size_t p = 0; p < pairs; p++) {
      if (chosen[p] < 0 || chosen[p] >= n_experts) { status = -1; break; }
      count[chosen[p]]++;
    }
  }
  if (!status) {
    int used = 0;
    offsets[0] = 0;
    for (int e = 0; e < n_experts; e++)
      if (count[e]) {
        experts[used] = e;
        offsets[used + 1] = offsets[used] + count[e];
        count[e] = offsets[used];  // from here: the next free pair of expert e
        used++;
      }
    for (size_t p = 0; p < pairs; p++) {
      int at = count[chosen[p]]++;
      pair_tokens[at] = (int64_t)(p / k), pair_weights[at] = weights[p];
    }
    status = dc_moe_gguf(used, experts, offsets, pair_tokens, pair_weights, x, hidden, width, types, row_bytes,
                         k_full, k0, gate_w, up_w, down_w, out);
  }
  free(count), free(experts), free(offsets), free(pair_tokens), free(pair_weights);
  return status;
}
