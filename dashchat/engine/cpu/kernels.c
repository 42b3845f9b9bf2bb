// dashchat's float32 CPU kernels for decode steps, built at first use by dashchat/engine/cpu/kernels.py
// with -march=native; OpenMP is the runtime torch already loaded.
//
// 1. Small-batch linear layers: y[m, n] = x[m, k] . W^T (+ bias), for m up to ~16.
//
// W is read where oneDNN already keeps it: its pre-packed blocked layout "Ab64a", panels of 64
// output rows stored k-major (P[ceil(n/64)][k][64]). Each thread streams whole panels front to
// back, the access pattern that reaches this machine's memory bandwidth; oneDNN's own kernels
// read the same bytes at about half of it at these batch sizes.
//
// 2. Decode attention straight from the paged KV cache (PyTorch had to gather each sequence's
//    keys and values into a fresh tensor first, per layer and step).
//
// 3. RMSNorm, SwiGLU's silu(gate) * up and rotary embedding, one pass each.
//
// Vectors are GCC vector extensions: AVX-512 here, split into halves on narrower machines.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

#define PANEL 64
#if defined(__AVX512F__)
#define MAX_ROWS 6 /* 6 rows x 4 vectors = 24 of the 32 vector registers for accumulators */
#else
#define MAX_ROWS 1
#endif

static inline v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

// One panel (64 output columns starting at col0) for `rows` rows of x.
#define TILE(ROWS)                                                                          \
  static void tile_##ROWS(const float *x, int k, const float *w, const float *bias, float *y, \
                          int n, int col0) {                                                \
    v16 acc[ROWS][4];                                                                       \
    for (int r = 0; r < ROWS; r++)                                                          \
      for (int j = 0; j < 4; j++) acc[r][j] = (v16){0};                                     \
    for (int kk = 0; kk < k; kk++) {                                                        \
      const float *wr = w + (size_t)kk * PANEL;                                             \
      v16 w0 = load16(wr), w1 = load16(wr + 16), w2 = load16(wr + 32), w3 = load16(wr + 48); \
      for (int r = 0; r < ROWS; r++) {                                                      \
        float xv = x[(size_t)r * k + kk];                                                   \
        acc[r][0] += xv * w0;                                                               \
        acc[r][1] += xv * w1;                                                               \
        acc[r][2] += xv * w2;                                                               \
        acc[r][3] += xv * w3;                                                               \
      }                                                                                     \
    }                                                                                       \
    if (col0 + PANEL <= n) {                                                                \
      for (int r = 0; r < ROWS; r++)                                                        \
        for (int j = 0; j < 4; j++) {                                                       \
          v16 b = bias ? load16(bias + col0 + 16 * j) : (v16){0};                           \
          store16(y + (size_t)r * n + col0 + 16 * j, acc[r][j] + b);                        \
        }                                                                                   \
    } else { /* the last, partial panel: oneDNN pads it with zeros, stores stop at n */    \
      for (int r = 0; r < ROWS; r++) {                                                      \
        float t[PANEL];                                                                     \
        for (int j = 0; j < 4; j++) store16(t + 16 * j, acc[r][j]);                         \
        for (int c = 0; col0 + c < n; c++)                                                  \
          y[(size_t)r * n + col0 + c] = t[c] + (bias ? bias[col0 + c] : 0.f);               \
      }                                                                                     \
    }                                                                                       \
  }

TILE(1)
#if MAX_ROWS >= 6
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)
#endif

typedef void (*tile_fn)(const float *, int, const float *, const float *, float *, int, int);

static const tile_fn tiles[] = {
    0, tile_1,
#if MAX_ROWS >= 6
    tile_2, tile_3, tile_4, tile_5, tile_6,
#endif
};

