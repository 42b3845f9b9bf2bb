// Small-batch float32 linear layers on CPU: y[m, n] = x[m, k] . W^T (+ bias), for m up to ~16.
//
// W is read where oneDNN already keeps it: its pre-packed blocked layout "Ab64a", panels of 64
// output rows stored k-major (P[ceil(n/64)][k][64]). Each thread streams whole panels front to
// back, the access pattern that reaches this machine's memory bandwidth; oneDNN's own kernels
// read the same bytes at about half of it at these batch sizes. Built at first use by
// dashchat/engine/cpu_kernels.py with -march=native; OpenMP is the one torch already loaded.
#include <stddef.h>
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

int dc_gemv_max_rows(void) { return MAX_ROWS; }

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
