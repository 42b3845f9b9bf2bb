// GGUF quantized linear layers on the CPU, reading the weights' blocks as the file ships them.
// Built with kernels.c into one library by dashchat/engine/cpu/kernels.py (-march=native, torch's
// OpenMP runtime).
//
// y[m, n] = x[m, k] . W^T, W given as n rows of k/QK blocks of one GGUF type (Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1, IQ4_NL: 32 values a block; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS: 256 values a
// super-block). F16 and BF16 rows take float products of their own (dc_gguf_matmul16_parts).
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
// sum of each half of the quantized activations. Q6_K, Q3_K and Q2_K have different scales for the
// two halves. Q8_0, IQ4_NL and IQ4_XS values are signed bytes (IQ4's 4-bit indices looked up in their
// 16 non-linear values by one byte shuffle), the others unsigned.
#pragma GCC diagnostic ignored "-Wpsabi" // static helpers only: no ABI crosses the library boundary
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

enum {
  T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12,
  T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23, T_BF16 = 30
};

// 256 values a block, in 8 groups of 32 (the K-quants and IQ4_XS); the others: 32 values a block.
static inline int super_block(int type) {
  return type == T_Q2_K || type == T_Q3_K || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K || type == T_IQ4_XS;
}
// Values stored (or looked up) as signed bytes; the others unpack to unsigned ones.
static inline int signed_values(int type) { return type == T_Q8_0 || type == T_IQ4_NL || type == T_IQ4_XS; }
// A scale of its own for each 16 values: a group's two halves are scaled apart.
static inline int half_scales(int type) { return type == T_Q6_K || type == T_Q3_K || type == T_Q2_K; }
// Weights kept as 16-bit floats, multiplied in floats (dc_gguf_matmul16_parts), not by these integer paths.
static inline int float16_type(int type) { return type == T_F16 || type == T_BF16; }

// IQ4_NL's and IQ4_XS's 16 non-linear values a 4-bit index stands for (llama.cpp's kvalues_iq4nl).
static const int8_t iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

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

static inline int block_values(int type) { return super_block(type) ? 256 : 32; }

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
    case T_Q2_K: return 84;
    case T_Q3_K: return 110;
    case T_IQ4_NL: return 18;
    case T_IQ4_XS: return 136;
    case T_F16: case T_BF16: return 64;  // counted in blocks of 32 values
    default: return 0;
  }
}

// Group g (of 32 values) of a row: its block is blk (g / groups-per-block), j = g % groups-per-block.
#define INLINE static inline __attribute__((always_inline))

// Scale n (0-15, one each 16 values) of a Q3_K super-block, from its twelve bytes of packed 6-bit
// scales (low 4 bits: byte n % 8, nibble n / 8; high 2 bits: byte 8 + n % 4, bits 2 * (n / 4)), less 32.
static inline int q3k_scale(const uint8_t *s, int n) {
  return (((s[n % 8] >> (4 * (n / 8))) & 15) | (((s[8 + n % 4] >> (2 * (n / 4))) & 3) << 4)) - 32;
}

// group_scales (below) of Q2_K, Q3_K, IQ4_NL and IQ4_XS.
INLINE void low_bit_scales(int type, const uint8_t *blk, int j, float *a0, float *a1, float *b0, float *b1) {
  switch (type) {
    case T_Q2_K: {  // a 4-bit scale and a 4-bit minimum each 16 values
      float d = f16(blk + 80), dmin = f16(blk + 82);
      int s0 = blk[2 * j], s1 = blk[2 * j + 1];
      *a0 = d * (float)(s0 & 15), *a1 = d * (float)(s1 & 15);
      *b0 = -dmin * (float)(s0 >> 4), *b1 = -dmin * (float)(s1 >> 4);
      break;
    }
    case T_Q3_K: {  // values d * scale * (q - 4), q the 3-bit stored value
      float d = f16(blk + 108);
      *a0 = d * (float)q3k_scale(blk + 96, 2 * j), *a1 = d * (float)q3k_scale(blk + 96, 2 * j + 1);
      *b0 = -4.f * *a0, *b1 = -4.f * *a1;
      break;
    }
    case T_IQ4_NL:
      *a0 = *a1 = f16(blk);
      *b0 = *b1 = 0.f;
      break;
    default: {  // T_IQ4_XS: a 6-bit scale a group (low 4 bits in scales_l, high 2 in scales_h), less 32
      uint16_t h;
      memcpy(&h, blk + 2, 2);
      int ls = ((blk[4 + j / 2] >> (4 * (j & 1))) & 15) | (((h >> (2 * j)) & 3) << 4);
      *a0 = *a1 = f16(blk) * (float)(ls - 32);
      *b0 = *b1 = 0.f;
    }
  }
}

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
    case T_Q2_K: case T_Q3_K: {  // 2 bits of 4 values a byte; Q3_K's third bit in a plane of its own
      const uint8_t *qs = blk + (type == T_Q2_K ? 16 : 32) + 32 * (j / 4);
      int shift = 2 * (j & 3);
      u8x16 q0 = (load_u8x16(qs) >> shift) & 3, q1 = (load_u8x16(qs + 16) >> shift) & 3;
      if (type == T_Q3_K) {
        q0 |= ((load_u8x16(blk) >> j) & 1) << 2;
        q1 |= ((load_u8x16(blk + 16) >> j) & 1) << 2;
      }
      o->h0 = q0, o->h1 = q1;
      low_bit_scales(type, blk, j, &o->a0, &o->a1, &o->b0, &o->b1);
      break;
    }
    case T_IQ4_NL: case T_IQ4_XS: {  // 4-bit indices into the non-linear values (signed bytes)
      const uint8_t *qs = type == T_IQ4_NL ? blk + 2 : blk + 8 + 16 * j;
      for (int i = 0; i < 16; i++) {
        o->h0[i] = (uint8_t)iq4_values[qs[i] & 15];
        o->h1[i] = (uint8_t)iq4_values[qs[i] >> 4];
      }
      low_bit_scales(type, blk, j, &o->a0, &o->a1, &o->b0, &o->b1);
      break;
    }
    default:  // callers check the type first
      memset(o, 0, sizeof *o);
  }
}

// ---------------------------------------------------------------- activations