void dc_linear_ab64a(const float *x, const float *w, const float *bias, float *y, int m, int n, int k) {
  int panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < panels; p++) {
    const float *wp = w + (size_t)p * k * PANEL;
    // rows beyond MAX_ROWS take further passes over the panel, by then in this core's cache
    for (int r0 = 0; r0 < m; r0 += MAX_ROWS) {
      int rows = m - r0 < MAX_ROWS ? m - r0 : MAX_ROWS;
      tiles[rows](x + (size_t)r0 * k, k, wp, bias, y + (size_t)r0 * n, n, p * PANEL);
    }
  }
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum16(v16 v) {
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float dot(const float *a, const float *b, int d) {
  int c = 0;
  float tail = 0.f;
  v16 acc = (v16){0};
  for (; c + 16 <= d; c += 16) acc += load16(a + c) * load16(b + c);
  for (; c < d; c++) tail += a[c] * b[c];
  return hsum16(acc) + tail;
}

// Lane j of the result is the sum of the 16 lanes of v[j]: a transpose and add in four rounds of
// pairwise merges (15 merges) instead of 16 separate horizontal sums.
static inline v16 merge16(v16 a, v16 b, int round) {
  switch (round) {
    case 0:  // lanes: 8 partial sums of a, then 8 of b
      return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    case 1:  // 4 partials each of the four sums a and b hold
      return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    case 2:  // 2 partials each of eight sums
      return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
             __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    default:  // sixteen sums
      return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
             __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

static inline v16 sum_each16(const v16 v[16]) {
  v16 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++) a[i] = merge16(v[2 * i], v[2 * i + 1], 0);
  for (int i = 0; i < 4; i++) b[i] = merge16(a[2 * i], a[2 * i + 1], 1);
  for (int i = 0; i < 2; i++) c[i] = merge16(b[2 * i], b[2 * i + 1], 2);
  return merge16(c[0], c[1], 3);
}

// A task reads one head's row of each key (d floats of the hkv * d a slot holds): too sparse for
// the hardware prefetcher, so rows this many keys ahead are prefetched (16 measured best of 4-32;
// 2.6x faster at 2000 keys).
#define PREFETCH_KEYS 16

// Cache slot of a sequence's j-th key.
static inline size_t slot_of(const int64_t *table, int j, int block_size) {
  return (size_t)table[j / block_size] * block_size + j % block_size;
}

static inline void prefetch_row(const float *cache, const int64_t *table, int j, int block_size, int hkv,
                                int h, int d) {
  size_t slot = slot_of(table, j, block_size);
  const char *row = (const char *)(cache + (slot * hkv + h) * d);
  for (int c = 0; c < d * (int)sizeof(float); c += 64) __builtin_prefetch(row + c);
}

// e^x for x <= 0, to ~2 ulp (Cephes' exp2 polynomial); below -87 it returns ~1e-38, not 0.
// Written so that a loop over it vectorizes.
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  float t = x * 1.44269504088896341f;
  float n = rintf(t);
  float f = t - n; /* [-0.5, 0.5] */
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One query token per sequence. q [n, hq, d]; caches [slots, hkv, d] (slot = block * block_size +
// offset); tables [n, width] block ids; lens [n] keys per sequence (the new one included);
// out [n, hq * d]. Query heads h * group .. h * group + group - 1 share KV head h.
// Returns 0, or -1 when scratch memory ran out (out is then incomplete).
int dc_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                              const int64_t *tables, const int64_t *lens, float *out, int n, int hq,
                              int hkv, int d, int width, int block_size, float scale, int window) {
  int group = hq / hkv, failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int i = 0; i < n; i++) {
    for (int h = 0; h < hkv; h++) {
      // a sliding-window layer (window > 0) sees only the last `window` keys: [first, len)
      int len = (int)lens[i], first = window > 0 && len > window ? len - window : 0, nk = len - first;
      const int64_t *table = tables + (size_t)i * width;
      float *probs = malloc(sizeof(float) * (size_t)group * (nk > 0 ? nk : 1));
      if (!probs) {
#pragma omp atomic write
        failed = 1;
        continue;
      }
      const float *qh = q + ((size_t)i * hq + (size_t)h * group) * d;
      float *oh = out + ((size_t)i * hq + (size_t)h * group) * d;
      for (int j0 = 0; j0 < nk; j0 += 16) {  // scores of 16 keys at a time
        int keys = nk - j0 < 16 ? nk - j0 : 16;
        const float *rows[16];
        for (int jj = 0; jj < keys; jj++) {
          int j = first + j0 + jj;
          size_t slot = slot_of(table, j, block_size);
          rows[jj] = k_cache + (slot * hkv + h) * d;
          if (j + PREFETCH_KEYS < len) prefetch_row(k_cache, table, j + PREFETCH_KEYS, block_size, hkv, h, d);
        }
        for (int g = 0; g < group; g++) {
          const float *qg = qh + (size_t)g * d;
          float *pg = probs + (size_t)g * nk + j0;
          if (d % 16 == 0) {
            v16 partial[16];
            for (int jj = 0; jj < 16; jj++) partial[jj] = (v16){0};
            for (int c = 0; c < d; c += 16) {
              v16 qc = load16(qg + c);
              for (int jj = 0; jj < keys; jj++) partial[jj] += qc * load16(rows[jj] + c);
            }
            float sums[16];
            store16(sums, sum_each16(partial) * scale);
            memcpy(pg, sums, sizeof(float) * keys);
          } else {
            for (int jj = 0; jj < keys; jj++) pg[jj] = dot(qg, rows[jj], d) * scale;
          }
        }
      }
      for (int g = 0; g < group; g++) {
        float *pg = probs + (size_t)g * nk, top = -INFINITY, sum = 0.f;
        for (int j = 0; j < nk; j++) top = pg[j] > top ? pg[j] : top;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < nk; j++) {
          pg[j] = exp_nonpositive(pg[j] - top);
          sum += pg[j];
        }
        float inv = 1.f / sum;
#pragma omp simd
        for (int j = 0; j < nk; j++) pg[j] *= inv;
        memset(oh + (size_t)g * d, 0, sizeof(float) * d);
      }
      for (int j = first; j < len; j++) {
        size_t slot = slot_of(table, j, block_size);
        const float *vr = v_cache + (slot * hkv + h) * d;
        if (j + PREFETCH_KEYS < len) prefetch_row(v_cache, table, j + PREFETCH_KEYS, block_size, hkv, h, d);
        for (int g = 0; g < group; g++) {
          float p = probs[(size_t)g * nk + j - first], *og = oh + (size_t)g * d;
#pragma omp simd
          for (int c = 0; c < d; c++) og[c] += p * vr[c];
        }
      }
      free(probs);
    }
  }
  return failed ? -1 : 0;
}

