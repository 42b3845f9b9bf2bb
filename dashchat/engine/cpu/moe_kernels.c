// The routed experts of one mixture-of-experts layer over GGUF blocks, in one call a step.
// Built with the other kernels into one library by dashchat/engine/cpu/kernels.py.
//
// The step's (token, expert) pairs come grouped by expert. Each token row is quantized once (every
// expert's gate/up product reads the same int8 row), then one OpenMP region runs one work list:
//   1. gate and up of (expert, chunk of its rows) in one product call, SiLU(gate) * up; the chunk that
//      completes an expert quantizes that expert's activations (as its down product reads them),
//   2. down products of (expert, chunk of its output rows), each waiting only for its own expert,
// taken in list order by whichever thread is free (an atomic counter), so no thread waits at a
// barrier between the phases: one barrier after the list, then
//   3. out[token] += weight * expert output, each thread over its own columns (no atomics), the
//      experts in id order for a token as the per-expert loop in Python added them.
// An expert's weights are read once a step for all of its tokens, and the (expert, chunk) tasks keep
// every thread streaming weights even when one token reads 8 experts. The products themselves are
// gguf_kernels.c's exported entry points called on a slice of rows: inside this region their own
// parallel loops run on the calling thread alone (each thread sets its own team size for nested
// regions to one: torch's runtime has nesting on). Their results do not depend on the batch, so an
// expert's rows may be split between calls (see rows_product) without changing a bit.
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

// Rows `k` wide as a product reads them: float32 (16-bit weights' products) or the int8 values,
// scales and half sums dc_gguf_quantize_x writes (row r at q + r * k, d + r * (k / span), the int16
// half sums at (int16_t *)s + r * (k / 16)).
typedef struct {
  const float *x;
  int8_t *q;
  float *d, *s;
  int k, span;  // span: the one dc_gguf_quantize_x took (32 or 256)
} Rows;

static int rows_alloc(Rows *a, size_t rows, int k, int span, int f16) {
  memset(a, 0, sizeof *a);
  a->k = k, a->span = span == 256 && k % 256 == 0 ? 256 : 32;
  if (f16) return (a->x = malloc(sizeof(float) * (rows * k + 16))) != NULL;
  a->q = malloc(rows * k + 64);
  a->d = malloc(sizeof(float) * (rows * k / 32 + 16));
  a->s = malloc(sizeof(float) * (rows * k / 32 + 16));
  return a->q && a->d && a->s;
}

static void rows_free(Rows *a) {
  free((void *)a->x), free(a->q), free(a->d), free(a->s);
}

// The view of rows [r, ...) of a.
static Rows rows_at(const Rows *a, size_t r) {
  Rows v = *a;
  if (a->x) v.x = a->x + r * a->k;
  if (a->q) v.q = a->q + r * a->k, v.d = a->d + r * (a->k / a->span), v.s = a->s + r * (a->k / 32);
  return v;
}

// Row `from` of a copied to row `to` of b (same k and span).
static void row_copy(const Rows *a, size_t from, Rows *b, size_t to) {
  int k = a->k;
  if (a->x) {
    memcpy((float *)b->x + to * k, a->x + from * k, sizeof(float) * k);
    return;
  }
  memcpy(b->q + to * k, a->q + from * k, k);
  memcpy(b->d + to * (k / a->span), a->d + from * (k / a->span), sizeof(float) * (k / a->span));
  memcpy(b->s + to * (k / 32), a->s + from * (k / 32), sizeof(float) * (k / 32));
}

// y[0:m, 0:sum(rows)] = x . W^T for one expert's parts (gate and up: two; down: one), each part's weight
// rows at w[i], whose inputs [k0[i], k0[i] + x.k) of k_full[i] are read.
static int product(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                   const int *rows, const Rows *x, int m, float *y, int ldy) {
  if (x->x) return dc_gguf_matmul16_parts(parts, types, w, k_full, k0, rows, NULL, x->x, y, m, x->k, ldy);
  return dc_gguf_matmul_parts(parts, types, w, k_full, k0, rows, NULL, x->q, x->d, x->s, y, m, x->k, ldy, x->span);
}

// product() over m rows, split where that saves work: the kernels take 5+ rows in blocks of 8, a
// partial block costing a whole one, so a remainder of 1-4 rows past whole blocks runs as its own
// call (their per-row tiles; the weight rows come again from cache).
static int rows_product(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                        const int *rows, const Rows *x, int m, float *y, int ldy) {
  int tail = m % 8, whole = m - tail;
  if (x->x || whole == 0 || tail == 0 || tail > 4) return product(parts, types, w, k_full, k0, rows, x, m, y, ldy);
  int s = product(parts, types, w, k_full, k0, rows, x, whole, y, ldy);
  Rows rest = rows_at(x, whole);
  return s ? s : product(parts, types, w, k_full, k0, rows, &rest, tail, y + (size_t)whole * ldy, ldy);
}