// x [m, k] float -> xq [m, k] int8, one scale per `span` values (32, or 256: a K-quant super-block);
// per group g of 32 values of row r: xd[g * m + r] (the scale of the span holding it) and
// xs[(2 * g + h) * m + r] (the scale times the sum of half h's int8 values). The per-group arrays are
// stored group-major so a tile of consecutive rows reads its scales and sums as one vector.
static void quantize_rows(const float *x, int m, int k, int span, int8_t *xq, float *xd, float *xs) {
  int spans = k / span, per_span = span / 32;
  // a decode step's rows take a microsecond or two: less than waking the thread team
#pragma omp parallel for schedule(static) if (m * (k / 32) >= 1024)
  for (int t = 0; t < m * spans; t++) {
    int r = t / spans, s = t % spans;
    const float *v = x + (size_t)t * span;
    float amax = 0.f;
    for (int i = 0; i < span; i++) amax = fmaxf(amax, fabsf(v[i]));
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    for (int gi = 0; gi < per_span; gi++) {
      int g = s * per_span + gi, s0 = 0, s1 = 0;
      int8_t *q = xq + (size_t)t * span + 32 * gi;
      for (int i = 0; i < 32; i++) {
        int qi = (int)lrintf(v[32 * gi + i] * id);
        q[i] = (int8_t)qi;
        if (i < 16) s0 += qi; else s1 += qi;
      }
      xd[(size_t)g * m + r] = d;
      xs[(size_t)(2 * g) * m + r] = d * (float)s0;
      xs[(size_t)(2 * g + 1) * m + r] = d * (float)s1;
    }
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

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 0xFF in byte i where bit i of `bits` is set (llama.cpp's bytes_from_bits_32).
static inline __m256i bytes_from_bits(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                          0x0303030303030303);
  __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
  const __m256i bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
  r = _mm256_or_si256(r, bit);
  return _mm256_cmpeq_epi8(r, _mm256_set1_epi64x(-1));
}

// The group's 32 stored values straight into a vector register (scales: group_scales).
INLINE __m256i group_values_avx2(int type, const uint8_t *blk, int j) {
  const __m256i m4 = _mm256_set1_epi8(15);
  switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: {
      int off = type == T_Q4_0 ? 2 : type == T_Q4_1 ? 4 : type == T_Q5_0 ? 6 : 8;
      __m128i q = _mm_loadu_si128((const __m128i *)(blk + off));
      __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
      if (type == T_Q5_0 || type == T_Q5_1) {
        uint32_t qh;
        memcpy(&qh, blk + off - 4, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        w = _mm256_mask_add_epi8(w, (__mmask32)qh, w, _mm256_set1_epi8(0x10));  // the 5th bit, by mask
#else
        w = _mm256_or_si256(w, _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10)));
#endif
      }
      return w;
    }
    case T_Q8_0:
      return _mm256_loadu_si256((const __m256i *)(blk + 2));
    case T_Q2_K: case T_Q3_K: {
      __m256i q = _mm256_loadu_si256((const __m256i *)(blk + (type == T_Q2_K ? 16 : 32) + 32 * (j / 4)));
      __m256i w = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * (j & 3))), _mm256_set1_epi8(3));
      if (type == T_Q3_K) {
        __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
        __m256i bit = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
        w = _mm256_or_si256(w, _mm256_slli_epi16(bit, 2));
      }
      return w;
    }
    case T_IQ4_NL: case T_IQ4_XS: {  // the indices looked up in the 16 values by one byte shuffle
      __m128i q = _mm_loadu_si128((const __m128i *)(type == T_IQ4_NL ? blk + 2 : blk + 8 + 16 * j));
      __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
      return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)iq4_values)), idx);
    }
    case T_Q4_K: case T_Q5_K: {
      __m256i q = _mm256_loadu_si256((const __m256i *)(blk + (type == T_Q4_K ? 16 : 48) + 32 * (j / 2)));
      __m256i w = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, m4);
      if (type == T_Q5_K) {
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
        w = _mm256_or_si256(w, _mm256_slli_epi16(bit, 4));
      }
      return w;
    }
    default: {  // T_Q6_K
      int half = j / 4, c = j & 3;
      const uint8_t *ql = blk + 64 * half + (c & 1) * 32, *qh = blk + 128 + 32 * half;
      __m256i l = _mm256_loadu_si256((const __m256i *)ql), h = _mm256_loadu_si256((const __m256i *)qh);
      l = _mm256_and_si256(c & 2 ? _mm256_srli_epi16(l, 4) : l, m4);
      h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * c)), _mm256_set1_epi8(3));
      return _mm256_or_si256(l, _mm256_slli_epi16(h, 4));
    }
  }
}
#endif

// The scales of group j of a block (j: 0-7 in a K-quant super-block, 0 otherwise): its values are
// a0 * q + b0 in the first half and a1 * q + b1 in the second (the products unpack() forms).
INLINE void group_scales(int type, const uint8_t *blk, int j, float *a0, float *a1, float *b0, float *b1) {
  switch (type) {
    case T_Q4_0: case T_Q5_0: {
      float d = f16(blk);
      *a0 = *a1 = d;
      *b0 = *b1 = (type == T_Q4_0 ? -8.f : -16.f) * d;
      break;
    }
    case T_Q4_1: case T_Q5_1:
      *a0 = *a1 = f16(blk);
      *b0 = *b1 = f16(blk + 2);
      break;
    case T_Q8_0:
      *a0 = *a1 = f16(blk);
      *b0 = *b1 = 0.f;
      break;
    case T_Q4_K: case T_Q5_K: {
      int sc, m;
      scale_min_k4(j, blk + 4, &sc, &m);
      float d = f16(blk), dmin = f16(blk + 2);
      *a0 = *a1 = d * (float)sc;
      *b0 = *b1 = -dmin * (float)m;
      break;
    }
    case T_Q2_K: case T_Q3_K: case T_IQ4_NL: case T_IQ4_XS:
      low_bit_scales(type, blk, j, a0, a1, b0, b1);
      break;
    default: {  // T_Q6_K: a scale per 16 values
      const int8_t *sc = (const int8_t *)(blk + 192) + 2 * j;
      float d = f16(blk + 208);
      *a0 = d * (float)sc[0], *a1 = d * (float)sc[1];
      *b0 = -32.f * *a0, *b1 = -32.f * *a1;
    }
  }
}

// group_scales of all 8 groups of a K-quant super-block at once (the same products, so the same values).
// super_block_scales of Q2_K, Q3_K and IQ4_XS: low_bit_scales' values, the block's fp16 scales and
// packed bits taken apart once for its 8 groups (per group, they cost more than the group's products).
#if defined(__AVX2__)
// d times 16 signed bytes: the even ones (the groups' first halves) to A0, the odd ones to A1.
INLINE void split_scales(__m128i s, float d, float *A0, float *A1) {
  __m128i both = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  _mm256_storeu_ps(A0, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(both))));
  _mm256_storeu_ps(A1, _mm256_mul_ps(_mm256_set1_ps(d),
                                     _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(both, 8)))));
}
#endif

INLINE void low_bit_super_scales(int type, const uint8_t *blk, float *A0, float *A1, float *B0, float *B1) {
  if (type == T_Q2_K) {
    float d = f16(blk + 80), dmin = f16(blk + 82);
#if defined(__AVX2__)
    __m128i s = _mm_loadu_si128((const __m128i *)blk), m4 = _mm_set1_epi8(15);
    split_scales(_mm_and_si128(s, m4), d, A0, A1);
    split_scales(_mm_and_si128(_mm_srli_epi16(s, 4), m4), -dmin, B0, B1);
#else
    for (int j = 0; j < 8; j++) {
      int s0 = blk[2 * j], s1 = blk[2 * j + 1];
      A0[j] = d * (float)(s0 & 15), A1[j] = d * (float)(s1 & 15);
      B0[j] = -dmin * (float)(s0 >> 4), B1[j] = -dmin * (float)(s1 >> 4);
    }
#endif
  } else if (type == T_Q3_K) {  // q3k_scale's 16 values at once, four bytes a step
    uint32_t a[4], t;
    memcpy(a, blk + 96, 12);
    t = a[2];
    a[2] = ((a[0] >> 4) & 0x0f0f0f0fu) | (((t >> 4) & 0x03030303u) << 4);
    a[3] = ((a[1] >> 4) & 0x0f0f0f0fu) | (((t >> 6) & 0x03030303u) << 4);
    a[0] = (a[0] & 0x0f0f0f0fu) | ((t & 0x03030303u) << 4);
    a[1] = (a[1] & 0x0f0f0f0fu) | (((t >> 2) & 0x03030303u) << 4);
    float d = f16(blk + 108);
#if defined(__AVX2__)
    split_scales(_mm_sub_epi8(_mm_loadu_si128((const __m128i *)a), _mm_set1_epi8(32)), d, A0, A1);
    _mm256_storeu_ps(B0, _mm256_mul_ps(_mm256_set1_ps(-4.f), _mm256_loadu_ps(A0)));
    _mm256_storeu_ps(B1, _mm256_mul_ps(_mm256_set1_ps(-4.f), _mm256_loadu_ps(A1)));
#else
    uint8_t sc[16];
    memcpy(sc, a, 16);
    for (int j = 0; j < 8; j++) {
      A0[j] = d * (float)(sc[2 * j] - 32), A1[j] = d * (float)(sc[2 * j + 1] - 32);
      B0[j] = -4.f * A0[j], B1[j] = -4.f * A1[j];
    }
#endif
  } else {  // T_IQ4_XS
    uint16_t h;
    memcpy(&h, blk + 2, 2);
    float d = f16(blk);
    for (int j = 0; j < 8; j++) {
      int ls = ((blk[4 + j / 2] >> (4 * (j & 1))) & 15) | (((h >> (2 * j)) & 3) << 4);
      A0[j] = A1[j] = d * (float)(ls - 32);
      B0[j] = B1[j] = 0.f;
    }
  }
}

INLINE void super_block_scales(int type, const uint8_t *blk, float *A0, float *A1, float *B0, float *B1) {
  if (type == T_Q2_K || type == T_Q3_K || type == T_IQ4_XS) {
    low_bit_super_scales(type, blk, A0, A1, B0, B1);
    return;
  }
  if (type == T_Q6_K) {
    const int8_t *sc = (const int8_t *)(blk + 192);
    float d = f16(blk + 208);
#if defined(__AVX2__)
    // even scales (first halves) to the low 8 bytes, odd ones (second halves) to the high 8
    __m128i both = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)sc),
                                    _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    __m256 a0 = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(both)));
    __m256 a1 = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(both, 8))));
    _mm256_storeu_ps(A0, a0), _mm256_storeu_ps(A1, a1);
    _mm256_storeu_ps(B0, _mm256_mul_ps(_mm256_set1_ps(-32.f), a0));
    _mm256_storeu_ps(B1, _mm256_mul_ps(_mm256_set1_ps(-32.f), a1));