// 3. Row-wise elementwise work of a decode step, one pass each (PyTorch's float32 rms_norm runs
//    as five ops, SwiGLU's silu-times-up as three).

// Parallel only when big enough to pay for waking the team (prefill sizes).
#define PARALLEL_MIN_ELEMENTS (1 << 16)

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight
void dc_rms_norm(const float *x, const float *weight, float *out, int rows, int cols, float eps) {
#pragma omp parallel for if ((size_t)rows * cols >= PARALLEL_MIN_ELEMENTS)
  for (int r = 0; r < rows; r++) {
    const float *xr = x + (size_t)r * cols;
    float *outr = out + (size_t)r * cols, sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < cols; c++) sum += xr[c] * xr[c];
    float inv = 1.f / sqrtf(sum / cols + eps);
#pragma omp simd
    for (int c = 0; c < cols; c++) outr[c] = xr[c] * inv * weight[c];
  }
}

// out[r, c] = silu(gate_up[r, c]) * gate_up[r, cols + c]
void dc_silu_and_mul(const float *gate_up, float *out, int rows, int cols) {
#pragma omp parallel for if ((size_t)rows * cols >= PARALLEL_MIN_ELEMENTS)
  for (int r = 0; r < rows; r++) {
    const float *gate = gate_up + (size_t)r * 2 * cols, *up = gate + cols;
    float *outr = out + (size_t)r * cols;
#pragma omp simd
    for (int c = 0; c < cols; c++) {
      float g = gate[c], e = exp_nonpositive(g < 0.f ? g : -g); /* e^-|g|, never overflows */
      float sigmoid = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
      outr[c] = g * sigmoid * up[c];
    }
  }
}

// Rotary embedding, rotate-half ("neox") form, in place: for each row i and head h of x (head h of
// row i at x + i * row_stride + h * d), the halves (a, b) become (a cos - b sin, b cos + a sin)
// with row i's cos/sin (cos, sin: [rows, d / 2]).
void dc_rope_neox(float *x, int rows, int heads, int d, int64_t row_stride, const float *cos,
                  const float *sin) {
  int half = d / 2;
#pragma omp parallel for if ((size_t)rows * heads * d >= PARALLEL_MIN_ELEMENTS)
  for (int i = 0; i < rows; i++) {
    const float *c = cos + (size_t)i * half, *s = sin + (size_t)i * half;
    for (int h = 0; h < heads; h++) {
      float *a = x + (size_t)i * row_stride + (size_t)h * d, *b = a + half;
#pragma omp simd
      for (int j = 0; j < half; j++) {
        float a0 = a[j], b0 = b[j];
        a[j] = a0 * c[j] - b0 * s[j];
        b[j] = b0 * c[j] + a0 * s[j];
      }
    }
  }
}