static void spin_pause(unsigned *spins) {
  if (++*spins % 4096 == 0) {
    sched_yield();  // the thread being waited for may need this core
    return;
  }
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
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

// Rows per task of a projection with `rows` output rows so that `used` experts give each thread about
// eight tasks (whole rows of 16, at least 64 rows a task). Every chunk so starts on a multiple of 8
// rows: an expert's rows interleaved in groups of 8 (ROWS8_LAYOUT) are then whole groups in each
// chunk, at the byte offset the same rows have in the file's layout (a group is 8 rows' bytes).
static int chunk_rows(int rows, int used, int threads) {
  int chunks = threads < 2 || used >= 8 * threads ? 1 : (8 * threads + used - 1) / used;
  int n = round_up((rows + chunks - 1) / chunks, 16);
  n = n < 64 ? 64 : n;
  return n < rows ? n : rows;
}

// out[tokens, hidden] += sum over pairs p of pair_weights[p] * expert(x[pair_tokens[p]]) for the
// `used` experts experts[j], whose pairs are offsets[j] .. offsets[j + 1]; x has `tokens` rows.
// Projection i (0 gate, 1 up, 2 down) of expert e: weight rows at w[i][e], types[i], row_bytes[i] bytes
// a row of k_full[i] values whose inputs [k0[i], k0[i] + k) are read (a tensor-parallel rank's slice).
// gate/up: `width` rows of `hidden` inputs; down: `hidden` rows of `width` inputs. Returns 0, -1 (a
// kernel refused a weight), -2 (no memory).
static int moe_gguf(int used, const int *experts, const int *offsets, const int64_t *pair_tokens,
                    const float *pair_weights, const float *x, int tokens, int hidden, int width, const int *types,
                    const int64_t *row_bytes, const int *k_full, const int *k0, const uint8_t *const *gate_w,
                    const uint8_t *const *up_w, const uint8_t *const *down_w, float *out) {
  if (used <= 0) return 0;
  size_t pairs = (size_t)offsets[used];
  int f16_in = float16_type(types[0]), f16_down = float16_type(types[2]);
  if (f16_in != float16_type(types[1])) return -1;  // gate and up share their input's form
  int span_in = f16_in ? 32 : dc_gguf_activation_span(2, types, k0, hidden);
  int span_down = f16_down ? 32 : dc_gguf_activation_span(1, types + 2, k0 + 2, width);
  int max_rows = 0;
  for (int j = 0; j < used; j++) max_rows = offsets[j + 1] - offsets[j] > max_rows ? offsets[j + 1] - offsets[j] : max_rows;
  int threads = omp_get_max_threads();
  int cw = chunk_rows(width, used, threads), cd = chunk_rows(hidden, used, threads);
  int nw = (width + cw - 1) / cw, nd = (hidden + cd - 1) / cd, tasks = used * (nw + nd);
  Rows xin, down_in;  // the tokens' rows as the gate/up products read them; each pair's activations
  float *h = malloc(sizeof(float) * pairs * 2 * width), *act = malloc(sizeof(float) * pairs * width);
  float *y = malloc(sizeof(float) * pairs * hidden);
  atomic_int *pending = malloc(sizeof(atomic_int) * used), *ready = malloc(sizeof(atomic_int) * used);
  int ok = rows_alloc(&xin, f16_in ? 0 : tokens, hidden, span_in, f16_in) &&
           rows_alloc(&down_in, pairs, width, span_down, f16_down) && h && act && y && pending && ready;
  if (ok && f16_in) {
    free((void *)xin.x);
    xin.x = x;  // read in place
  } else if (ok) {
    dc_gguf_quantize_x(x, tokens, hidden, xin.q, xin.d, xin.s, span_in);
  }
  if (ok && f16_down) {
    free((void *)down_in.x);
    down_in.x = act;
  }
  for (int j = 0; ok && j < used; j++) atomic_init(&pending[j], nw), atomic_init(&ready[j], 0);
  atomic_int next, status;
  atomic_init(&next, 0), atomic_init(&status, ok ? 0 : -2);
  const int gu_types[2] = {types[0], types[1]}, gu_k_full[2] = {k_full[0], k_full[1]}, gu_k0[2] = {k0[0], k0[1]};
#pragma omp parallel if (ok && threads > 1)
  {
    // The products' own parallel loops run on this thread: torch's OpenMP runtime allows nested
    // teams, which would start a team per product here. This sets only this implicit task's value.
    omp_set_num_threads(1);
    Rows gathered;  // an expert's token rows where they are not consecutive in xin
    int have = ok && rows_alloc(&gathered, max_rows, hidden, span_in, f16_in);
    if (!have) atomic_store(&status, -2);
    for (int task; have && (task = atomic_fetch_add(&next, 1)) < tasks;) {
      int gu = task < used * nw, t = gu ? task : task - used * nw;
      int j = gu ? t / nw : t / nd, e = experts[j], first = offsets[j], m = offsets[j + 1] - first;
      if (gu) {
        int r0 = t % nw * cw, n = width - r0 < cw ? width - r0 : cw;
        int consecutive = 1;
        for (int r = 1; r < m && consecutive; r++) consecutive = pair_tokens[first + r] == pair_tokens[first] + r;
        Rows xj = rows_at(&xin, pair_tokens[first]);
        if (!consecutive) {
          for (int r = 0; r < m; r++) row_copy(&xin, pair_tokens[first + r], &gathered, r);
          xj = gathered;
        }
        // gate and up rows [r0, r0 + n) side by side in h (the layout dc_silu_and_mul reads)
        float *hj = h + (size_t)first * 2 * width + 2 * r0;
        const uint8_t *w[2] = {gate_w[e] + (size_t)r0 * row_bytes[0], up_w[e] + (size_t)r0 * row_bytes[1]};
        const int rows[2] = {n, n};
        int s = atomic_load(&status) ? 0 : rows_product(2, gu_types, w, gu_k_full, gu_k0, rows, &xj, m, hj, 2 * width);
        if (s) atomic_store(&status, s);
        for (int r = 0; !s && r < m; r++)
          dc_silu_and_mul(hj + (size_t)r * 2 * width, act + (size_t)(first + r) * width + r0, 1, n);
        if (atomic_fetch_sub(&pending[j], 1) == 1) {  // the expert's last chunk: its activations are whole
          if (!f16_down && !atomic_load(&status)) {
            Rows a = rows_at(&down_in, first);
            dc_gguf_quantize_x(act + (size_t)first * width, m, width, a.q, a.d, a.s, span_down);
          }
          atomic_store_explicit(&ready[j], 1, memory_order_release);
        }
      } else {
        int r0 = t % nd * cd, n = hidden - r0 < cd ? hidden - r0 : cd;
        // Tasks are taken in list order, so every gate/up chunk of this expert is already running.
        for (unsigned spins = 0; !atomic_load_explicit(&ready[j], memory_order_acquire);) spin_pause(&spins);
        if (atomic_load(&status)) continue;
        const uint8_t *w[1] = {down_w[e] + (size_t)r0 * row_bytes[2]};
        const int rows[1] = {n};
        Rows a = rows_at(&down_in, first);
        int s = rows_product(1, types + 2, w, k_full + 2, k0 + 2, rows, &a, m, y + (size_t)first * hidden + r0, hidden);
        if (s) atomic_store(&status, s);
      }
    }
    if (have) rows_free(&gathered);
#pragma omp barrier
    int st = atomic_load(&status);
#pragma omp for schedule(static)
    for (int c0 = 0; c0 < hidden; c0 += 64) {
      if (st) continue;
      int c1 = hidden - c0 < 64 ? hidden : c0 + 64;
      for (size_t p = 0; p < pairs; p++) {
        float *o = out + (size_t)pair_tokens[p] * hidden;
        const float *yp = y + p * hidden, wp = pair_weights[p];
        for (int c = c0; c < c1; c++) o[c] += wp * yp[c];
      }
    }
  }
  if (f16_in) xin.x = NULL;
  if (f16_down) down_in.x = NULL;
  rows_free(&xin), rows_free(&down_in);
  free(h), free(act), free(y), free(pending), free(ready);
  return atomic_load(&status);
}

// moe_gguf for routed tokens: token t's k choices chosen[t * k + s] (expert ids < n_experts) with
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
    status = moe_gguf(used, experts, offsets, pair_tokens, pair_weights, x, m, hidden, width, types, row_bytes,
                      k_full, k0, gate_w, up_w, down_w, out);
  }
  free(count), free(experts), free(offsets), free(pair_tokens), free(pair_weights);
  return status;
}