#else
    for (int j = 0; j < 8; j++) {
      A0[j] = d * (float)sc[2 * j], A1[j] = d * (float)sc[2 * j + 1];
      B0[j] = -32.f * A0[j], B1[j] = -32.f * A1[j];
    }
#endif
    return;
  }
  // Q4_K/Q5_K: twelve bytes hold eight 6-bit scales and eight 6-bit minimums (scale_min_k4's layout)
  uint32_t u[3];
  memcpy(u, blk + 4, 12);
  uint32_t packed[4] = {u[0] & 0x3f3f3f3fu, (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4),
                        u[1] & 0x3f3f3f3fu, ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4)};
  float d = f16(blk), dmin = f16(blk + 2);
#if defined(__AVX2__)
  __m128i sm = _mm_loadu_si128((const __m128i *)packed);  // scales 0-7, then minimums 0-7
  __m256 a = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
  __m256 b = _mm256_mul_ps(_mm256_set1_ps(-dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
  _mm256_storeu_ps(A0, a), _mm256_storeu_ps(A1, a), _mm256_storeu_ps(B0, b), _mm256_storeu_ps(B1, b);
#else
  uint8_t sm[16];  // scales 0-7, then minimums 0-7
  memcpy(sm, packed, 16);
  for (int j = 0; j < 8; j++) {
    A0[j] = A1[j] = d * (float)sm[j];
    B0[j] = B1[j] = -dmin * (float)sm[8 + j];
  }
#endif
}

// Rows per tile, up to 7 rows (8 or more take the interleaved 8-row blocks on AVX2; this path is
// then the portable build's and a fallback): two accumulators a row fit AVX2's 16 vector registers.
#define MAX_TILE 4

#if defined(__AVX2__)
typedef __m256 accum;
#else
typedef float accum;
#endif

// Group j of block blk (group g of the row's window), its scales given, against the tile's MR
// activation rows, into one of the two accumulator sets.
INLINE void group_step(int type, const uint8_t *blk, int j, int g, float a0, float a1, float b0, float b1,
                       const int8_t *xq, int k, const float *xd, const float *xs, int ldt, const int MR, accum *acc,
                       float *offs) {
  const float *dg = xd + (size_t)g * ldt, *s0 = xs + (size_t)(2 * g) * ldt, *s1 = s0 + ldt;
#if defined(__AVX2__)
  __m256i wv = group_values_avx2(type, blk, j);
  __m256i wu = signed_values(type) ? _mm256_sign_epi8(wv, wv) : wv;  // |w| for the signed types
  __m256 a = half_scales(type) ? _mm256_set_m128(_mm_set1_ps(a1), _mm_set1_ps(a0)) : _mm256_set1_ps(a0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + 32 * (size_t)g));
    if (signed_values(type)) xv = _mm256_sign_epi8(xv, wv);  // move w's sign onto x
    __m256 p = _mm256_cvtepi32_ps(dot_us(wu, xv));
    acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(a, _mm256_set1_ps(dg[r])), acc[r]);
  }
#else
  group w;
  unpack(type, blk, j, &w);
  for (int r = 0; r < MR; r++) {
    const int8_t *xv = xq + (size_t)r * k + 32 * (size_t)g;
    int p0 = 0, p1 = 0;
    if (signed_values(type)) {
      for (int i = 0; i < 16; i++) p0 += (int8_t)w.h0[i] * xv[i], p1 += (int8_t)w.h1[i] * xv[16 + i];
    } else {
      for (int i = 0; i < 16; i++) p0 += w.h0[i] * xv[i], p1 += w.h1[i] * xv[16 + i];
    }
    acc[r] = fmaf(dg[r], a0 * (float)p0 + a1 * (float)p1, acc[r]);
  }
#endif
  // off the accumulator's dependency chain: one add joins it
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) offs[r] += fmaf(b1, s1[r], b0 * s0[r]);
}

// One weight row against MR activation rows (MR a constant at every call site, so the tile's
// accumulators live in registers): out[r] = the row's dot product with activation row r.
// xq: the tile's first activation row (rows k bytes apart); xd, xs: that row's entry of group 0 in
// the group-major scale and sum arrays (ldt entries a group). Even and odd groups go to two
// accumulator sets, so one row (a single stream's decode) is not bound by the latency of one chain of
// adds. Each row's sum is formed in the same order whatever MR is, so a token's result is the same
// bits in every batch of 1-7 rows (and, in the portable build, which takes these tiles at every size,
// in every batch). Batches of 8 rows or more take rows8_dot on AVX2 instead, which forms a row's sum in
// an order of its own, the same for every batch of 8 or more wherever the row sits: from the same
// integer products, scaled and summed in another order, so across the 7/8-row boundary a token's
// result moves by float rounding only (a prefix-cache hit turns a long prefill into a short one;
// greedy answers must not change with it). test_gguf_kernels pins all three statements.
INLINE void tile_dot(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq, int k,
                     const float *xd, const float *xs, int ldt, const int MR, float *out) {
  accum even[MAX_TILE], odd[MAX_TILE];
  float offs_even[MAX_TILE], offs_odd[MAX_TILE];
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
#if defined(__AVX2__)
    even[r] = odd[r] = _mm256_setzero_ps();
#else
    even[r] = odd[r] = 0.f;
#endif
    offs_even[r] = offs_odd[r] = 0.f;
  }
  size_t bb = block_bytes(type);
  if (super_block(type) && g0 % 8 == 0 && groups % 8 == 0) {
    // whole super-blocks (always, but for a tensor-parallel rank's window): their 8 groups' scales
    // taken apart at once, the groups unrolled (each group's bit positions become constants)
    for (int b = 0; b < groups / 8; b++) {
      const uint8_t *blk = wrow + (size_t)(g0 / 8 + b) * bb;
      float A0[8], A1[8], B0[8], B1[8];
      super_block_scales(type, blk, A0, A1, B0, B1);
      // written out: a set chosen at run time would live in memory (see below)
#define SB_GROUP(j, acc, offs) \
  group_step(type, blk, j, 8 * b + j, A0[j], A1[j], B0[j], B1[j], xq, k, xd, xs, ldt, MR, acc, offs);
      SB_GROUP(0, even, offs_even) SB_GROUP(1, odd, offs_odd) SB_GROUP(2, even, offs_even) SB_GROUP(3, odd, offs_odd)
      SB_GROUP(4, even, offs_even) SB_GROUP(5, odd, offs_odd) SB_GROUP(6, even, offs_even) SB_GROUP(7, odd, offs_odd)
#undef SB_GROUP
    }
  } else {
    // two groups an iteration, each into its own set: a set chosen at run time would live in memory
    // (the compiler cannot keep an indexed choice of registers), and the loads and stores would then
    // be the loop's critical path
#define TILE_GROUP(g, acc, offs)                                                                    \
  {                                                                                               \
    unsigned gg = (unsigned)(g0 + (g)), j = gg % per_block;                                        \
    const uint8_t *blk = wrow + (size_t)(gg / per_block) * bb;                                    \
    float a0, a1, b0, b1;                                                                         \
    group_scales(type, blk, (int)j, &a0, &a1, &b0, &b1);                                          \
    group_step(type, blk, (int)j, (g), a0, a1, b0, b1, xq, k, xd, xs, ldt, MR, acc, offs);        \
  }
    const unsigned per_block = super_block(type) ? 8 : 1;  // a constant: no division
    int g = 0;
    for (; g + 1 < groups; g += 2) {
      TILE_GROUP(g, even, offs_even)
      TILE_GROUP(g + 1, odd, offs_odd)
    }
    if (g < groups) TILE_GROUP(g, even, offs_even)
#undef TILE_GROUP
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
#if defined(__AVX2__)
    out[r] = hsum(_mm256_add_ps(even[r], odd[r])) + (offs_even[r] + offs_odd[r]);
#else
    out[r] = (even[r] + odd[r]) + (offs_even[r] + offs_odd[r]);
#endif
  }
}

