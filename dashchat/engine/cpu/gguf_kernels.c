// GGUF quantized linear layers on the CPU, reading the weights' blocks as the file ships them.
// Built with kernels.c into one library by dashchat/engine/cpu/kernels.py (-march=native, torch's
// OpenMP runtime).
//
// y[m, n] = x[m, k] . W^T, W given as n rows of k/QK blocks of one GGUF type (Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1: 32 values a block; Q4_K, Q5_K, Q6_K: 256 values a super-block).
//
// As llama.cpp does, the activations are first quantized to int8 per block of 32 (one float scale
// each, plus the scaled sums of each half, which carry the weights' offsets and minimums), so the
// inner product is an integer one: every 32 weight values are unpacked into unsigned bytes and
// multiplied with the signed activation bytes by
//   - AVX-512 VNNI `vpdpbusd` on 256-bit vectors where the CPU has AVX512VL+VNNI (or AVX-VNNI),
//   - AVX2 `vpmaddubsw` + `vpmaddwd` otherwise,
//   - a plain C loop on anything else.
// The library is built with -march=native, so the choice is made by the compiler for the CPU it
// runs on (the build is keyed by /proc/cpuinfo's flags: a machine without an extension never gets
// code that uses it).
//
// Every 32-value group j of a weight row contributes
//   dx_j * (a0 * sum(q[0:16] * xq[0:16]) + a1 * sum(q[16:32] * xq[16:32])) + b0 * S0_j + b1 * S1_j
// where q are the unsigned stored values, (a0, a1) the group's scale for each half, (b0, b1) its
// offset (-8d for Q4_0, the minimum for Q4_1, -dmin*m for Q4_K, ...) and S0_j, S1_j = dx_j times the
// sum of each half of the quantized activations. Only Q6_K has different scales for the two halves.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef uint8_t u8x16 __attribute__((vector_size(16)));

static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      float f = ldexpf((float)man, -24);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline u8x16 load_u8x16(const uint8_t *p) {
  u8x16 v;
  memcpy(&v, p, 16);
  return v;
}

// Bytes i of the result: 0x10 if bit i of the 16-bit `bits` is set, else 0 (Q5_0/Q5_1 high bits).
static inline u8x16 bits_to_0x10(uint32_t bits) {
  static const u8x16 select = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  u8x16 b = {0};
  for (int i = 0; i < 8; i++) b[i] = (uint8_t)(bits & 0xff), b[i + 8] = (uint8_t)((bits >> 8) & 0xff);
  return (u8x16)((b & select) != 0) & 0x10;
}

static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

typedef struct {
  u8x16 h0, h1;     // the 32 stored values as unsigned bytes (Q8_0: signed bytes)
  float a0, a1;     // scale of each half
  float b0, b1;     // offset per value of each half (times the activations' half sums)
} group;

static inline int block_values(int type) { return type >= T_Q4_K ? 256 : 32; }

static inline size_t block_bytes(int type) {
  switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
  }
}

