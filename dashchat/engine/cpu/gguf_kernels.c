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
#pragma GCC diagnostic ignored "-Wpsabi" // static helpers only: no ABI crosses the library boundary
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef float f32x16 __attribute__((vector_size(64)));

static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
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
#endif
}

static inline u8x16 load_u8x16(const uint8_t *p) {
  u8x16 v;
  memcpy(&v, p, 16);
  return v;
}

// Byte i of spread[b]: 0x10 if bit i of b is set, else 0 (the 5th bit of Q5_0/Q5_1 values).
static uint64_t spread[256];

__attribute__((constructor)) static void init_spread(void) {
  for (int b = 0; b < 256; b++) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
      if (b >> i & 1) v |= (uint64_t)0x10 << (8 * i);
    spread[b] = v;
  }
}

// Byte i of the result: 0x10 if bit i of the 16-bit `bits` is set, else 0.
static inline u8x16 bits_to_0x10(uint32_t bits) {
  uint64_t lo = spread[bits & 0xff], hi = spread[(bits >> 8) & 0xff];
  u8x16 v;
  memcpy(&v, &lo, 8);
  memcpy((uint8_t *)&v + 8, &hi, 8);
  return v;
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
#define INLINE static inline __attribute__((always_inline))

INLINE void unpack(int type, const uint8_t *blk, int j, group *o) {
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

#if defined(__AVX2__)
// 0xFF in byte i where bit i of `bits` is set (llama.cpp's bytes_from_bits_32).
static inline __m256i bytes_from_bits(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                          0x0303030303030303);
  __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
  const __m256i bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
  r = _mm256_or_si256(r, bit);
  return _mm256_cmpeq_epi8(r, _mm256_set1_epi64x(-1));
}

// The group's 32 values straight into a vector register (the portable unpack goes through memory).
INLINE __m256i unpack_avx2(int type, const uint8_t *blk, int j, float *a0, float *a1, float *b0, float *b1) {
  const __m256i m4 = _mm256_set1_epi8(15);
  switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: {
      int off = type == T_Q4_0 ? 2 : type == T_Q4_1 ? 4 : type == T_Q5_0 ? 6 : 8;
      __m128i q = _mm_loadu_si128((const __m128i *)(blk + off));
      __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
      float d = f16(blk);
      *a0 = *a1 = d;
      if (type == T_Q5_0 || type == T_Q5_1) {
        uint32_t qh;
        memcpy(&qh, blk + off - 4, 4);
        w = _mm256_or_si256(w, _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10)));
      }
      *b0 = *b1 = type == T_Q4_0 ? -8.f * d : type == T_Q5_0 ? -16.f * d : f16(blk + 2);
      return w;
    }
    case T_Q8_0:
      *a0 = *a1 = f16(blk);
      *b0 = *b1 = 0.f;
      return _mm256_loadu_si256((const __m256i *)(blk + 2));
    case T_Q4_K: case T_Q5_K: {
      int sc, m;
      scale_min_k4(j, blk + 4, &sc, &m);
      __m256i q = _mm256_loadu_si256((const __m256i *)(blk + (type == T_Q4_K ? 16 : 48) + 32 * (j / 2)));
      __m256i w = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, m4);
      if (type == T_Q5_K) {
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
        w = _mm256_or_si256(w, _mm256_slli_epi16(bit, 4));
      }
      float d = f16(blk), dmin = f16(blk + 2);
      *a0 = *a1 = d * (float)sc;
      *b0 = *b1 = -dmin * (float)m;
      return w;
    }
    default: {  // T_Q6_K
      int half = j / 4, c = j & 3;
      const uint8_t *ql = blk + 64 * half + (c & 1) * 32, *qh = blk + 128 + 32 * half;
      const int8_t *sc = (const int8_t *)(blk + 192) + 8 * half + 2 * c;
      __m256i l = _mm256_loadu_si256((const __m256i *)ql), h = _mm256_loadu_si256((const __m256i *)qh);
      l = _mm256_and_si256(c & 2 ? _mm256_srli_epi16(l, 4) : l, m4);
      h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * c)), _mm256_set1_epi8(3));
      float d = f16(blk + 208);
      *a0 = d * (float)sc[0], *a1 = d * (float)sc[1];
      *b0 = -32.f * *a0, *b1 = -32.f * *a1;
      return _mm256_or_si256(l, _mm256_slli_epi16(h, 4));
    }
  }
}
#endif