// Specialized per type and tile height: the unpacking's switch and the row loop compile away.
#define TILE_CASE(T, MR) \
  case T: tile_dot(T, wrow, g0, groups, xq, k, xd, xs, ldt, MR, out); break;
#define TILE_FN(MR)                                                                                       \
  static void tile_dot_##MR(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq,            \
                            int k, const float *xd, const float *xs, int ldt, float *out) {               \
    switch (type) {                                                                                       \
      TILE_CASE(T_Q4_0, MR) TILE_CASE(T_Q4_1, MR) TILE_CASE(T_Q5_0, MR) TILE_CASE(T_Q5_1, MR)             \
      TILE_CASE(T_Q8_0, MR) TILE_CASE(T_Q4_K, MR) TILE_CASE(T_Q5_K, MR) TILE_CASE(T_Q6_K, MR)             \
      TILE_CASE(T_Q2_K, MR) TILE_CASE(T_Q3_K, MR) TILE_CASE(T_IQ4_NL, MR) TILE_CASE(T_IQ4_XS, MR)         \
    }                                                                                                     \
  }
TILE_FN(1)
TILE_FN(2)
TILE_FN(4)

// ---------------------------------------------------------------- K-quant super-blocks, few rows

#if defined(__AVX2__)
// Activations quantized with one scale a super-block (span 256, as llama.cpp's Q8_K) let a K-quant
// row's whole super-block be summed in integers: each group's byte products are summed in pairs
// into int16 (vpmaddubsw: at most 2 * 63 * 127, no saturation), those pairs multiplied by the
// group's integer scale and summed into int32 (vpdpwssd where the CPU has AVX-512 VNNI, else
// vpmaddwd + add), and the minimums' or offsets' share taken off once a super-block from the
// activations' integer sums (ks): one float multiply-add a super-block where the per-group path
// has one a group, and no float conversion a group.

// The integer sums of each row's activations per 16 values (ks16) and per 32 (ks32), k values a row.
static void activation_sums(const int8_t *xq, int m, int k, int16_t *ks16, int16_t *ks32) {
  for (int r = 0; r < m; r++)
    for (int g = 0; g < k / 16; g++) {
      const int8_t *v = xq + (size_t)r * k + 16 * g;
      int s = 0;
      for (int i = 0; i < 16; i++) s += v[i];
      ks16[(size_t)r * (k / 16) + g] = (int16_t)s;
      if (g & 1) ks32[(size_t)r * (k / 32) + g / 2] = (int16_t)(s + ks16[(size_t)r * (k / 16) + g - 1]);
    }
}

static inline __m256i dpwssd_acc(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// Byte shuffles that broadcast one int16 of a 128-bit lane: element e to every int16 of the lane.
#define BCAST16(e) (char)(2 * (e)), (char)(2 * (e) + 1)
#define LANE_BCAST16(e) BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e)

// One weight row's super-blocks [sb0, sb0 + sbs) against MR activation rows quantized with span 256
// (row r at xq + r * k; its scale for super-block b at xd[8 * b * ldt + r]; its sums at ks16 + r * (k / 16)
// and ks32 + r * (k / 32)). Each row's sum is formed in the same order whatever MR is.
INLINE void ktile_dot(int type, const uint8_t *wrow, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                      int ldt, const int16_t *ks16, const int16_t *ks32, const int MR, float *out) {
  __m256 acc[MAX_TILE];
  __m128 accm[MAX_TILE];
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps(), accm[r] = _mm_setzero_ps();
  size_t bb = block_bytes(type);
  for (int b = 0; b < sbs; b++) {
    const uint8_t *blk = wrow + (size_t)(sb0 + b) * bb;
    __m256i sumi[MAX_TILE];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) sumi[r] = _mm256_setzero_si256();
    __m256i lo_scales, hi_scales;  // int16 scales of groups 0-3 / 4-7 (Q6_K: 0-7 / 8-15), in both lanes
    __m256i sc16 = _mm256_setzero_si256();  // Q6_K: its 16 scales as int16, in order
    __m128i mins = _mm_setzero_si128();     // Q4_K/Q5_K: the 8 minimums as int16
    float d;
    if (type == T_Q6_K) {
      sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
      lo_scales = _mm256_permute2x128_si256(sc16, sc16, 0x00);
      hi_scales = _mm256_permute2x128_si256(sc16, sc16, 0x11);
      d = f16(blk + 208);
    } else {
      uint32_t u[3];
      memcpy(u, blk + 4, 12);
      uint32_t packed[4] = {u[0] & 0x3f3f3f3fu, (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4),
                            u[1] & 0x3f3f3f3fu, ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4)};
      __m128i sm = _mm_loadu_si128((const __m128i *)packed);  // scales 0-7, then minimums 0-7
      __m128i s = _mm_cvtepu8_epi16(sm);
      lo_scales = hi_scales = _mm256_broadcastsi128_si256(s);
      mins = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
      d = f16(blk);
    }
#define KQ_GROUP(j)                                                                                          \
  {                                                                                                          \
    __m256i w = group_values_avx2(type, blk, j);                                                             \
    __m256i scale;                                                                                           \
    if (type == T_Q6_K)  /* values 0-15 take scale 2j, 16-31 scale 2j + 1 */                                 \
      scale = _mm256_shuffle_epi8((j) < 4 ? lo_scales : hi_scales,                                           \
                                  _mm256_setr_epi8(LANE_BCAST16(2 * (j) % 8), LANE_BCAST16((2 * (j) + 1) % 8))); \
    else                                                                                                     \
      scale = _mm256_shuffle_epi8(lo_scales, _mm256_setr_epi8(LANE_BCAST16(j), LANE_BCAST16(j)));            \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                                                   \
      __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + 256 * (size_t)b + 32 * (j)));      \
      sumi[r] = dpwssd_acc(sumi[r], _mm256_maddubs_epi16(w, x), scale);                                      \
    }                                                                                                        \
  }
    KQ_GROUP(0) KQ_GROUP(1) KQ_GROUP(2) KQ_GROUP(3) KQ_GROUP(4) KQ_GROUP(5) KQ_GROUP(6) KQ_GROUP(7)
#undef KQ_GROUP
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      float dx = xd[(size_t)8 * b * ldt + r];
      if (type == T_Q6_K) {  // values are d * scale * (q - 32)
        __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)(ks16 + (size_t)r * (k / 16) + 16 * b)));
        sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 5));
      } else {  // d * scale * q - dmin * min
        __m128i mr = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(ks32 + (size_t)r * (k / 32) + 8 * b)));
        accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(mr), _mm_set1_ps(-f16(blk + 2) * dx), accm[r]);
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_set1_ps(d * dx), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
    __m128 s = _mm_add_ps(accm[r], _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[r] = _mm_cvtss_f32(s);
  }
}

#define KTILE_CASE(T, MR) \
  case T: ktile_dot(T, wrow, sb0, sbs, xq, k, xd, ldt, ks16, ks32, MR, out); break;
#define KTILE_FN(MR)                                                                                      \
  static void ktile_dot_##MR(int type, const uint8_t *wrow, int sb0, int sbs, const int8_t *xq, int k,     \
                             const float *xd, int ldt, const int16_t *ks16, const int16_t *ks32, float *out) { \
    switch (type) { KTILE_CASE(T_Q4_K, MR) KTILE_CASE(T_Q5_K, MR) KTILE_CASE(T_Q6_K, MR) }               \
  }
KTILE_FN(1)
KTILE_FN(2)
KTILE_FN(4)
#endif

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

#if defined(__AVX2__)
static inline __m256i dpbusd_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

#define ROWS8_GROUP_BYTES 416  // interleave8's bytes a group: 8 rows' 32 values, sums, scales, half sums

// Group j of block blk (group g of the window) against 8 activation rows at once. interleave8 laid
// the rows out so that one in-lane shuffle of the group's values serves two chunks of 4 values (c in
// the low 128 bits, c + 4 in the high ones) and one integer multiply-add meets them with 4 rows each:
// per group 4 shuffles and 8 multiply-adds give the 8 rows' integer dot products of both halves, and
// one float multiply-add serves all 8 rows (lane r = row r).
INLINE void rows8_group(int type, const uint8_t *blk, int j, float a0, float a1, float b0, float b1,
                        const int8_t *xi, size_t block_stride, const int NB, __m256 *acc, __m256 *offs) {
  __m256i wv = group_values_avx2(type, blk, j);
#if HAVE_VNNI
  // Q8_0's signed values as unsigned ones (w + 128); the 128 * sum(x) this adds is taken off below
  const int offset_q8 = 1;
  if (signed_values(type)) wv = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));