// Group g (of 32 values) of a row: its block is blk (g / groups-per-block), j = g % groups-per-block.
static inline void unpack(int type, const uint8_t *blk, int j, group *o) {
  switch (type) {
    case T_Q4_0: case T_Q4_1: {
      u8x16 q = load_u8x16(blk + (type == T_Q4_0 ? 2 : 4));
      o->h0 = q & 15, o->h1 = q >> 4;
      float d = f16(blk);
      o->a0 = o->a1 = d;
      o->b0 = o->b1 = type == T_Q4_0 ? -8.f * d : f16(blk + 2);
      break;
    }
    case T_Q5_0: case T_Q5_1: {
      int off = type == T_Q5_0 ? 2 : 4;
      uint32_t qh;
      memcpy(&qh, blk + off, 4);
      u8x16 q = load_u8x16(blk + off + 4);
      o->h0 = (q & 15) | bits_to_0x10(qh & 0xffff);
      o->h1 = (q >> 4) | bits_to_0x10(qh >> 16);
      float d = f16(blk);
      o->a0 = o->a1 = d;
      o->b0 = o->b1 = type == T_Q5_0 ? -16.f * d : f16(blk + 2);
      break;
    }
    case T_Q8_0: {
      o->h0 = load_u8x16(blk + 2), o->h1 = load_u8x16(blk + 18);
      o->a0 = o->a1 = f16(blk);
      o->b0 = o->b1 = 0.f;
      break;
    }
    case T_Q4_K: case T_Q5_K: {
      int sc, m;
      scale_min_k4(j, blk + 4, &sc, &m);
      const uint8_t *qs = blk + (type == T_Q4_K ? 16 : 48) + 32 * (j / 2);
      int shift = 4 * (j & 1);
      u8x16 q0 = (load_u8x16(qs) >> shift) & 15, q1 = (load_u8x16(qs + 16) >> shift) & 15;
      if (type == T_Q5_K) {
        const uint8_t *qh = blk + 16;
        q0 |= ((load_u8x16(qh) >> j) & 1) << 4;
        q1 |= ((load_u8x16(qh + 16) >> j) & 1) << 4;
      }
      o->h0 = q0, o->h1 = q1;
      float d = f16(blk), dmin = f16(blk + 2);
      o->a0 = o->a1 = d * (float)sc;
      o->b0 = o->b1 = -dmin * (float)m;
      break;
    }
    case T_Q6_K: {
      int half = j / 4, c = j & 3;
      const uint8_t *ql = blk + 64 * half + (c & 1) * 32, *qh = blk + 128 + 32 * half;
      const int8_t *sc = (const int8_t *)(blk + 192) + 8 * half + 2 * c;
      int lshift = c & 2 ? 4 : 0, hshift = 2 * c;
      o->h0 = ((load_u8x16(ql) >> lshift) & 15) | (((load_u8x16(qh) >> hshift) & 3) << 4);
      o->h1 = ((load_u8x16(ql + 16) >> lshift) & 15) | (((load_u8x16(qh + 16) >> hshift) & 3) << 4);
      float d = f16(blk + 208);
      o->a0 = d * (float)sc[0], o->a1 = d * (float)sc[1];
      o->b0 = -32.f * o->a0, o->b1 = -32.f * o->a1;
      break;
    }
    default:  // callers check the type first
      memset(o, 0, sizeof *o);
  }
}

// ---------------------------------------------------------------- activations

// x [m, k] float -> xq [m, k] int8, and per group of 32: xd (scale), xs (scaled sums of both halves).
static void quantize_rows(const float *x, int m, int k, int8_t *xq, float *xd, float *xs) {
  int groups = k / 32;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < m * groups; t++) {
    const float *v = x + (size_t)t * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int s0 = 0, s1 = 0;
    int8_t *q = xq + (size_t)t * 32;
    for (int i = 0; i < 32; i++) {
      int qi = (int)lrintf(v[i] * id);
      q[i] = (int8_t)qi;
      if (i < 16) s0 += qi; else s1 += qi;
    }
    xd[t] = d;
    xs[2 * (size_t)t] = d * (float)s0;
    xs[2 * (size_t)t + 1] = d * (float)s1;
  }
}

// ---------------------------------------------------------------- integer dot products

#if defined(__AVX2__)
typedef __m256i ivec;
static inline ivec make_w(const group *g) {
  __m128i lo, hi;
  memcpy(&lo, &g->h0, 16);
  memcpy(&hi, &g->h1, 16);
  return _mm256_set_m128i(hi, lo);
}
// Lanes 0-3: the first half's products, 4-7 the second's.
static inline __m256i dot_us(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

// Accumulate one weight row against rows x0..x0+mr-1; out[r] += the row's dot product.
static inline void row_dot(int type, const uint8_t *wrow, int groups, int gpb, const int8_t *xq, const float *xd,
                           const float *xs, int k, int mr, float *out) {
  size_t bb = block_bytes(type);
#if defined(__AVX2__)
  __m256 acc[16];
  for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
#else
  float acc[16] = {0};
#endif
  float offs[16] = {0};
  for (int g = 0; g < groups; g++) {
    group w;
    unpack(type, wrow + (size_t)(g / gpb) * bb, g % gpb, &w);
#if defined(__AVX2__)
    __m256i wv = make_w(&w);
    __m256i wu = type == T_Q8_0 ? _mm256_sign_epi8(wv, wv) : wv;  // |w| for the signed Q8_0
    __m256 a = _mm256_set_m128(_mm_set1_ps(w.a1), _mm_set1_ps(w.a0));
    for (int r = 0; r < mr; r++) {
      size_t t = (size_t)r * groups + g;
      __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + 32 * (size_t)g));
      if (type == T_Q8_0) xv = _mm256_sign_epi8(xv, wv);  // move w's sign onto x
      __m256 p = _mm256_cvtepi32_ps(dot_us(wu, xv));
      acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(a, _mm256_set1_ps(xd[t])), acc[r]);
      offs[r] += w.b0 * xs[2 * t] + w.b1 * xs[2 * t + 1];
    }