// Accumulate one weight row against rows x0..x0+mr-1; out[r] += the row's dot product.
INLINE void row_dot(int type, const uint8_t *wrow, int g0, int groups, int gpb, const int8_t *xq, const float *xd,
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
#if defined(__AVX2__)
    group w;
    __m256i wv = unpack_avx2(type, wrow + (size_t)((g0 + g) / gpb) * bb, (g0 + g) % gpb, &w.a0, &w.a1, &w.b0, &w.b1);
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
    group w;
    unpack(type, wrow + (size_t)((g0 + g) / gpb) * bb, (g0 + g) % gpb, &w);
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

// Specialized per type (and for one row, the decode of a single stream): the unpacking's switch and
// the row loop then compile away.
#define ROW_DOT_CASE(T)                                                                   \
  case T:                                                                                 \
    if (mr == 1) row_dot(T, wrow, g0, groups, gpb, xq, xd, xs, k, 1, out);                \
    else row_dot(T, wrow, g0, groups, gpb, xq, xd, xs, k, mr, out);                      \
    break;

static void row_dot_any(int type, const uint8_t *wrow, int g0, int groups, int gpb, const int8_t *xq, const float *xd,
                        const float *xs, int k, int mr, float *out) {
  switch (type) {
    ROW_DOT_CASE(T_Q4_0) ROW_DOT_CASE(T_Q4_1) ROW_DOT_CASE(T_Q5_0) ROW_DOT_CASE(T_Q5_1)
    ROW_DOT_CASE(T_Q8_0) ROW_DOT_CASE(T_Q4_K) ROW_DOT_CASE(T_Q5_K) ROW_DOT_CASE(T_Q6_K)
  }
}

#define ROW_CHUNK 16

// x [m, k] -> the int8 activations every product with a k-wide weight then reads: xq m*k bytes,
// xd m*k/32 floats, xs m*k/16 floats. k must be a multiple of 32.
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs) {
  quantize_rows(x, m, k, xq, xd, xs);
}

// y[:, 0:n] = x . W[:, k0:k0+k]^T (+ bias) with x [m, k] quantized by dc_gguf_quantize_x; W's rows
// are k_full values wide, k0 and k multiples of 32 (a tensor-parallel rank's slice of a row-split
// weight: a 256-value K-quant block splits along its 32-value groups, whose integer products are then
// exactly those of the whole row). y's rows are ldy floats apart (a slice of a fused layer's output).
// Returns 0, or -1 for an unknown type or widths that are not whole blocks and groups.
int dc_gguf_matmul(int type, const uint8_t *w, int k_full, int k0, const int8_t *xq, const float *xd,
                   const float *xs, const float *bias, float *y, int m, int n, int k, int ldy) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k_full % qk != 0 || k0 % 32 != 0 || k % 32 != 0 || k0 + k > k_full) return -1;
  int groups = k / 32, gpb = qk / 32, g0 = k0 / 32;
  size_t row_bytes = (size_t)(k_full / qk) * bb;
  // Rows in chunks: each weight row is unpacked once per chunk, the chunk's activations stay in cache.
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; i++) {
    const uint8_t *wrow = w + (size_t)i * row_bytes;
    float out[ROW_CHUNK];
    for (int r0 = 0; r0 < m; r0 += ROW_CHUNK) {
      int mr = m - r0 < ROW_CHUNK ? m - r0 : ROW_CHUNK;
      size_t t0 = (size_t)r0 * groups;
      row_dot_any(type, wrow, g0, groups, gpb, xq + (size_t)r0 * k, xd + t0, xs + 2 * t0, k, mr, out);
      float b = bias ? bias[i] : 0.f;
      for (int r = 0; r < mr; r++) y[(size_t)(r0 + r) * ldy + i] = out[r] + b;
    }
  }
  return 0;
}

INLINE void unpack_f32(int type, const uint8_t *blk, int j, f32x16 *v0, f32x16 *v1) {
#if defined(__AVX2__)
  float a0, a1, b0, b1;
  __m256i w = unpack_avx2(type, blk, j, &a0, &a1, &b0, &b1);
  __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  __m256 f[4];
  __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; i++) {
    __m256i wide = type == T_Q8_0 ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]);
    f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(i < 2 ? a0 : a1), _mm256_set1_ps(i < 2 ? b0 : b1));
  }
  memcpy(v0, f, 64);
  memcpy(v1, f + 2, 64);
#else
  group q;
  unpack(type, blk, j, &q);
  if (type == T_Q8_0) {
    *v0 = __builtin_convertvector((i8x16)q.h0, f32x16), *v1 = __builtin_convertvector((i8x16)q.h1, f32x16);
  } else {
    *v0 = __builtin_convertvector(q.h0, f32x16), *v1 = __builtin_convertvector(q.h1, f32x16);
  }
  *v0 = *v0 * q.a0 + q.b0;
  *v1 = *v1 * q.a1 + q.b1;
#endif
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
      f32x16 v0, v1;
      unpack_f32(type, wrow + (size_t)(g / gpb) * bb, g % gpb, &v0, &v1);
      memcpy(o + 32 * g, &v0, 64);
      memcpy(o + 32 * g + 16, &v1, 64);
    }
  }
  return 0;
}

// Rows ids[0..n) of a GGUF weight [*, k] as float32 out [n, k]: an embedding lookup that dequantizes
// only the rows it reads. Returns -1 for a type or width the kernels lack.
int dc_gguf_dequantize_rows(int type, const uint8_t *w, const int64_t *ids, int n, int k, float *out) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k % qk != 0) return -1;
  int groups = k / 32, gpb = qk / 32;
  size_t row_bytes = (size_t)(k / qk) * bb;
#pragma omp parallel for schedule(static) if (n >= 64)
  for (int i = 0; i < n; i++) {
    const uint8_t *wrow = w + (size_t)ids[i] * row_bytes;
    float *o = out + (size_t)i * k;
    for (int g = 0; g < groups; g++) {
      f32x16 v0, v1;
      unpack_f32(type, wrow + (size_t)(g / gpb) * bb, g % gpb, &v0, &v1);
      memcpy(o + 32 * g, &v0, 64);
      memcpy(o + 32 * g + 16, &v1, 64);
    }
  }
  return 0;
}