#else
  // without VNNI the byte products are summed in pairs into saturating int16: 255 * 127 * 2 would
  // overflow, so Q8_0 moves its signs onto x instead (|w| <= 128)
  const int offset_q8 = 0;
#endif
  // the NB blocks of 8 rows share the unpacked values
#pragma GCC unroll 2
  for (int nb = 0; nb < NB; nb++) {
    const int8_t *x = xi + nb * block_stride;
    const float *xd = (const float *)(x + 288), *s0 = xd + 8, *s1 = xd + 16;
    __m256i lo4 = _mm256_setzero_si256(), hi4 = _mm256_setzero_si256();  // rows 0-3, rows 4-7
#define ROWS8_CHUNK(c, imm)                                                          \
  {                                                                                  \
    __m256i wc = _mm256_shuffle_epi32(wv, imm);                                      \
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + 32 * c));                    \
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c));              \
    if (signed_values(type) && !offset_q8) {                                         \
      x0 = _mm256_sign_epi8(x0, wc), x1 = _mm256_sign_epi8(x1, wc);                  \
      wc = _mm256_sign_epi8(wc, wc);                                                 \
    }                                                                                \
    lo4 = dpbusd_acc(lo4, wc, x0);                                                   \
    hi4 = dpbusd_acc(hi4, wc, x1);                                                   \
  }
    ROWS8_CHUNK(0, 0x00) ROWS8_CHUNK(1, 0x55) ROWS8_CHUNK(2, 0xAA) ROWS8_CHUNK(3, 0xFF)
#undef ROWS8_CHUNK
    // lanes: lo4 = rows 0-3 (first half of the values) | rows 0-3 (second half), hi4 likewise rows 4-7
    __m256i first = _mm256_permute2x128_si256(lo4, hi4, 0x20), second = _mm256_permute2x128_si256(lo4, hi4, 0x31);
    __m256 dx = _mm256_loadu_ps(xd);
    // Types whose values are a * (q - c) take their offset in the integers, exactly: the dot product
    // less c times the rows' sums (stored negated); the others add b * the half sums in floats.
    const __m256i *neg_sums = (const __m256i *)(x + 256), *neg_first_sums = (const __m256i *)(x + 384);
    if (half_scales(type)) {  // a scale per half
      if (type != T_Q2_K) {  // Q6_K's offset 32, Q3_K's 4 (Q2_K has minimums)
        const int shift = type == T_Q6_K ? 5 : 2;
        __m256i s_first = _mm256_loadu_si256(neg_first_sums);
        __m256i s_second = _mm256_sub_epi32(_mm256_loadu_si256(neg_sums), s_first);
        first = _mm256_add_epi32(first, _mm256_slli_epi32(s_first, shift));
        second = _mm256_add_epi32(second, _mm256_slli_epi32(s_second, shift));
      }
      acc[nb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(_mm256_set1_ps(a0), dx), acc[nb]);
      acc[nb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(_mm256_set1_ps(a1), dx), acc[nb]);
    } else {
      __m256i dot = _mm256_add_epi32(first, second);
      if (signed_values(type) && offset_q8) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_loadu_si256(neg_sums), 7));
      if (type == T_Q5_0) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_loadu_si256(neg_sums), 4));
      if (type == T_Q4_0) dot = _mm256_add_epi32(dot, _mm256_slli_epi32(_mm256_loadu_si256(neg_sums), 3));
      acc[nb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(a0), dx), acc[nb]);
    }
    if (type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K || type == T_Q2_K)  // minimums
      offs[nb] = _mm256_fmadd_ps(_mm256_set1_ps(b1), _mm256_loadu_ps(s1),
                                 _mm256_fmadd_ps(_mm256_set1_ps(b0), _mm256_loadu_ps(s0), offs[nb]));
  }
}

// One K-quant super-block against NB blocks of 8 activation rows whose activations share one scale
// over it (span 256): each group's integer products are multiplied by the group's integer scale and
// summed in int32 over the super-block, the minimums (Q4_K/Q5_K) likewise with the rows' group sums,
// and one float multiply-add a block of rows takes the super-block (rows8_group has three a group).
INLINE void rows8_superblock(int type, const uint8_t *blk, const int8_t *xi, size_t block_stride, const int NB,
                             __m256 *acc) {
  int32_t sc[16], mn[8];
  float d, dmin = 0.f;
  if (type == T_Q6_K) {
    for (int i = 0; i < 16; i++) sc[i] = ((const int8_t *)blk)[192 + i];
    d = f16(blk + 208);
  } else {
    for (int j = 0; j < 8; j++) scale_min_k4(j, blk + 4, &sc[j], &mn[j]);
    d = f16(blk), dmin = f16(blk + 2);
  }
  __m256i lo_sum[2], hi_sum[2], min_sum[2];  // lanes as rows8_group's lo4/hi4; min_sum: rows 0-7
  for (int nb = 0; nb < NB; nb++) lo_sum[nb] = hi_sum[nb] = min_sum[nb] = _mm256_setzero_si256();
#pragma GCC unroll 8
  for (int j = 0; j < 8; j++) {
    __m256i wv = group_values_avx2(type, blk, j);
    // Q6_K: the group's halves have their own scales (lanes 0-3: first half, 4-7: second)
    __m256i scale = type == T_Q6_K ? _mm256_setr_epi32(sc[2 * j], sc[2 * j], sc[2 * j], sc[2 * j], sc[2 * j + 1],
                                                       sc[2 * j + 1], sc[2 * j + 1], sc[2 * j + 1])
                                   : _mm256_set1_epi32(sc[j]);
#pragma GCC unroll 2
    for (int nb = 0; nb < NB; nb++) {
      const int8_t *x = xi + nb * block_stride + (size_t)j * ROWS8_GROUP_BYTES;
      __m256i lo4 = _mm256_setzero_si256(), hi4 = _mm256_setzero_si256();
#define SB_CHUNK(c, imm)                                                          \
  {                                                                               \
    __m256i wc = _mm256_shuffle_epi32(wv, imm);                                   \
    lo4 = dpbusd_acc(lo4, wc, _mm256_loadu_si256((const __m256i *)(x + 32 * c)));    \
    hi4 = dpbusd_acc(hi4, wc, _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c))); \
  }
      SB_CHUNK(0, 0x00) SB_CHUNK(1, 0x55) SB_CHUNK(2, 0xAA) SB_CHUNK(3, 0xFF)
#undef SB_CHUNK
      if (type == T_Q6_K) {  // values q - 32: 32 times the halves' sums (stored negated) in the integers
        __m256i neg = _mm256_loadu_si256((const __m256i *)(x + 256));
        __m256i neg_first = _mm256_loadu_si256((const __m256i *)(x + 384));
        __m256i neg_second = _mm256_sub_epi32(neg, neg_first);
        // the rows8 lane order: rows 0-3 (first half | second half), then rows 4-7
        lo4 = _mm256_add_epi32(lo4, _mm256_slli_epi32(_mm256_permute2x128_si256(neg_first, neg_second, 0x20), 5));
        hi4 = _mm256_add_epi32(hi4, _mm256_slli_epi32(_mm256_permute2x128_si256(neg_first, neg_second, 0x31), 5));
      } else {
        min_sum[nb] = _mm256_add_epi32(min_sum[nb], _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(x + 256)),
                                                                       _mm256_set1_epi32(mn[j])));
      }
      lo_sum[nb] = _mm256_add_epi32(lo_sum[nb], _mm256_mullo_epi32(lo4, scale));
      hi_sum[nb] = _mm256_add_epi32(hi_sum[nb], _mm256_mullo_epi32(hi4, scale));
    }
  }
  for (int nb = 0; nb < NB; nb++) {
    const int8_t *x = xi + nb * block_stride;
    __m256 dx = _mm256_loadu_ps((const float *)(x + 288));  // the 8 rows' scale of this super-block
    __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(lo_sum[nb], hi_sum[nb], 0x20),
                                   _mm256_permute2x128_si256(lo_sum[nb], hi_sum[nb], 0x31));
    acc[nb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(_mm256_set1_ps(d), dx), acc[nb]);
    if (type != T_Q6_K)  // values d * scale * q - dmin * min: + dmin * min * (negated sums)
      acc[nb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_sum[nb]), _mm256_mul_ps(_mm256_set1_ps(dmin), dx), acc[nb]);
  }
}