#else
    for (int r = 0; r < mr; r++) {
      size_t t = (size_t)r * groups + g;
      const int8_t *xv = xq + (size_t)r * k + 32 * (size_t)g;
      int s0 = 0, s1 = 0;
      if (type == T_Q8_0) {
        for (int i = 0; i < 16; i++) s0 += (int8_t)w.h0[i] * xv[i], s1 += (int8_t)w.h1[i] * xv[16 + i];
      } else {
        for (int i = 0; i < 16; i++) s0 += w.h0[i] * xv[i], s1 += w.h1[i] * xv[16 + i];
      }
      acc[r] += xd[t] * (w.a0 * (float)s0 + w.a1 * (float)s1);
      offs[r] += w.b0 * xs[2 * t] + w.b1 * xs[2 * t + 1];
    }
#endif
  }
  for (int r = 0; r < mr; r++) {
#if defined(__AVX2__)
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[r] = _mm_cvtss_f32(s) + offs[r];
#else
    out[r] = acc[r] + offs[r];
#endif
  }
}

#define ROW_CHUNK 16

// x [m, k] -> the int8 activations every product with a k-wide weight then reads: xq m*k bytes,
// xd m*k/32 floats, xs m*k/16 floats. k must be a multiple of 32.
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs) {
  quantize_rows(x, m, k, xq, xd, xs);
}

// y[:, 0:n] = x . W^T (+ bias) with x quantized by dc_gguf_quantize_x; y's rows are ldy floats
// apart (a slice of a fused layer's output). Returns 0, or -1 for an unknown type or a k that is not
// a whole number of blocks.
int dc_gguf_matmul(int type, const uint8_t *w, const int8_t *xq, const float *xd, const float *xs,
                   const float *bias, float *y, int m, int n, int k, int ldy) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k % qk != 0) return -1;
  int groups = k / 32, gpb = qk / 32;
  size_t row_bytes = (size_t)(k / qk) * bb;
  // Rows in chunks: each weight row is unpacked once per chunk, the chunk's activations stay in cache.
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; i++) {
    const uint8_t *wrow = w + (size_t)i * row_bytes;
    float out[ROW_CHUNK];
    for (int r0 = 0; r0 < m; r0 += ROW_CHUNK) {
      int mr = m - r0 < ROW_CHUNK ? m - r0 : ROW_CHUNK;
      size_t t0 = (size_t)r0 * groups;
      row_dot(type, wrow, groups, gpb, xq + (size_t)r0 * k, xd + t0, xs + 2 * t0, k, mr, out);
      float b = bias ? bias[i] : 0.f;
      for (int r = 0; r < mr; r++) y[(size_t)(r0 + r) * ldy + i] = out[r] + b;
    }
  }
  return 0;
}

// Weight rows [row0, row0 + rows) as float32 into out [rows, k]: the reference dequantization
// (the same as gguf-py's and llama.cpp's), for prefill-sized products and float fallbacks.
int dc_gguf_dequantize(int type, const uint8_t *w, int row0, int rows, int k, float *out) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k % qk != 0) return -1;
  int groups = k / 32, gpb = qk / 32;
  size_t row_bytes = (size_t)(k / qk) * bb;
#pragma omp parallel for schedule(static)
  for (int i = 0; i < rows; i++) {
    const uint8_t *wrow = w + (size_t)(row0 + i) * row_bytes;
    float *o = out + (size_t)i * k;
    for (int g = 0; g < groups; g++) {
      group q;
      unpack(type, wrow + (size_t)(g / gpb) * bb, g % gpb, &q);
      for (int l = 0; l < 16; l++) {
        float v0 = type == T_Q8_0 ? (float)(int8_t)q.h0[l] : (float)q.h0[l];
        float v1 = type == T_Q8_0 ? (float)(int8_t)q.h1[l] : (float)q.h1[l];
        o[32 * g + l] = q.a0 * v0 + q.b0;
        o[32 * g + 16 + l] = q.a1 * v1 + q.b1;
      }
    }
  }
  return 0;
}