// One weight row against NB blocks of 8 activation rows interleaved by interleave8 (xi: the first
// block, the next one block_stride bytes on): out[8 nb + r].
INLINE void rows8_dot(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xi, size_t block_stride,
                      const int NB, int span, float *out) {
  __m256 even[2], odd[2], offs[2];
  for (int nb = 0; nb < NB; nb++) even[nb] = odd[nb] = offs[nb] = _mm256_setzero_ps();
  size_t bb = block_bytes(type);
  if (span == 256 && (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) && g0 % 8 == 0 && groups % 8 == 0) {
    for (int b = 0; b < groups / 8; b++)
      rows8_superblock(type, wrow + (size_t)(g0 / 8 + b) * bb, xi + (size_t)(8 * b) * ROWS8_GROUP_BYTES,
                       block_stride, NB, even);
  } else if (super_block(type) && g0 % 8 == 0 && groups % 8 == 0) {
    for (int b = 0; b < groups / 8; b++) {
      const uint8_t *blk = wrow + (size_t)(g0 / 8 + b) * bb;
      float A0[8], A1[8], B0[8], B1[8];
      super_block_scales(type, blk, A0, A1, B0, B1);
#define SB_GROUP(j, acc)                                                                                     \
  rows8_group(type, blk, j, A0[j], A1[j], B0[j], B1[j], xi + (size_t)(8 * b + j) * ROWS8_GROUP_BYTES, block_stride, \
              NB, acc, offs);
      SB_GROUP(0, even) SB_GROUP(1, odd) SB_GROUP(2, even) SB_GROUP(3, odd)
      SB_GROUP(4, even) SB_GROUP(5, odd) SB_GROUP(6, even) SB_GROUP(7, odd)
#undef SB_GROUP
    }
  } else {
    const unsigned per_block = super_block(type) ? 8 : 1;
#define ROWS8_GROUP(g, acc)                                                                                  \
  {                                                                                                        \
    unsigned gg = (unsigned)(g0 + (g)), j = gg % per_block;                                                 \
    const uint8_t *blk = wrow + (size_t)(gg / per_block) * bb;                                             \
    float a0, a1, b0, b1;                                                                                  \
    group_scales(type, blk, (int)j, &a0, &a1, &b0, &b1);                                                   \
    rows8_group(type, blk, (int)j, a0, a1, b0, b1, xi + (size_t)(g) * ROWS8_GROUP_BYTES, block_stride, NB, acc, offs); \
  }
    int g = 0;
    for (; g + 1 < groups; g += 2) {  // even and odd groups into their own accumulators (in registers)
      ROWS8_GROUP(g, even)
      ROWS8_GROUP(g + 1, odd)
    }
    if (g < groups) ROWS8_GROUP(g, even)
#undef ROWS8_GROUP
  }
  for (int nb = 0; nb < NB; nb++) _mm256_storeu_ps(out + 8 * nb, _mm256_add_ps(_mm256_add_ps(even[nb], odd[nb]), offs[nb]));
}

#define ROWS8_CASE(T)                                                     \
  case T:                                                                 \
    if (blocks == 2) rows8_dot(T, wrow, g0, groups, xi, block_stride, 2, span, out); \
    else rows8_dot(T, wrow, g0, groups, xi, block_stride, 1, span, out);         \
    break;
// blocks: 1 or 2 blocks of 8 rows (16 rows share each unpacked weight group); span: the activations'
// scale span (dc_gguf_quantize_x)
static void rows8_dot_any(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xi, int blocks,
                          int span, float *out) {
  size_t block_stride = (size_t)groups * ROWS8_GROUP_BYTES;
  switch (type) {
    ROWS8_CASE(T_Q4_0) ROWS8_CASE(T_Q4_1) ROWS8_CASE(T_Q5_0) ROWS8_CASE(T_Q5_1)
    ROWS8_CASE(T_Q8_0) ROWS8_CASE(T_Q4_K) ROWS8_CASE(T_Q5_K) ROWS8_CASE(T_Q6_K)
    ROWS8_CASE(T_Q2_K) ROWS8_CASE(T_Q3_K) ROWS8_CASE(T_IQ4_NL) ROWS8_CASE(T_IQ4_XS)
  }
}

// xq's rows in blocks of 8 (the last one padded with zero rows), laid out for rows8_group: a group's
// 32 bytes at quad q (rows 4q..4q+3) and chunk c (0-3) hold, in the low 16 bytes, those rows' values
// 4c..4c+3 and, in the high 16, their values 16+4c..16+4c+3 (4 bytes a row, rows in order); then the
// 8 rows' negated sums of the group's values (int32), their scales xd and half sums xs (float), and
// the negated sums of the group's first 16 values (int32).
static void interleave8(const int8_t *xq, const float *xd, const float *xs, int m, int k, int8_t *xi) {
  int groups = k / 32, blocks = (m + 7) / 8;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) if ((size_t)m * k >= 1 << 16)
  for (int b = 0; b < blocks; b++) {
    int rows = m - 8 * b < 8 ? m - 8 * b : 8;
    for (int g = 0; g < groups; g++) {
      int8_t *out = xi + ((size_t)b * groups + g) * ROWS8_GROUP_BYTES;
      __m256i v[8];
      int32_t sums[8], first_sums[8];  // negated: of the group's values, of its first 16
      float scales[24];  // xd, then the halves' sums
      for (int r = 0; r < 8; r++) {
        if (r < rows) {
          size_t row = (size_t)(8 * b + r);
          v[r] = _mm256_loadu_si256((const __m256i *)(xq + row * k + 32 * g));
          __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v[r]), ones16);
          __m128i s_first = _mm256_castsi256_si128(pairs);
          __m128i s4 = _mm_add_epi32(s_first, _mm256_extracti128_si256(pairs, 1));
          s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
          s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
          s_first = _mm_add_epi32(s_first, _mm_shuffle_epi32(s_first, 0x4E));
          s_first = _mm_add_epi32(s_first, _mm_shuffle_epi32(s_first, 0xB1));
          sums[r] = -_mm_cvtsi128_si32(s4);
          first_sums[r] = -_mm_cvtsi128_si32(s_first);
          scales[r] = xd[(size_t)g * m + row];
          scales[8 + r] = xs[(size_t)(2 * g) * m + row];
          scales[16 + r] = xs[(size_t)(2 * g + 1) * m + row];
        } else {  // padding: a zero row
          v[r] = _mm256_setzero_si256();
          sums[r] = first_sums[r] = 0;
          scales[r] = scales[8 + r] = scales[16 + r] = 0.f;
        }
      }
      // a 4x4 transpose of 4-byte chunks within each 128-bit lane, per quad of rows
      for (int q = 0; q < 2; q++) {
        __m256i t0 = _mm256_unpacklo_epi32(v[4 * q], v[4 * q + 1]), t1 = _mm256_unpackhi_epi32(v[4 * q], v[4 * q + 1]);
        __m256i t2 = _mm256_unpacklo_epi32(v[4 * q + 2], v[4 * q + 3]), t3 = _mm256_unpackhi_epi32(v[4 * q + 2], v[4 * q + 3]);
        __m256i *o = (__m256i *)(out + 128 * q);
        _mm256_storeu_si256(o, _mm256_unpacklo_epi64(t0, t2));
        _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi64(t0, t2));
        _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi64(t1, t3));
        _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi64(t1, t3));
      }
      memcpy(out + 256, sums, 32);
      memcpy(out + 288, scales, 96);
      memcpy(out + 384, first_sums, 32);
    }
  }
}
#endif

// Activation rows a pass takes: their int8 values (64 x k bytes) stay in the core's L2 cache while
// every weight row streams past them once.
#define ROW_PASS 64
// Weight rows that take each block of activation rows in turn (see dc_gguf_matmul_parts).
#define ROWS8_WEIGHTS 8

// The values a scale of the activations spans for a product with these parts: 256 where every part
// is a 256-value super-block type read from a super-block boundary (k0 NULL: whole rows) and k is
// whole super-blocks, so the super-block kernels sum each super-block in integers; else 32.
int dc_gguf_activation_span(int parts, const int *types, const int *k0, int k) {
  if (k % 256 != 0) return 32;
  for (int p = 0; p < parts; p++)
    if (block_values(types[p]) != 256 || block_bytes(types[p]) == 0 || (k0 && k0[p] % 256 != 0)) return 32;
  return 256;
}

// x [m, k] -> the int8 activations every product with a k-wide weight then reads: xq m*k bytes,
// xd m*k/32 floats, xs m*k/16 floats; one scale per span values (dc_gguf_activation_span's answer
// for the weight). k must be a multiple of 32 (and of the span).
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs, int span) {
  quantize_rows(x, m, k, span == 256 && k % 256 == 0 ? 256 : 32, xq, xd, xs);
}

// y[:, 0:n] = x . W^T (+ bias) with x [m, k] quantized by dc_gguf_quantize_x with `span` and W the rows
// of `parts` source tensors in turn (a fused q/k/v or gate/up layer: each tensor of its own type; n is
// their rows' sum; all parts in one thread team). Part p: type types[p], rows[p] rows of k_full[p]
// values at w[p], of which inputs [k0[p], k0[p] + k) are read (a tensor-parallel rank's slice of a
// row-split weight: k0 and k multiples of 32, so a 256-value K-quant block splits along its 32-value
// groups, whose integer products are then exactly those of the whole row); k_full/k0 NULL: whole
// rows. bias[p]: its rows' biases or NULL (bias NULL: none at all). y's rows are ldy floats apart.
// Returns 0, or -1 for an unknown type or widths that are not whole blocks and groups.
int dc_gguf_matmul_parts(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                         const int *rows, const float *const *bias, const int8_t *xq, const float *xd,
                         const float *xs, float *y, int m, int k, int ldy, int span) {
  enum { MAX_PARTS = 8 };
  size_t row_bytes[MAX_PARTS];
  int first_group[MAX_PARTS], n = 0;
  if (parts < 1 || parts > MAX_PARTS || k % 32 != 0) return -1;
  for (int p = 0; p < parts; p++) {
    int qk = block_values(types[p]), full = k_full ? k_full[p] : k, start = k0 ? k0[p] : 0;
    size_t bb = block_bytes(types[p]);
    if (bb == 0 || float16_type(types[p]) || full % qk != 0 || start % 32 != 0 || start + k > full || rows[p] < 0) return -1;
    row_bytes[p] = (size_t)(full / qk) * bb;
    first_group[p] = start / 32;
    n += rows[p];
  }
  int groups = k / 32;
#if defined(__AVX2__)
  int8_t *xi = NULL;  // 8 rows or more: blocks of 8, interleaved for rows8_dot
  if (m >= 8) {
    xi = malloc((size_t)((m + 7) / 8) * groups * ROWS8_GROUP_BYTES);
    if (xi) interleave8(xq, xd, xs, m, k, xi);
  }
  if (xi) {
    // Weight rows in chunks of ROWS8_WEIGHTS, each 16-row block of activations met by the whole chunk
    // in turn: a block (k/32 groups x 416 bytes each: 12 KB at k = 896) is then read from L1 by every
    // row of the chunk, not from L2 once a weight row.
    size_t block_stride = (size_t)groups * ROWS8_GROUP_BYTES;
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < n; i0 += ROWS8_WEIGHTS) {
      int i1 = n - i0 < ROWS8_WEIGHTS ? n : i0 + ROWS8_WEIGHTS;
      for (int r0 = 0; r0 < m; r0 += 16) {
        int left = m - r0, blocks = left > 8 ? 2 : 1, rows_here = left < 8 * blocks ? left : 8 * blocks;
        for (int i = i0; i < i1; i++) {
          int p = 0, row = i;
          while (row >= rows[p]) row -= rows[p++];
          float out16[16], b = bias && bias[p] ? bias[p][row] : 0.f;
          rows8_dot_any(types[p], w[p] + (size_t)row * row_bytes[p], first_group[p], groups,
                        xi + (size_t)(r0 / 8) * block_stride, blocks, span, out16);
          for (int r = 0; r < rows_here; r++) y[(size_t)(r0 + r) * ldy + i] = out16[r] + b;
        }
      }
    }
    free(xi);
    return 0;
  }
#endif
#if defined(__AVX2__)
  // activations with a scale a super-block, few rows: K-quant rows take the super-block kernels
  int16_t *ks16 = NULL, *ks32 = NULL;
  if (span == 256 && k % 256 == 0 && m <= ROW_PASS) {
    ks16 = malloc(sizeof(int16_t) * (size_t)m * (k / 16 + k / 32));
    if (ks16) {
      ks32 = ks16 + (size_t)m * (k / 16);
      activation_sums(xq, m, k, ks16, ks32);
    }
  }
#endif
  for (int p0 = 0; p0 < m; p0 += ROW_PASS) {
    int p1 = m - p0 < ROW_PASS ? m : p0 + ROW_PASS;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
      int p = 0, row = i;
      while (row >= rows[p]) row -= rows[p++];
      int type = types[p], g0 = first_group[p];
      const uint8_t *wrow = w[p] + (size_t)row * row_bytes[p];
      float b = bias && bias[p] ? bias[p][row] : 0.f;
      float out[MAX_TILE];
      for (int r0 = p0; r0 < p1;) {
        int left = p1 - r0, mr = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const int8_t *xr = xq + (size_t)r0 * k;
        const float *dr = xd + r0, *sr = xs + r0;
#if defined(__AVX2__)
        if (ks16 && (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) && g0 % 8 == 0) {
          const int16_t *s16 = ks16 + (size_t)r0 * (k / 16), *s32 = ks32 + (size_t)r0 * (k / 32);
          switch (mr) {
            case 4: ktile_dot_4(type, wrow, g0 / 8, groups / 8, xr, k, dr, m, s16, s32, out); break;
            case 2: ktile_dot_2(type, wrow, g0 / 8, groups / 8, xr, k, dr, m, s16, s32, out); break;
            default: ktile_dot_1(type, wrow, g0 / 8, groups / 8, xr, k, dr, m, s16, s32, out);
          }
          for (int r = 0; r < mr; r++) y[(size_t)(r0 + r) * ldy + i] = out[r] + b;
          r0 += mr;
          continue;
        }
#endif
        switch (mr) {
          case 4: tile_dot_4(type, wrow, g0, groups, xr, k, dr, sr, m, out); break;
          case 2: tile_dot_2(type, wrow, g0, groups, xr, k, dr, sr, m, out); break;
          default: tile_dot_1(type, wrow, g0, groups, xr, k, dr, sr, m, out);
        }
        for (int r = 0; r < mr; r++) y[(size_t)(r0 + r) * ldy + i] = out[r] + b;
        r0 += mr;
      }
    }
  }
#if defined(__AVX2__)
  free(ks16);
#endif
  return 0;
}

// ---------------------------------------------------------------- 16-bit float weights (F16, BF16)
//
// y = x . W^T with W's rows kept as the file's 16-bit floats and float products: F16 converted by
// F16C, BF16 widened by a shift, both multiplied with the float32 activations; where the CPU has
// AVX-512 BF16, BF16 rows instead meet the activations rounded to bf16 (once a call) in `vdpbf16ps`,
// 32 products an instruction (llama.cpp rounds them so too). Each row's sum is formed in the same
// order whatever the tile height and the batch, so here a token's result is bit for bit the same
// in every batch.

static inline float half_value(int type, const uint8_t *p) {
  if (type == T_BF16) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
  }
  return f16(p);
}

#if defined(__AVX512BF16__)
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

#if defined(__AVX512F__)
INLINE __m512 load16_ps(int type, const uint8_t *p) {
  __m256i h = _mm256_loadu_si256((const __m256i *)p);
  if (type == T_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
INLINE __m256 load8_ps(int type, const uint8_t *p) {
  __m128i h = _mm_loadu_si128((const __m128i *)p);
  if (type == T_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}
#endif

// One 16-bit weight row (groups x 32 values at wrow) against MR activation rows (x: float32, rows k
// apart; xb: the same rounded to bf16, for BF16 rows where the CPU has vdpbf16ps): out[r].
INLINE void row16_dot(int type, const uint8_t *wrow, int groups, const float *x, const uint16_t *xb, int k,
                      const int MR, float *out) {
#if HAVE_DPBF16
  if (type == T_BF16) {
    __m512 acc[MAX_TILE];
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
      __m512i wv = _mm512_loadu_si512((const void *)(wrow + 64 * (size_t)g));
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) {
        __m512i xv = _mm512_loadu_si512((const void *)(xb + (size_t)r * k + 32 * (size_t)g));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)xv);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
    return;
  }
#else
  (void)xb;
#endif
#if defined(__AVX512F__)
  __m512 a0[MAX_TILE], a1[MAX_TILE];  // two chains a row: one would be bound by the adds' latency
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int g = 0; g < groups; g++) {
    __m512 w0 = load16_ps(type, wrow + 64 * (size_t)g), w1 = load16_ps(type, wrow + 64 * (size_t)g + 32);
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
      const float *xr = x + (size_t)r * k + 32 * (size_t)g;
      a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __m256 a0[MAX_TILE], a1[MAX_TILE];
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int g = 0; g < groups; g++) {
    const uint8_t *wg = wrow + 64 * (size_t)g;
    __m256 w0 = load8_ps(type, wg), w1 = load8_ps(type, wg + 16), w2 = load8_ps(type, wg + 32),
           w3 = load8_ps(type, wg + 48);
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
      const float *xr = x + (size_t)r * k + 32 * (size_t)g;
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), a1[r]);
      a0[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), a0[r]);
      a1[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), a1[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
#else
  float acc[MAX_TILE];
  for (int r = 0; r < MR; r++) acc[r] = 0.f;
  for (int g = 0; g < groups; g++) {
    float wg[32];
    for (int i = 0; i < 32; i++) wg[i] = half_value(type, wrow + 64 * (size_t)g + 2 * i);
    for (int r = 0; r < MR; r++) {
      const float *xr = x + (size_t)r * k + 32 * (size_t)g;
      float s = 0.f;
      for (int i = 0; i < 32; i++) s += wg[i] * xr[i];
      acc[r] += s;
    }
  }
  for (int r = 0; r < MR; r++) out[r] = acc[r];
#endif
}

#define ROW16_FN(MR)                                                                                          \
  static void row16_dot_##MR(int type, const uint8_t *wrow, int groups, const float *x, const uint16_t *xb,   \
                             int k, float *out) {                                                            \
    if (type == T_BF16) row16_dot(T_BF16, wrow, groups, x, xb, k, MR, out);                                   \
    else row16_dot(T_F16, wrow, groups, x, xb, k, MR, out);                                                   \
  }
ROW16_FN(1)
ROW16_FN(2)
ROW16_FN(4)

// y[:, 0:n] = x . W^T (+ bias) for `parts` 16-bit tensors (F16 or BF16), x [m, k] float32; the other
// arguments as dc_gguf_matmul_parts' (rows of k_full values, inputs [k0, k0 + k) read; k and k0
// multiples of 32). Returns 0, -1 for a type or widths it does not take, -2 without memory.
int dc_gguf_matmul16_parts(int parts, const int *types, const uint8_t *const *w, const int *k_full, const int *k0,
                           const int *rows, const float *const *bias, const float *x, float *y, int m, int k,
                           int ldy) {
  enum { MAX_PARTS = 8 };
  size_t row_bytes[MAX_PARTS], start_bytes[MAX_PARTS];
  int n = 0, any_bf16 = 0;
  if (parts < 1 || parts > MAX_PARTS || k % 32 != 0) return -1;
  for (int p = 0; p < parts; p++) {
    int full = k_full ? k_full[p] : k, start = k0 ? k0[p] : 0;
    if (!float16_type(types[p]) || full % 32 != 0 || start % 32 != 0 || start + k > full || rows[p] < 0) return -1;
    row_bytes[p] = 2 * (size_t)full, start_bytes[p] = 2 * (size_t)start;
    any_bf16 |= types[p] == T_BF16;
    n += rows[p];
  }
  int groups = k / 32;
  uint16_t *xb = NULL;
#if HAVE_DPBF16
  if (any_bf16 && m > 0) {
    xb = malloc((size_t)m * k * 2);
    if (!xb) return -2;
    for (size_t i = 0; i < (size_t)m * k; i += 32) {
      __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
      _mm512_storeu_si512((void *)(xb + i), (__m512i)b);
    }
  }
#else
  (void)any_bf16;
#endif
  for (int p0 = 0; p0 < m; p0 += ROW_PASS) {
    int p1 = m - p0 < ROW_PASS ? m : p0 + ROW_PASS;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
      int p = 0, row = i;
      while (row >= rows[p]) row -= rows[p++];
      const uint8_t *wrow = w[p] + (size_t)row * row_bytes[p] + start_bytes[p];
      float b = bias && bias[p] ? bias[p][row] : 0.f, out[MAX_TILE];
      for (int r0 = p0; r0 < p1;) {
        int left = p1 - r0, mr = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float *xr = x + (size_t)r0 * k;
        const uint16_t *xbr = xb ? xb + (size_t)r0 * k : NULL;
        switch (mr) {
          case 4: row16_dot_4(types[p], wrow, groups, xr, xbr, k, out); break;
          case 2: row16_dot_2(types[p], wrow, groups, xr, xbr, k, out); break;
          default: row16_dot_1(types[p], wrow, groups, xr, xbr, k, out);
        }
        for (int r = 0; r < mr; r++) y[(size_t)(r0 + r) * ldy + i] = out[r] + b;
        r0 += mr;
      }
    }
  }
  free(xb);
  return 0;
}

INLINE void unpack_f32(int type, const uint8_t *blk, int j, f32x16 *v0, f32x16 *v1) {
#if defined(__AVX2__)
  float a0, a1, b0, b1;
  group_scales(type, blk, j, &a0, &a1, &b0, &b1);
  __m256i w = group_values_avx2(type, blk, j);
  __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
  __m256 f[4];
  __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; i++) {
    __m256i wide = signed_values(type) ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]);
    f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(i < 2 ? a0 : a1), _mm256_set1_ps(i < 2 ? b0 : b1));
  }
  memcpy(v0, f, 64);
  memcpy(v1, f + 2, 64);
#else
  group q;
  unpack(type, blk, j, &q);
  if (signed_values(type)) {
    *v0 = __builtin_convertvector((i8x16)q.h0, f32x16), *v1 = __builtin_convertvector((i8x16)q.h1, f32x16);
  } else {
    *v0 = __builtin_convertvector(q.h0, f32x16), *v1 = __builtin_convertvector(q.h1, f32x16);
  }
  *v0 = *v0 * q.a0 + q.b0;
  *v1 = *v1 * q.a1 + q.b1;
#endif
}

// One weight row of k values as float32: the reference dequantization (the same as gguf-py's and
// llama.cpp's).
static void dequantize_row(int type, const uint8_t *wrow, int k, float *out) {
  if (float16_type(type)) {
    for (int i = 0; i < k; i++) out[i] = half_value(type, wrow + 2 * (size_t)i);
    return;
  }
  int gpb = block_values(type) / 32;
  size_t bb = block_bytes(type);
  for (int g = 0; g < k / 32; g++) {
    f32x16 v0, v1;
    unpack_f32(type, wrow + (size_t)(g / gpb) * bb, g % gpb, &v0, &v1);
    memcpy(out + 32 * g, &v0, 64);
    memcpy(out + 32 * g + 16, &v1, 64);
  }
}

// Weight rows [row0, row0 + rows) as float32 into out [rows, k] (float fallbacks, tests).
int dc_gguf_dequantize(int type, const uint8_t *w, int row0, int rows, int k, float *out) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k % qk != 0) return -1;
  size_t row_bytes = (size_t)(k / qk) * bb;
#pragma omp parallel for schedule(static)
  for (int i = 0; i < rows; i++) dequantize_row(type, w + (size_t)(row0 + i) * row_bytes, k, out + (size_t)i * k);
  return 0;
}

// Rows ids[0..n) of a GGUF weight [*, k] as float32 out [n, k]: an embedding lookup that dequantizes
// only the rows it reads. Returns -1 for a type or width the kernels lack.
int dc_gguf_dequantize_rows(int type, const uint8_t *w, const int64_t *ids, int n, int k, float *out) {
  int qk = block_values(type);
  size_t bb = block_bytes(type);
  if (bb == 0 || k % qk != 0) return -1;
  size_t row_bytes = (size_t)(k / qk) * bb;
#pragma omp parallel for schedule(static) if (n >= 64)
  for (int i = 0; i < n; i++) dequantize_row(type, w + (size_t)ids[i] * row_bytes, k, out + (size_t)i * k);
  return 0;
}
