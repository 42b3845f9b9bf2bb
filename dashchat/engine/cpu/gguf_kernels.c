// GGUF quantized linear layers on the CPU, reading the weights' blocks as the file ships them.
// Built with kernels.c into one library by dashchat/engine/cpu/kernels.py (-march=native, torch's
// OpenMP runtime).
//
// y[m, n] = x[m, k] . W^T, W given as n rows of k/QK blocks of one GGUF type (Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1, IQ4_NL: 32 values a block; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS: 256 values a
// super-block). F16 and BF16 rows take float products of their own (dc_gguf_matmul16_parts).
//
// As llama.cpp does, the activations are first quantized to int8 per block of 32 (or 256) values (one
// float scale each, plus the integer sums of each 16-value half, which carry the weights' offsets and
// minimums), so the inner product is an integer one: every 32 weight values are unpacked into bytes
// and multiplied with the signed activation bytes by
//   - AVX-512 VNNI `vpdpbusd` on 256-bit vectors where the CPU has AVX512VL+VNNI (or AVX-VNNI),
//   - AVX2 `vpmaddubsw` + `vpmaddwd` otherwise,
//   - a plain C loop on anything else.
// The library is built with -march=native, so the choice is made by the compiler for the CPU it
// runs on (the build is keyed by /proc/cpuinfo's flags: a machine without an extension never gets
// code that uses it).
//
// BATCH INVARIANT: an output's bits do not depend on the number of rows in the product, on the row's
// place among them, or on which tile computed it. Every path forms the same exact integers per group
// (or super-block) and then the same float operations in the same order ("one arithmetic for every
// batch" below states them); each build (AVX-512 VNNI, AVX2, portable C) is invariant on its own. So
// the fastest tile can be chosen per batch size, and a token's logits are the same in a cold prefill, a
// prefix-cache hit or a speculative verify. Q8_0, IQ4_NL and IQ4_XS values are signed bytes (IQ4's
// 4-bit indices looked up in their 16 non-linear values by one byte shuffle), the others unsigned.
#pragma GCC diagnostic ignored "-Wpsabi" // static helpers only: no ABI crosses the library boundary
#include <math.h>
#include <omp.h>
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

// A type id with this bit (x8_type: Q2_K-Q6_K, IQ4_XS, the 32-value types): the tensor's rows are interleaved
// in groups of 8, byte by byte (x8_copy: 4 values of 8 rows side by side, so one vector holds them,
// lane = row); rows past the last whole group keep the file's layout. A group occupies the bytes its 8
// rows did, so dc_gguf_interleave rearranges a tensor in place. Products of fewer than X8_MAX_ROWS
// activation rows (and Q4_K's at any size, where the build has its prefill tile) read each group as one
// sequential stream, 8 output rows at once, 1-8 activation rows at a time (x8_tile_*, q4k_x8_prefill);
// the other readers (bigger batches of the other types: the 8-row blocks, a rank's window off
// super-block boundaries, dequantization, the portable build) unpack a group to the file's layout first
// (unit_rows).
#define ROWS8_LAYOUT 0x100
#define Q4K_X8_BYTES (8 * 144)  // a super-block of a Q4_K group of 8 rows
#define Q6K_X8_BYTES (8 * 210)
#define Q5K_X8_BYTES (8 * 176)
#define Q3K_X8_BYTES (8 * 110)
#define IQ4XS_X8_BYTES (8 * 136)
#define Q2K_X8_BYTES (8 * 84)
static inline int base_type(int type) { return type & 0xff; }

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

#if defined(__AVX2__)
static inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// x [m, k] float -> xq [m, k] int8, one scale per `span` values (32, or 256: a K-quant super-block);
// xd[r * k/span + s]: row r's scale of span s; in the xs buffer as int16, hs[r * k/16 + 2g + h]: the
// integer sum of half h of group g's int8 values (at most 16 * 127). Every array is row-major, so a
// row's result reads the same numbers whatever its batch.
static void quantize_rows(const float *x, int m, int k, int span, int8_t *xq, float *xd, int16_t *hs) {
  int spans = k / span, per_span = span / 32;
  // a decode step's rows take a microsecond or two: less than waking the thread team
#pragma omp parallel for schedule(static) if (m * (k / 32) >= 1024)
  for (int t = 0; t < m * spans; t++) {
    const float *v = x + (size_t)t * span;
#if defined(__AVX2__)
    // the same numbers as the C below for finite inputs (max_ps keeps the running maximum where
    // fmaxf would skip a NaN; cvtps rounds to nearest even as lrintf does in the default mode)
    __m256 mx = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < span; i += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), abs_mask), mx);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
    float amax = 0.f;
    for (int i = 0; i < span; i++) amax = fmaxf(amax, fabsf(v[i]));
#endif
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    xd[t] = d;
    for (int gi = 0; gi < per_span; gi++) {
      size_t g = (size_t)t * per_span + gi;  // r * (k / 32) + the group's index in its row
      int8_t *q = xq + (size_t)t * span + 32 * gi;
#if defined(__AVX2__)
      const __m256 idv = _mm256_set1_ps(id);
      __m256i qi[4];
      for (int c = 0; c < 4; c++) qi[c] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 32 * gi + 8 * c), idv));
      // int32 -> int8 in order (the packs interleave 128-bit lanes; one permute restores them)
      __m256i p16 = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
      __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i *)q, p8);
      hs[2 * g] = (int16_t)hsum_i32(_mm256_add_epi32(qi[0], qi[1]));
      hs[2 * g + 1] = (int16_t)hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
#else
      int s0 = 0, s1 = 0;
      for (int i = 0; i < 32; i++) {
        int qi = (int)lrintf(v[32 * gi + i] * id);
        q[i] = (int8_t)qi;
        if (i < 16) s0 += qi; else s1 += qi;
      }
      hs[2 * g] = (int16_t)s0, hs[2 * g + 1] = (int16_t)s1;
#endif
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

// ---------------------------------------------------------------- one arithmetic for every batch
//
// A weight row's dot product with an activation row is formed from exact integers and then a fixed
// sequence of float operations that depends on neither the number of rows in the batch, nor the row's
// place in it, nor the tile that computes it: every path below (one row at a time, 2 and 4 rows, the
// interleaved blocks of 8, the portable C) computes, for each row, the same numbers in the same order.
//
// Half h (16 values) of group j (32 values) of a block holds values dw * sc_h * (q - off) - bw * m_h
// (integer scales sc_h and minimums m_h; off a constant of the type; gscale below). With the
// activations' int8 values over a group (scale dx, half sums S_h, products with q dot_h), the group
// contributes dx * dw * I + dx * bw * N with the exact integers
//   I = sum_h sc_h * (dot_h - off * S_h),   N = -sum_h m_h * S_h.
// Per-group form (32-value blocks; K-quants whose activations have a scale a group): each group's
//   p = has_mins ? fmaf(I, dw * dx, N * (bw * dx)) : I * (dw * dx)
// (ints converted to float); group g of the row's window is added to accumulator A[g % 8].
// Super-block form (K-quants and IQ4_XS whose activations have one scale a super-block, dx): I and N
// summed over the super-block's 8 groups in integers, then the same p; super-block b is added to A[b % 8].
// The result is ((A0 + A1) + (A2 + A3)) + ((A4 + A5) + (A6 + A7)) (and + bias). Integer sums may be
// formed in any order, float ones never. (The 8 accumulators: one row's path keeps them as the lanes
// of one vector, 8 groups' terms a vector add; the 8-row blocks as 8 vectors, lane = row.)

// Integer scales of one group: values dw * sc_h * (q - value_offset) - bw * m_h in half h.
typedef struct {
  int sc0, sc1, m0, m1;
  float dw, bw;
} gscale;

// The constant subtracted from a type's unsigned stored values (0: none, or signed values).
static inline int value_offset(int type) {
  return type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : type == T_Q3_K ? 4 : type == T_Q6_K ? 32 : 0;
}
static inline int offset_shift(int off) { return off == 4 ? 2 : off == 8 ? 3 : off == 16 ? 4 : off == 32 ? 5 : 7; }
// Types with minimums (a float offset per group or half: the N term).
static inline int has_mins(int type) {
  return type == T_Q4_1 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K || type == T_Q2_K;
}

INLINE void group_ints(int type, const uint8_t *blk, int j, gscale *s) {
  s->sc0 = s->sc1 = 1, s->m0 = s->m1 = 0, s->bw = 0.f;
  switch (type) {
    case T_Q4_1: case T_Q5_1:  // d * q + min
      s->dw = f16(blk), s->m0 = s->m1 = 1, s->bw = -f16(blk + 2);
      break;
    case T_Q4_K: case T_Q5_K: {
      int sc, m;
      scale_min_k4(j, blk + 4, &sc, &m);
      s->sc0 = s->sc1 = sc, s->m0 = s->m1 = m, s->dw = f16(blk), s->bw = f16(blk + 2);
      break;
    }
    case T_Q6_K:
      s->sc0 = ((const int8_t *)blk)[192 + 2 * j], s->sc1 = ((const int8_t *)blk)[193 + 2 * j], s->dw = f16(blk + 208);
      break;
    case T_Q3_K:
      s->sc0 = q3k_scale(blk + 96, 2 * j), s->sc1 = q3k_scale(blk + 96, 2 * j + 1), s->dw = f16(blk + 108);
      break;
    case T_Q2_K:
      s->sc0 = blk[2 * j] & 15, s->sc1 = blk[2 * j + 1] & 15, s->m0 = blk[2 * j] >> 4, s->m1 = blk[2 * j + 1] >> 4;
      s->dw = f16(blk + 80), s->bw = f16(blk + 82);
      break;
    case T_IQ4_XS: {
      uint16_t h;
      memcpy(&h, blk + 2, 2);
      int ls = ((blk[4 + j / 2] >> (4 * (j & 1))) & 15) | (((h >> (2 * j)) & 3) << 4);
      s->sc0 = s->sc1 = ls - 32, s->dw = f16(blk);
      break;
    }
    default:  // Q4_0, Q5_0, Q8_0, IQ4_NL: one scale a block
      s->dw = f16(blk);
  }
}

// A group's (or super-block's) float term, from its exact integers (see above).
static inline float group_term(int mins, int32_t I, int32_t N, float dw, float bw, float dx) {
  return mins ? fmaf((float)I, dw * dx, (float)N * (bw * dx)) : (float)I * (dw * dx);
}
static inline float tree8(const float *p) { return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])); }

// The super-block form applies where the activations have one scale a super-block and the window
// holds whole super-blocks.
static inline int super_form(int type, int span, int g0, int groups) {
  return span == 256 && super_block(type) && g0 % 8 == 0 && groups % 8 == 0;
}

// Whether an interleaved group's own tiles (x8_tiles) take a window: the 32-value types any, the
// super-block types one on super-block boundaries.
static inline int x8_window(int type, int span, int g0, int groups) {
  return block_values(type) == 32 || super_form(type, span, g0, groups);
}

// Rows per tile of the per-row paths (1, 2 or 4).
#define MAX_TILE 4

// The plain C path (the portable build's, at every batch size): the definition above, written out.
INLINE void tile_dot_c(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq, int k,
                       const float *xd, const int16_t *hs, int span, const int MR, float *out) {
  const int G = k / 32, H = k / 16, off = value_offset(type), mins = has_mins(type);
  const unsigned per_block = super_block(type) ? 8 : 1;
  size_t bb = block_bytes(type);
  float acc[MAX_TILE];
  for (int r = 0; r < MR; r++) acc[r] = 0.f;
  const int sf = super_form(type, span, g0, groups);
  float A[MAX_TILE][8] = {{0}};
  // the per-group form's unit: 8 groups; the super-block form's: 8 super-blocks (64 groups)
  const int unit = sf ? 64 : 8;
  for (int u0 = 0; u0 < groups; u0 += unit) {
    float p[MAX_TILE][8];
    memset(p, 0, sizeof p);  // padding: zero terms (adding +0 changes no accumulator: none is ever -0)
    for (int e = 0; e < 8; e++) {
      int32_t Is[MAX_TILE] = {0}, Ns[MAX_TILE] = {0};
      gscale s = {0};
      const int ge = u0 + e * (sf ? 8 : 1);
      if (ge >= groups) break;
      for (int gi = 0; gi < (sf ? 8 : 1); gi++) {
        int gw = ge + gi;  // the group's index in the window
        unsigned gg = (unsigned)(g0 + gw), j = gg % per_block;
        const uint8_t *blk = wrow + (size_t)(gg / per_block) * bb;
        group w;
        unpack(type, blk, (int)j, &w);
        group_ints(type, blk, (int)j, &s);
        for (int r = 0; r < MR; r++) {
          const int8_t *xv = xq + (size_t)r * k + 32 * (size_t)gw;
          int d0 = 0, d1 = 0;
          if (signed_values(type)) {
            for (int i = 0; i < 16; i++) d0 += (int8_t)w.h0[i] * xv[i], d1 += (int8_t)w.h1[i] * xv[16 + i];
          } else {
            for (int i = 0; i < 16; i++) d0 += w.h0[i] * xv[i], d1 += w.h1[i] * xv[16 + i];
          }
          int S0 = hs[(size_t)r * H + 2 * gw], S1 = hs[(size_t)r * H + 2 * gw + 1];
          Is[r] += s.sc0 * (d0 - off * S0) + s.sc1 * (d1 - off * S1);
          Ns[r] -= s.m0 * S0 + s.m1 * S1;
        }
      }
      // (a super-block's groups share its dw, bw and, with span 256, dx)
      for (int r = 0; r < MR; r++) {
        float dx = sf ? xd[(size_t)r * (k / 256) + ge / 8] : xd[(size_t)r * G + ge];  // (a scale a span)
        p[r][e] = group_term(mins, Is[r], Ns[r], s.dw, s.bw, dx);
      }
    }
    for (int r = 0; r < MR; r++)
      for (int e = 0; e < 8; e++) A[r][e] += p[r][e];
  }
  for (int r = 0; r < MR; r++) acc[r] = tree8(A[r]);
  for (int r = 0; r < MR; r++) out[r] = acc[r];
}

#if defined(__AVX2__)

// tree8 of a vector's lanes: ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)), as the scalar one.
static inline float tree8_ps(__m256 p) {
  __m256 s = _mm256_add_ps(p, _mm256_permute_ps(p, 0xB1));  // lane 2i: p2i + p2i+1
  s = _mm256_add_ps(s, _mm256_permute_ps(s, 0x4E));         // lane 0: (p0 + p1) + (p2 + p3); lane 4 likewise
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}

// A Q4_K/Q5_K x8 super-block's 6-bit scales and minimums of 8 rows (lane = row) from its three words of
// packed scales at sb + 32: byte j of sc03 = scale j (j < 4), of sc47 = scale 4 + j; mn03/mn47 likewise.
static inline void q4k_x8_scales(const uint8_t *sb, __m256i *sc03, __m256i *mn03, __m256i *sc47, __m256i *mn47) {
  const __m256i m4 = _mm256_set1_epi8(15), m6 = _mm256_set1_epi8(63), m2 = _mm256_set1_epi8(3);
  __m256i u0 = _mm256_loadu_si256((const __m256i *)(sb + 32)), u1 = _mm256_loadu_si256((const __m256i *)(sb + 64)),
          u2 = _mm256_loadu_si256((const __m256i *)(sb + 96));
  *sc03 = _mm256_and_si256(u0, m6), *mn03 = _mm256_and_si256(u1, m6);
  *sc47 = _mm256_or_si256(_mm256_and_si256(u2, m4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), m2), 4));
  *mn47 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), m4),
                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), m2), 4));
}

// An x8 tile's 8 accumulators of one activation row (a[b % 8], lane = weight row) summed in tree8's
// order, lane by lane, into out[0..8).
static inline void store_tree8_lanes(const __m256 a[8], float *out) {
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                      _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7]))));
}

// group_term on 8 lanes.
static inline __m256 group_term_ps(int mins, __m256i I, __m256i N, __m256 dw, __m256 bw, __m256 dx) {
  __m256 p = _mm256_cvtepi32_ps(I);
  if (mins) return _mm256_fmadd_ps(p, _mm256_mul_ps(dw, dx), _mm256_mul_ps(_mm256_cvtepi32_ps(N), _mm256_mul_ps(bw, dx)));
  return _mm256_mul_ps(p, _mm256_mul_ps(dw, dx));
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

// A super-block's 16 half scales and minimums as int16 (group j's halves at 2j, 2j + 1), d and dmin.
typedef struct {
  __m256i sc, mn;
  float d, dmin;
} sbscale;

INLINE void super_ints(int type, const uint8_t *blk, sbscale *s) {
  s->mn = _mm256_setzero_si256(), s->dmin = 0.f;
  switch (type) {
    case T_Q4_K: case T_Q5_K: {  // twelve bytes: eight 6-bit scales and eight 6-bit minimums
      uint32_t u[3];
      memcpy(u, blk + 4, 12);
      __m128i sm = _mm_setr_epi32((int)(u[0] & 0x3f3f3f3fu), (int)((u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4)),
                                  (int)(u[1] & 0x3f3f3f3fu), (int)(((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4)));
      s->sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sm, sm));  // scales 0-7, each for both halves
      s->mn = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));  // minimums 0-7 likewise
      s->d = f16(blk), s->dmin = f16(blk + 2);
      break;
    }
    case T_Q6_K:
      s->sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
      s->d = f16(blk + 208);
      break;
    case T_Q3_K: {  // q3k_scale's 16 values at once, four bytes a step
      uint32_t a[3], t;
      memcpy(a, blk + 96, 12);
      t = a[2];
      __m128i v = _mm_setr_epi32((int)((a[0] & 0x0f0f0f0fu) | ((t & 0x03030303u) << 4)),
                                 (int)((a[1] & 0x0f0f0f0fu) | (((t >> 2) & 0x03030303u) << 4)),
                                 (int)(((a[0] >> 4) & 0x0f0f0f0fu) | (((t >> 4) & 0x03030303u) << 4)),
                                 (int)(((a[1] >> 4) & 0x0f0f0f0fu) | (((t >> 6) & 0x03030303u) << 4)));
      s->sc = _mm256_cvtepi8_epi16(_mm_sub_epi8(v, _mm_set1_epi8(32)));
      s->d = f16(blk + 108);
      break;
    }
    case T_Q2_K: {
      __m128i v = _mm_loadu_si128((const __m128i *)blk), m4 = _mm_set1_epi8(15);
      s->sc = _mm256_cvtepu8_epi16(_mm_and_si128(v, m4));
      s->mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
      s->d = f16(blk + 80), s->dmin = f16(blk + 82);
      break;
    }
    default: {  // T_IQ4_XS
      uint16_t h;
      memcpy(&h, blk + 2, 2);
      int16_t sc[16];
      for (int j = 0; j < 8; j++)
        sc[2 * j] = sc[2 * j + 1] = (int16_t)((((blk[4 + j / 2] >> (4 * (j & 1))) & 15) | (((h >> (2 * j)) & 3) << 4)) - 32);
      s->sc = _mm256_loadu_si256((const __m256i *)sc);
      s->d = f16(blk);
    }
  }
}

// Byte shuffles that broadcast one int16 of a 128-bit lane: element e to every int16 of the lane.
#define BCAST16(e) (char)(2 * (e)), (char)(2 * (e) + 1)
#define LANE_BCAST16(e) BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e), BCAST16(e)
// Group j's two half values of v (16 int16, half h of group j at 2j + h): the first half's in every
// int16 of the low 128 bits, the second's in the high ones (j a constant).
#define HALF_PAIR(v, j)                                                                                         \
  _mm256_shuffle_epi8(_mm256_permute2x128_si256(v, v, (j) < 4 ? 0x00 : 0x11),                                   \
                      _mm256_setr_epi8(LANE_BCAST16(2 * (j) % 8), LANE_BCAST16((2 * (j) + 1) % 8)))

// The low 16 bits of each int32 lane, as 8 int16.
static inline __m128i low_halves(__m256i v) {
  __m256i p = _mm256_packus_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_setzero_si256());
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0x08));
}

// Eight int32 vectors' lane sums, vector i's in lane i (any order of integer adds: exact).
INLINE __m256i reduce8_i32(const __m256i *v) {
  __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// Where a super-block type keeps its fp16 d (its dmin follows it). Q6_K's and Q3_K's end their block:
// read from 2 bytes before (d in the high half), so no read passes the tensor's end.
static inline int super_d_offset(int type) {
  return type == T_Q6_K ? 206 : type == T_Q3_K ? 106 : type == T_Q2_K ? 80 : 0;
}
static inline int super_d_high(int type) { return type == T_Q6_K || type == T_Q3_K; }

// Super-block form, one weight row against MR activation rows (row r at xq + r * k): 8 super-blocks a
// unit, each one's integers in one int32 vector per row, the 8 reduced at once (lane = super-block).
INLINE void tile_super(int type, const uint8_t *wrow, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                       const int16_t *hs, const int MR, float *out) {
  const int sbs_row = k / 256, H = k / 16, off = value_offset(type), mins = has_mins(type);
  size_t bb = block_bytes(type);
  __m256 accv[MAX_TILE];  // the 8 accumulators of each row, lane e = A[e]
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) accv[r] = _mm256_setzero_ps();
  for (int u0 = 0; u0 < sbs; u0 += 8) {
    const int n8 = sbs - u0 < 8 ? sbs - u0 : 8;
    __m256i sumi[MAX_TILE][8], sumn[MAX_TILE][8];
#pragma GCC unroll 1
    for (int e = 0; e < 8; e++) {
      if (e >= n8) {  // padding: a zero super-block
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) sumi[r][e] = sumn[r][e] = _mm256_setzero_si256();
        continue;
      }
      int b = u0 + e;
      const uint8_t *blk = wrow + (size_t)(sb0 + b) * bb;
      sbscale s;
      super_ints(type, blk, &s);
      __m256i acc_i[MAX_TILE];
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) acc_i[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) {
        __m256i wv = group_values_avx2(type, blk, j);
        __m256i wu = signed_values(type) ? _mm256_sign_epi8(wv, wv) : wv;
        __m256i scv = HALF_PAIR(s.sc, j);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
          __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + 256 * (size_t)b + 32 * j));
          if (signed_values(type)) x = _mm256_sign_epi8(x, wv);
          // pairs of byte products into int16 (at most 2 * 128 * 127: no saturation), times the scales
          acc_i[r] = dpwssd_acc(acc_i[r], _mm256_maddubs_epi16(wu, x), scv);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(hs + (size_t)r * H + 16 * (size_t)b));
        if (off) acc_i[r] = _mm256_sub_epi32(acc_i[r], _mm256_slli_epi32(_mm256_madd_epi16(s.sc, h), offset_shift(off)));
        sumi[r][e] = acc_i[r];
        sumn[r][e] = mins ? _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(s.mn, h)) : _mm256_setzero_si256();
      }
    }
    // the 8 super-blocks' fp16 d (and dmin after it), and each row's scale of them, gathered at once
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n8), lanes);
    __m256i dd = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)(wrow + (size_t)(sb0 + u0) * bb + super_d_offset(type)),
                                             _mm256_mullo_epi32(lanes, _mm256_set1_epi32((int)bb)), live, 1);
    __m256 dv = _mm256_cvtph_ps(low_halves(super_d_high(type) ? _mm256_srli_epi32(dd, 16) : dd));
    __m256 dminv = mins ? _mm256_cvtph_ps(low_halves(_mm256_srli_epi32(dd, 16))) : _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
      __m256i I = reduce8_i32(sumi[r]), N = mins ? reduce8_i32(sumn[r]) : _mm256_setzero_si256();
      __m256 dxv = _mm256_maskload_ps(xd + (size_t)r * sbs_row + u0, live);  // (a scale a super-block)
      accv[r] = _mm256_add_ps(accv[r], group_term_ps(mins, I, N, dv, dminv, dxv));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) out[r] = tree8_ps(accv[r]);
}

// Per-group form, one weight row against MR activation rows: each group's integer products reduced
// to one int32 a group (8 groups a vector, lane = group), then group_term and tree8 on the lanes.
INLINE void tile_groups(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq, int k,
                        const float *xd, const int16_t *hs, const int MR, float *out) {
  const int G = k / 32, H = k / 16, off = value_offset(type), mins = has_mins(type);
  const int scaled = super_block(type);  // integer scales per half: products scaled before the reduction
  const unsigned per_block = super_block(type) ? 8 : 1;
  size_t bb = block_bytes(type);
  __m256 accv[MAX_TILE];  // the 8 accumulators of each row, lane e = A[e]
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) accv[r] = _mm256_setzero_ps();
  for (int u0 = 0; u0 < groups; u0 += 8) {
    const int n8 = groups - u0 < 8 ? groups - u0 : 8;
    {  // the weights a few units on (the unit's work is a chain the prefetcher alone does not run ahead of)
      unsigned ga = (unsigned)(g0 + u0 + 32);
      _mm_prefetch((const char *)(wrow + (size_t)(ga / per_block) * bb), _MM_HINT_T0);
      _mm_prefetch((const char *)(wrow + (size_t)(ga / per_block) * bb + 64), _MM_HINT_T0);
      _mm_prefetch((const char *)(wrow + (size_t)(ga / per_block) * bb + 128), _MM_HINT_T0);
    }
    int16_t sc[16], mn[16];
    float dw[8], bw[8];
    __m256i v[MAX_TILE][8];
#pragma GCC unroll 8
    for (int gi = 0; gi < 8; gi++) {
      if (gi < n8) {
        unsigned gg = (unsigned)(g0 + u0 + gi), j = gg % per_block;
        const uint8_t *blk = wrow + (size_t)(gg / per_block) * bb;
        __m256i wv = group_values_avx2(type, blk, (int)j);
        __m256i wu = signed_values(type) ? _mm256_sign_epi8(wv, wv) : wv;
        __m256i scv = _mm256_setzero_si256();
        if (scaled) {  // (a tensor-parallel window's K-quants: rare, kept simple)
          gscale s;
          group_ints(type, blk, (int)j, &s);
          sc[2 * gi] = (int16_t)s.sc0, sc[2 * gi + 1] = (int16_t)s.sc1;
          mn[2 * gi] = (int16_t)s.m0, mn[2 * gi + 1] = (int16_t)s.m1;
          dw[gi] = s.dw, bw[gi] = s.bw;
          scv = _mm256_set_m128i(_mm_set1_epi16((short)s.sc1), _mm_set1_epi16((short)s.sc0));
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
          __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + 32 * (size_t)(u0 + gi)));
          if (signed_values(type)) x = _mm256_sign_epi8(x, wv);
          v[r][gi] = scaled ? _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x), scv) : dot_us(wu, x);
        }
      } else {  // padding: a zero group
        sc[2 * gi] = sc[2 * gi + 1] = mn[2 * gi] = mn[2 * gi + 1] = 0;
        dw[gi] = bw[gi] = 0.f;
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) v[r][gi] = _mm256_setzero_si256();
      }
    }
    __m256 dwv, bwv = _mm256_setzero_ps();
    __m256i sc16, mn16;
    if (scaled) {
      dwv = _mm256_loadu_ps(dw), bwv = _mm256_loadu_ps(bw);
      sc16 = _mm256_loadu_si256((const __m256i *)sc), mn16 = _mm256_loadu_si256((const __m256i *)mn);
    } else {  // one scale a block; Q4_1/Q5_1: values d * q + min (bw = -min, m = 1)
      // the 8 blocks' fp16 scale (and Q4_1/Q5_1's minimum) gathered at once, the rest of a short unit 0
      __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)bb));
      __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const int *base = (const int *)(wrow + (size_t)(g0 + u0) * bb);
      __m256i both = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), base, idx, live, 1);  // d | min << 16
      dwv = _mm256_cvtph_ps(low_halves(both));
      if (mins) bwv = _mm256_xor_ps(_mm256_cvtph_ps(low_halves(_mm256_srli_epi32(both, 16))), _mm256_set1_ps(-0.f));
      sc16 = mn16 = _mm256_set1_epi16(1);
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) {
      __m256i I = reduce8_i32(v[r]);
      __m256i h;
      __m256 dx;
      if (n8 == 8) {
        h = _mm256_loadu_si256((const __m256i *)(hs + (size_t)r * H + 2 * (size_t)u0));
        dx = _mm256_loadu_ps(xd + (size_t)r * G + u0);
      } else {  // the last groups of the row: zeros past them
        int16_t ht[16] = {0};
        float dt[8] = {0};
        memcpy(ht, hs + (size_t)r * H + 2 * (size_t)u0, 4 * (size_t)n8);
        memcpy(dt, xd + (size_t)r * G + u0, 4 * (size_t)n8);
        h = _mm256_loadu_si256((const __m256i *)ht), dx = _mm256_loadu_ps(dt);
      }
      if (off) I = _mm256_sub_epi32(I, _mm256_slli_epi32(_mm256_madd_epi16(sc16, h), offset_shift(off)));
      __m256i N = mins ? _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(mn16, h)) : _mm256_setzero_si256();
      accv[r] = _mm256_add_ps(accv[r], group_term_ps(mins, I, N, dwv, bwv, dx));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) out[r] = tree8_ps(accv[r]);
}
#endif

// One weight row (its window's groups [g0, g0 + groups)) against MR activation rows; xd, hs: the
// first row's scales and half sums (row-major).
INLINE void tile_dot(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq, int k, const float *xd,
                     const int16_t *hs, int span, const int MR, float *out) {
#if defined(__AVX2__)
  if (super_form(type, span, g0, groups)) tile_super(type, wrow, g0 / 8, groups / 8, xq, k, xd, hs, MR, out);
  else tile_groups(type, wrow, g0, groups, xq, k, xd, hs, MR, out);
#else
  tile_dot_c(type, wrow, g0, groups, xq, k, xd, hs, span, MR, out);
#endif
}

// Specialized per type and tile height: the unpacking's switch and the row loop compile away.
#define TILE_CASE(T, MR) \
  case T: tile_dot(T, wrow, g0, groups, xq, k, xd, hs, span, MR, out); break;
#define TILE_FN(MR)                                                                                       \
  static void tile_dot_##MR(int type, const uint8_t *wrow, int g0, int groups, const int8_t *xq,            \
                            int k, const float *xd, const int16_t *hs, int span, float *out) {            \
    switch (type) {                                                                                       \
      TILE_CASE(T_Q4_0, MR) TILE_CASE(T_Q4_1, MR) TILE_CASE(T_Q5_0, MR) TILE_CASE(T_Q5_1, MR)             \
      TILE_CASE(T_Q8_0, MR) TILE_CASE(T_Q4_K, MR) TILE_CASE(T_Q5_K, MR) TILE_CASE(T_Q6_K, MR)             \
      TILE_CASE(T_Q2_K, MR) TILE_CASE(T_Q3_K, MR) TILE_CASE(T_IQ4_NL, MR) TILE_CASE(T_IQ4_XS, MR)         \
    }                                                                                                     \
  }
TILE_FN(1)
TILE_FN(2)
TILE_FN(4)

// ---------------------------------------------------------------- interleaved blocks of 8 rows

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

#define ROWS8_GROUP_BYTES 352  // interleave8's bytes a group: 8 rows' 32 values, sums, first-half sums, scales

// The signed types' values as unsigned ones (w + 128) where the CPU has VNNI; the 128 * sum(x) this
// adds is taken off with the types' own offsets. Without VNNI the byte products are summed in pairs
// into saturating int16 (255 * 127 * 2 would overflow): the signs move onto x instead (|w| <= 128).
#define ROWS8_BIAS (HAVE_VNNI ? 128 : 0)

// Bytes ahead of the super-block being read that the x8 tiles prefetch (0: none, the hardware's own).
#ifndef X8_PREFETCH
#define X8_PREFETCH 0
#endif
static inline void x8_prefetch(const uint8_t *sb, size_t bytes) {
#if X8_PREFETCH
  for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(sb + X8_PREFETCH + o), _MM_HINT_T0);
#else
  (void)sb, (void)bytes;
#endif
}

// Q4_K in groups of 8 rows byte by byte (x8_copy): MR activation rows against one group's
// super-blocks [sb0, sb0 + sbs) (the window; xq, xd, hs: the first activation row's, window-relative).
// Lane r = weight row r throughout: each 4 values of 8 rows are one vector, met by one multiply-add
// with the activation row's 4 values broadcast, so a group of 32 values leaves row r's exact dot
// product in lane r with no horizontal sum; its integer scale (lane r) multiplies it. Row r's
// integers I and N are tile_super's, and its float steps (group_term, A[b % 8], tree8) the same: so
// the same bits as every other path.
// Q5_K's byte layout (five: 1) is Q4_K's with the 8 chunks of the values' 5th bits between the scales
// and the low bits: chunk c's bit j (the bit of values 4c..4c+3 of group j) joins them as 0x10.
INLINE void q45k_x8_tile(const int five, const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                         const int16_t *hs, const int MR, float *out) {
  const int sbs_row = k / 256, H = k / 16, x8_bytes = five ? Q5K_X8_BYTES : Q4K_X8_BYTES, low_at = five ? 384 : 128;
  const __m256i m4 = _mm256_set1_epi8(15);
  __m256 A[MAX_TILE][8];
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++) A[r][e] = _mm256_setzero_ps();
  for (int b = 0; b < sbs; b++) {
    const uint8_t *sb = gw + (size_t)(sb0 + b) * x8_bytes;
    x8_prefetch(sb, x8_bytes);
    // the 8 rows' scales and minimums, lane = row: byte j of sc03 = scale j (j < 4), of sc47 = scale 4 + j
    __m256i sc03, mn03, sc47, mn47;
    q4k_x8_scales(sb, &sc03, &mn03, &sc47, &mn47);
    __m256i I[MAX_TILE], N[MAX_TILE];
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++) I[r] = N[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {  // groups 2i (low nibbles) and 2i + 1 (high nibbles)
      __m256i lo[MAX_TILE], hi[MAX_TILE];
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) lo[r] = hi[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int c = 0; c < 8; c++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(sb + low_at + 256 * i + 32 * c));
        __m256i wl = _mm256_and_si256(w, m4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
        if (five) {  // bits 2i and 2i + 1 of chunk c's 5th bits, moved to bit 4 (shifts within a byte's bits)
          const __m256i m10 = _mm256_set1_epi8(0x10);
          __m256i qh = _mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * c));
          __m256i bl = i < 2 ? _mm256_slli_epi16(qh, 4 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 4);
          __m256i bh = i < 2 ? _mm256_slli_epi16(qh, 3 - 2 * i) : _mm256_srli_epi16(qh, 2 * i - 3);
          wl = _mm256_or_si256(wl, _mm256_and_si256(bl, m10)), wh = _mm256_or_si256(wh, _mm256_and_si256(bh, m10));
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
          const int8_t *x = xq + (size_t)r * k + 256 * (size_t)b + 64 * i + 4 * c;
          int32_t xa, xb;
          memcpy(&xa, x, 4), memcpy(&xb, x + 32, 4);
          lo[r] = dpbusd_acc(lo[r], wl, _mm256_set1_epi32(xa));
          hi[r] = dpbusd_acc(hi[r], wh, _mm256_set1_epi32(xb));
        }
      }
      const __m256i byte = _mm256_set1_epi32(0xff);
      __m256i sa = _mm256_and_si256(_mm256_srli_epi32(i < 2 ? sc03 : sc47, 16 * (i % 2)), byte);
      __m256i sbv = _mm256_and_si256(_mm256_srli_epi32(i < 2 ? sc03 : sc47, 16 * (i % 2) + 8), byte);
      __m256i ma = _mm256_and_si256(_mm256_srli_epi32(i < 2 ? mn03 : mn47, 16 * (i % 2)), byte);
      __m256i mb = _mm256_and_si256(_mm256_srli_epi32(i < 2 ? mn03 : mn47, 16 * (i % 2) + 8), byte);
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) {
        const int16_t *h = hs + (size_t)r * H + 16 * (size_t)b + 4 * i;  // halves of groups 2i, 2i + 1
        I[r] = _mm256_add_epi32(I[r], _mm256_add_epi32(_mm256_mullo_epi32(lo[r], sa), _mm256_mullo_epi32(hi[r], sbv)));
        N[r] = _mm256_sub_epi32(N[r], _mm256_add_epi32(_mm256_mullo_epi32(ma, _mm256_set1_epi32(h[0] + h[1])),
                                                       _mm256_mullo_epi32(mb, _mm256_set1_epi32(h[2] + h[3]))));
      }
    }
    __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sb));
    __m256 dminv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 16)));
#pragma GCC unroll 4
    for (int r = 0; r < MR; r++)
      A[r][b % 8] = _mm256_add_ps(A[r][b % 8], group_term_ps(1, I[r], N[r], dv, dminv, _mm256_set1_ps(xd[(size_t)r * sbs_row + b])));
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) store_tree8_lanes(A[r], out + 8 * r);
}

INLINE void q4k_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                        const int16_t *hs, const int MR, float *out) {
  q45k_x8_tile(0, gw, sb0, sbs, xq, k, xd, hs, MR, out);
}
INLINE void q5k_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                        const int16_t *hs, const int MR, float *out) {
  q45k_x8_tile(1, gw, sb0, sbs, xq, k, xd, hs, MR, out);
}

// Activation rows a Q6_K x8 tile takes at once: 8 where the CPU has 32 vector registers (each row's
// accumulators stay in registers; the group's values, unpacked once, then serve 8 rows), else 4.
#if defined(__AVX512VL__)
#define Q6K_X8_ROWS 8
#else
#define Q6K_X8_ROWS MAX_TILE
#endif

// Q6_K's value q (0-3) of a chunk: its low 4 bits from run q % 2's nibbles, its high 2 from the
// chunk's high bits (bits 2q..2q+1 of each byte), as a byte 0-63.
INLINE __m256i q6k_x8_values(const uint8_t *step, int q) {
  const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
  __m256i h = _mm256_loadu_si256((const __m256i *)step), l = _mm256_loadu_si256((const __m256i *)(step + 32 + 32 * (q & 1)));
  __m256i low = _mm256_and_si256(q & 2 ? _mm256_srli_epi16(l, 4) : l, m4);
  __m256i high = q == 0 ? _mm256_slli_epi16(h, 4) : q == 1 ? _mm256_slli_epi16(h, 2) : q == 2 ? h : _mm256_srli_epi16(h, 2);
  return _mm256_or_si256(low, _mm256_and_si256(high, m30));
}

// Q3_K's value q (0-3) of group 4 half + q in a chunk: 2 bits of run `half`'s byte (bits 2q..2q+1)
// and the 3rd from the chunk's high bits (bit 4 half + q of each byte), as a byte 0-7.
INLINE __m256i q3k_x8_values(const uint8_t *step, int half, int q) {
  __m256i h = _mm256_loadu_si256((const __m256i *)step), l = _mm256_loadu_si256((const __m256i *)(step + 32 + 32 * half));
  const int s = 4 * half + q - 2;  // the high bit to bit 2 (shifts that stay within a byte's kept bits)
  __m256i high = s < 0 ? _mm256_slli_epi16(h, -s) : _mm256_srli_epi16(h, s);
  return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 2 * q), _mm256_set1_epi8(3)),
                         _mm256_and_si256(high, _mm256_set1_epi8(4)));
}

// Q2_K's value q (0-3) of group 4 half + q in a step: bits 2q..2q+1 of run `half`'s byte.
INLINE __m256i q2k_x8_values(const uint8_t *step, int half, int q) {
  __m256i l = _mm256_loadu_si256((const __m256i *)(step + 32 * half));
  return _mm256_and_si256(_mm256_srli_epi16(l, 2 * q), _mm256_set1_epi8(3));
}

// The 16 int8 half scales of a Q6_K, Q3_K or Q2_K super-block of 8 rows as 4 words (lane = row, byte
// n % 4 of word n / 4: scale n): Q6_K stores them so; Q3_K's 6-bit packing (super_ints) is undone lane
// by lane; Q2_K's are the low nibbles of its scale bytes (minimums: the high ones, in min_words).
INLINE void half_scale_words(int type, const uint8_t *sb, __m256i *sw) {
  if (type == T_Q6_K) {
    for (int w = 0; w < 4; w++) sw[w] = _mm256_loadu_si256((const __m256i *)(sb + 16 + 32 * w));
    return;
  }
  if (type == T_Q2_K) {
    for (int w = 0; w < 4; w++) sw[w] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(sb + 32 + 32 * w)), _mm256_set1_epi8(15));
    return;
  }
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), m32 = _mm256_set1_epi8(32);
  __m256i a0 = _mm256_loadu_si256((const __m256i *)(sb + 16)), a1 = _mm256_loadu_si256((const __m256i *)(sb + 48)),
          a2 = _mm256_loadu_si256((const __m256i *)(sb + 80));
  for (int w = 0; w < 4; w++) {
    __m256i low = _mm256_and_si256(w < 2 ? (w ? a1 : a0) : _mm256_srli_epi32(w == 2 ? a0 : a1, 4), m4);
    __m256i top = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(a2, 2 * w), m2), 4);
    sw[w] = _mm256_sub_epi8(_mm256_or_si256(low, top), m32);
  }
}

// MR activation rows' 8 float accumulators (A[r][b % 8], lane = weight row) of an 8-row tile, zeroed.
INLINE void zero_tree8(__m256 (*A)[8], const int MR) {
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++) A[r][e] = _mm256_setzero_ps();
}

// Q2_K's 16 minimums of a super-block of 8 rows as half_scale_words' scales.
INLINE void min_words(const uint8_t *sb, __m256i *mw) {
  for (int w = 0; w < 4; w++)
    mw[w] = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(sb + 32 + 32 * w)), 4), _mm256_set1_epi8(15));
}

// acc[r] += sum_h c_h S_h (lane = weight row) for MR activation rows: the 16 per-half int8 factors c_h
// as half_scale_words' 4 words, S_h row r's half sums of super-block b, two halves a multiply-add.
INLINE void half_sums_dot(const __m256i *words, const int16_t *hs, int H, int b, const int MR, __m256i *acc) {
#pragma GCC unroll 4
  for (int w = 0; w < 4; w++) {  // factors 4w..4w+3 (bytes of a word, lane = row) as int16 pairs
    __m256i lo = _mm256_srai_epi16(_mm256_slli_epi16(words[w], 8), 8), hi = _mm256_srai_epi16(words[w], 8);
    __m256i p01 = _mm256_blend_epi16(lo, _mm256_slli_epi32(hi, 16), 0xAA);
    __m256i p23 = _mm256_blend_epi16(_mm256_srli_epi32(lo, 16), hi, 0xAA);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      int32_t s01, s23;  // the half sums 4w, 4w + 1 and 4w + 2, 4w + 3 as int16 pairs
      memcpy(&s01, hs + (size_t)r * H + 16 * (size_t)b + 4 * w, 4);
      memcpy(&s23, hs + (size_t)r * H + 16 * (size_t)b + 4 * w + 2, 4);
      acc[r] = dpwssd_acc(dpwssd_acc(acc[r], p01, _mm256_set1_epi32(s01)), p23, _mm256_set1_epi32(s23));
    }
  }
}

// Q6_K's, Q3_K's and Q2_K's byte layouts (x8_copy), as q4k_x8_tile: MR activation rows (up to
// Q6K_X8_ROWS) against one group's super-blocks, lane = weight row; each half (16 values) of a group
// leaves its exact dot product in lane r, times its int8 scale. The values' offset (32 or 4 times the
// activations' half sum, times the scale) is taken off once a super-block: sum_h sc_h S_h from the
// scales as int16 pairs, two halves a multiply-add; Q2_K's minimums' term N = -sum_h m_h S_h likewise
// (no offset). The integers of tile_super (in another order: exact) and its float steps, so the same bits.
INLINE void half_scaled_x8_tile(const int type, const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k,
                                const float *xd, const int16_t *hs, const int MR, float *out) {
  const int sbs_row = k / 256, H = k / 16, mins = type == T_Q2_K;
  const int x8_bytes = type == T_Q6_K ? Q6K_X8_BYTES : type == T_Q3_K ? Q3K_X8_BYTES : Q2K_X8_BYTES;
  __m256 A[Q6K_X8_ROWS][8];
  zero_tree8(A, MR);
  for (int b = 0; b < sbs; b++) {
    const uint8_t *sb = gw + (size_t)(sb0 + b) * x8_bytes;
    const int8_t *xb = xq + 256 * (size_t)b;
    x8_prefetch(sb, x8_bytes);
    __m256i sw[4];
    half_scale_words(type, sb, sw);
    __m256i I[Q6K_X8_ROWS];  // first sum_h sc_h S_h, then I = sum_h sc_h dot_h - offset times it (Q2_K: none)
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) I[r] = _mm256_setzero_si256();
    if (!mins) {
      half_sums_dot(sw, hs, H, b, MR, I);
#pragma GCC unroll 8
      for (int r = 0; r < MR; r++)
        I[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(I[r], offset_shift(value_offset(type))));
    }
    // 4 values a chunk (q 0-3: q6k_x8_values) and MR rows: 4 MR accumulators where 4 rows or fewer,
    // else 2 MR (two passes over the chunks: the two runs of low bits in turn), so they fit the registers
    const int QW = MR > MAX_TILE ? 2 : 4, passes = 4 / QW;
#pragma GCC unroll 4
    for (int hv = 0; hv < 4; hv++) {  // groups 4 half .. 4 half + 3 (half = hv / 2), their values 16 vh.. (vh = hv % 2)
      const int half = hv / 2, vh = hv % 2;
#pragma GCC unroll 2
      for (int pass = 0; pass < passes; pass++) {
        __m256i acc[4][Q6K_X8_ROWS];  // value q = pass + passes * i in acc[i]
#pragma GCC unroll 4
        for (int i = 0; i < QW; i++)
#pragma GCC unroll 8
          for (int r = 0; r < MR; r++) acc[i][r] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 4 * vh; c < 4 * vh + 4; c++) {
          // (steps: see x8_piece)
          const uint8_t *step = type == T_Q6_K ? sb + 144 + 96 * (8 * half + c) : type == T_Q3_K ? sb + 112 + 96 * c
                                                                                                 : sb + 160 + 64 * c;
#pragma GCC unroll 4
          for (int i = 0; i < QW; i++) {
            const int q = pass + passes * i;
            __m256i v = type == T_Q6_K   ? q6k_x8_values(step, q)
                        : type == T_Q3_K ? q3k_x8_values(step, half, q)
                                         : q2k_x8_values(step, half, q);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
              int32_t xv;
              memcpy(&xv, xb + (size_t)r * k + 32 * (4 * half + q) + 4 * c, 4);
              acc[i][r] = dpbusd_acc(acc[i][r], v, _mm256_set1_epi32(xv));
            }
          }
        }
#pragma GCC unroll 4
        for (int i = 0; i < QW; i++) {
          const int q = pass + passes * i, si = 2 * (4 * half + q) + vh;  // the half's scale: byte si % 4 of word si / 4
          __m256i sc = _mm256_srai_epi32(_mm256_sllv_epi32(sw[si / 4], _mm256_set1_epi32(24 - 8 * (si % 4))), 24);
#pragma GCC unroll 8
          for (int r = 0; r < MR; r++) I[r] = _mm256_add_epi32(I[r], _mm256_mullo_epi32(acc[i][r], sc));
        }
      }
    }
    __m256i N[Q6K_X8_ROWS];  // Q2_K: -sum_h m_h S_h (after the values: fewer registers held through them)
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) N[r] = _mm256_setzero_si256();
    if (mins) {
      __m256i mw[4];
      min_words(sb, mw);
      half_sums_dot(mw, hs, H, b, MR, N);
#pragma GCC unroll 8
      for (int r = 0; r < MR; r++) N[r] = _mm256_sub_epi32(_mm256_setzero_si256(), N[r]);
    }
    __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sb));
    __m256 dminv = mins ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 16))) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
      A[r][b % 8] = _mm256_add_ps(A[r][b % 8], group_term_ps(mins, I[r], N[r], dv, dminv, _mm256_set1_ps(xd[(size_t)r * sbs_row + b])));
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) store_tree8_lanes(A[r], out + 8 * r);
}

INLINE void q6k_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                        const int16_t *hs, const int MR, float *out) {
  half_scaled_x8_tile(T_Q6_K, gw, sb0, sbs, xq, k, xd, hs, MR, out);
}
INLINE void q3k_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                        const int16_t *hs, const int MR, float *out) {
  half_scaled_x8_tile(T_Q3_K, gw, sb0, sbs, xq, k, xd, hs, MR, out);
}
INLINE void q2k_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                        const int16_t *hs, const int MR, float *out) {
  half_scaled_x8_tile(T_Q2_K, gw, sb0, sbs, xq, k, xd, hs, MR, out);
}

// IQ4_XS's byte layout (x8_piece), as q4k_x8_tile: MR activation rows (up to Q6K_X8_ROWS) against one
// group's super-blocks, lane = weight row. Each 4-value chunk of 8 rows is looked up in the 16 values
// (one byte shuffle) and meets the activation row's 4 values broadcast in one multiply-add, so a group
// of 32 values leaves row r's exact dot product in lane r; its 6-bit scale less 32 (lane r) multiplies
// it. The signed values as ROWS8_BIAS says: + 128 with VNNI (a group's chain starts at -128 times its
// activations' sum), else their signs moved onto x. Row r's integers are tile_super's and its float
// steps the same: so the same bits.
INLINE void iq4xs_x8_tile(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                          const int16_t *hs, const int MR, float *out) {
  const int sbs_row = k / 256, H = k / 16, chains = MR > MAX_TILE ? 1 : 2;  // (8 rows: one chain a row fits the registers)
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi32(3);
  const __m256i table = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)iq4_values)),
                                         _mm256_set1_epi8(HAVE_VNNI ? (char)0x80 : 0));
  __m256 A[Q6K_X8_ROWS][8];
  zero_tree8(A, MR);
  for (int b = 0; b < sbs; b++) {
    const uint8_t *sb = gw + (size_t)(sb0 + b) * IQ4XS_X8_BYTES;
    const int8_t *xb = xq + 256 * (size_t)b;
    x8_prefetch(sb, IQ4XS_X8_BYTES);
    // the 8 rows' scale words (lane = row): 4 low bits of scale j at bit 4j of sl, 2 high ones at 2j of sh
    const __m256i sl = _mm256_loadu_si256((const __m256i *)(sb + 32));
    const __m256i sh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sb + 16)));
    __m256i I[Q6K_X8_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) I[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
      __m256i lo[Q6K_X8_ROWS], hi[Q6K_X8_ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < MR; r++) {
        const int16_t *h = hs + (size_t)r * H + 16 * (size_t)b + 2 * j;
        lo[r] = HAVE_VNNI ? _mm256_set1_epi32(-128 * (h[0] + h[1])) : _mm256_setzero_si256();
        hi[r] = _mm256_setzero_si256();
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; c++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(sb + 64 + 128 * j + 32 * c));
        __m256i v0 = _mm256_shuffle_epi8(table, _mm256_and_si256(w, m4));
        __m256i v1 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(w, 4), m4));
        __m256i u0 = HAVE_VNNI ? v0 : _mm256_sign_epi8(v0, v0), u1 = HAVE_VNNI ? v1 : _mm256_sign_epi8(v1, v1);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
          const int8_t *x = xb + (size_t)r * k + 32 * j + 4 * c;
          int32_t xa, xc;
          memcpy(&xa, x, 4), memcpy(&xc, x + 16, 4);
          __m256i sa = _mm256_set1_epi32(xa), sc = _mm256_set1_epi32(xc);
          if (!HAVE_VNNI) sa = _mm256_sign_epi8(sa, v0), sc = _mm256_sign_epi8(sc, v1);
          lo[r] = dpbusd_acc(lo[r], u0, sa);
          if (chains == 2) hi[r] = dpbusd_acc(hi[r], u1, sc);
          else lo[r] = dpbusd_acc(lo[r], u1, sc);
        }
      }
      __m256i scale = _mm256_sub_epi32(
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(sl, 4 * j), _mm256_set1_epi32(15)),
                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(sh, 2 * j), m2), 4)),
          _mm256_set1_epi32(32));
#pragma GCC unroll 8
      for (int r = 0; r < MR; r++) I[r] = _mm256_add_epi32(I[r], _mm256_mullo_epi32(_mm256_add_epi32(lo[r], hi[r]), scale));
    }
    __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sb));
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
      A[r][b % 8] = _mm256_add_ps(A[r][b % 8], group_term_ps(0, I[r], _mm256_setzero_si256(), dv, _mm256_setzero_ps(),
                                                             _mm256_set1_ps(xd[(size_t)r * sbs_row + b])));
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) store_tree8_lanes(A[r], out + 8 * r);
}

// Q5_0's and Q5_1's 5th bits of 4-value chunk c (the low nibbles' values 4c..4c+3 with hi = 0, the
// high nibbles' 16+4c..16+4c+3 with hi = 1) of 8 rows as 0x10 in each value's byte, from the rows'
// 32-bit high-bit words qh (lane = row): each lane's byte holding the 4 bits spread over its 4 bytes,
// one bit tested in each.
INLINE __m256i q5_x8_high(__m256i qh, int c, int hi, __m256i v) {
  const char b = (char)(2 * hi + c / 2), n = (char)(4 * (c % 2));
  const __m256i spread = _mm256_setr_epi8(b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b, 8 + b, 8 + b, 12 + b, 12 + b, 12 + b, 12 + b,
                                          b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b, 8 + b, 8 + b, 12 + b, 12 + b, 12 + b, 12 + b);
  const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << n));
  __m256i bytes = _mm256_shuffle_epi8(qh, spread);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_mask_add_epi8(v, _mm256_test_epi8_mask(bytes, bit), v, _mm256_set1_epi8(0x10));
#else
  return _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10)));
#endif
}

// The 32-value types' byte layout (blocks32_piece): MR activation rows against one group's blocks
// [g0, g0 + groups) (the window; xq, xd, hs: the first activation row's, window-relative). Lane r =
// weight row r: each 4-value chunk of 8 rows meets the activation row's 4 values broadcast in one
// multiply-add, so a block leaves row r's exact dot product in lane r. The signed values (Q8_0,
// IQ4_NL) are made unsigned as ROWS8_BIAS says (w + 128 with VNNI, the 128 * sum(x) taken off with
// the types' offsets; else the signs moved onto x). Row r's integers are tile_groups' and its float
// steps (group_term, group g of the window into A[g % 8], tree8) the same: so the same bits.
INLINE void blocks32_x8_tile(int type, const uint8_t *gw, int g0, int groups, const int8_t *xq, int k,
                             const float *xd, const int16_t *hs, const int MR, float *out) {
  const int G = k / 32, H = k / 16, mins = has_mins(type), sgn = signed_values(type);
  const int off = value_offset(type) + (sgn ? ROWS8_BIAS : 0);
  const size_t bb8 = 8 * block_bytes(type);
  const int qh_at = type == T_Q5_0 ? 16 : 32;  // (Q5_0, Q5_1)
  const int qs_at = type == T_Q8_0 || type == T_Q4_0 || type == T_IQ4_NL ? 16 : type == T_Q4_1 ? 32 : type == T_Q5_0 ? 48 : 64;
  const int five = type == T_Q5_0 || type == T_Q5_1, chunks = type == T_Q8_0 ? 8 : 4;
  const __m256i m4 = _mm256_set1_epi8(15), flip = _mm256_set1_epi8((char)0x80);
  // IQ4_NL's 16 values, + 128 where the CPU has VNNI (unsigned bytes)
  const __m256i table = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)iq4_values)),
                                         HAVE_VNNI ? flip : _mm256_setzero_si256());
  __m256 A[MAX_TILE][8];
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++) A[r][e] = _mm256_setzero_ps();
  for (int u0 = 0; u0 < groups; u0 += 8) {
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++) {
      const int g = u0 + e;
      if (g >= groups) break;
      const uint8_t *blk = gw + (size_t)(g0 + g) * bb8;
      x8_prefetch(blk, bb8);
      __m256i lo[MAX_TILE], hi[MAX_TILE];  // two chains a row (Q8_0: even and odd chunks)
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) lo[r] = hi[r] = _mm256_setzero_si256();
      const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(blk + qh_at)) : _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int c = 0; c < chunks; c++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + qs_at + 32 * c)), v0, v1;
        int x0 = 32 * g + 4 * c, x1 = x0 + 16;  // the activations' offsets that meet v0 and v1
        if (type == T_Q8_0) {
          v0 = v1 = HAVE_VNNI ? _mm256_xor_si256(w, flip) : w;
        } else {
          v0 = _mm256_and_si256(w, m4), v1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
          if (five) v0 = q5_x8_high(qh, c, 0, v0), v1 = q5_x8_high(qh, c, 1, v1);
          if (type == T_IQ4_NL) v0 = _mm256_shuffle_epi8(table, v0), v1 = _mm256_shuffle_epi8(table, v1);
        }
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
          const int8_t *xr = xq + (size_t)r * k;
          int32_t a, b;
          memcpy(&a, xr + x0, 4);
          __m256i xa = _mm256_set1_epi32(a), u0v = v0;
          if (sgn && !HAVE_VNNI) xa = _mm256_sign_epi8(xa, v0), u0v = _mm256_sign_epi8(v0, v0);
          if (type == T_Q8_0) {  // one vector a chunk: the chains take alternate chunks
            if (c % 2) hi[r] = dpbusd_acc(hi[r], u0v, xa);
            else lo[r] = dpbusd_acc(lo[r], u0v, xa);
            continue;
          }
          memcpy(&b, xr + x1, 4);
          __m256i xb = _mm256_set1_epi32(b), u1v = v1;
          if (sgn && !HAVE_VNNI) xb = _mm256_sign_epi8(xb, v1), u1v = _mm256_sign_epi8(v1, v1);
          lo[r] = dpbusd_acc(lo[r], u0v, xa);
          hi[r] = dpbusd_acc(hi[r], u1v, xb);
        }
      }
      __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
      __m256 bw = mins ? _mm256_xor_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))), _mm256_set1_ps(-0.f))
                       : _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int r = 0; r < MR; r++) {
        int S = hs[(size_t)r * H + 2 * g] + hs[(size_t)r * H + 2 * g + 1];
        __m256i I = _mm256_add_epi32(lo[r], hi[r]);
        if (off) I = _mm256_sub_epi32(I, _mm256_set1_epi32(off * S));
        __m256i N = mins ? _mm256_set1_epi32(-S) : _mm256_setzero_si256();
        A[r][e] = _mm256_add_ps(A[r][e], group_term_ps(mins, I, N, dw, bw, _mm256_set1_ps(xd[(size_t)r * G + g])));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; r++) store_tree8_lanes(A[r], out + 8 * r);
}

// blocks32_x8_tile per type and height.
#define B32_X8_CASE(T, MR) \
  case T: blocks32_x8_tile(T, gw, g0, groups, xq, k, xd, hs, MR, out); break;
#define B32_X8_FN(MR)                                                                                          \
  static void blocks32_x8_tile_##MR(int type, const uint8_t *gw, int g0, int groups, const int8_t *xq, int k,   \
                                    const float *xd, const int16_t *hs, float *out) {                           \
    switch (type) {                                                                                             \
      B32_X8_CASE(T_Q8_0, MR) B32_X8_CASE(T_Q4_0, MR) B32_X8_CASE(T_Q5_0, MR) B32_X8_CASE(T_Q4_1, MR)          \
      B32_X8_CASE(T_Q5_1, MR) B32_X8_CASE(T_IQ4_NL, MR)                                                         \
    }                                                                                                           \
  }
B32_X8_FN(1)
B32_X8_FN(2)
B32_X8_FN(4)

// The byte layouts' tiles per type and height (out[8 r + e]: activation row r, weight row e).
#define X8_TILE_FN(MR)                                                                                      \
  static void x8_tile_##MR(int type, const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k,           \
                           const float *xd, const int16_t *hs, float *out) {                                 \
    if (type == T_Q4_K) q4k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                                  \
    else if (type == T_Q5_K) q5k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                             \
    else if (type == T_Q3_K) q3k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                             \
    else if (type == T_IQ4_XS) iq4xs_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                         \
    else if (type == T_Q2_K) q2k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                             \
    else q6k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, MR, out);                                                 \
  }
X8_TILE_FN(1)
X8_TILE_FN(2)
X8_TILE_FN(4)
// Q6_K's, Q3_K's, Q2_K's and IQ4_XS's 8-row tile (Q6K_X8_ROWS): x8_height picks it.
static void x8_tile_8(int type, const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                      const int16_t *hs, float *out) {
  if (type == T_Q6_K) q6k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, Q6K_X8_ROWS, out);
  else if (type == T_IQ4_XS) iq4xs_x8_tile(gw, sb0, sbs, xq, k, xd, hs, Q6K_X8_ROWS, out);
  else if (type == T_Q2_K) q2k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, Q6K_X8_ROWS, out);
  else q3k_x8_tile(gw, sb0, sbs, xq, k, xd, hs, Q6K_X8_ROWS, out);
}
// The height of the x8 tile for `left` activation rows of `type` (out: up to 8 * X8_TILE_ROWS floats).
#define X8_TILE_ROWS 8
static inline int x8_height(int type, int left) {
  return (type == T_Q6_K || type == T_Q3_K || type == T_Q2_K || type == T_IQ4_XS) && Q6K_X8_ROWS == 8 && left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

// Activation rows [r0, r0 + mr) (mr 1, 2, 4 or x8_height's 8) against an interleaved group (gw) of `type` whose
// window is on super-block boundaries: out[8 r + e], activation row r0 + r, weight row e.
static void x8_tiles(int type, const uint8_t *gw, int g0, int groups, const int8_t *xq, const float *xd,
                     const int16_t *hs, int k, int span, int r0, int mr, float *out) {
  const int8_t *xr = xq + (size_t)r0 * k;
  const float *dr = xd + (size_t)r0 * (k / span);
  const int16_t *hr = hs + (size_t)r0 * (k / 16);
  if (block_values(type) == 32) {  // (the window in groups, not super-blocks)
    switch (mr) {
      case 4: blocks32_x8_tile_4(type, gw, g0, groups, xr, k, dr, hr, out); break;
      case 2: blocks32_x8_tile_2(type, gw, g0, groups, xr, k, dr, hr, out); break;
      default: blocks32_x8_tile_1(type, gw, g0, groups, xr, k, dr, hr, out);
    }
    return;
  }
  switch (mr) {
    case 8: x8_tile_8(type, gw, g0 / 8, groups / 8, xr, k, dr, hr, out); break;
    case 4: x8_tile_4(type, gw, g0 / 8, groups / 8, xr, k, dr, hr, out); break;
    case 2: x8_tile_2(type, gw, g0 / 8, groups / 8, xr, k, dr, hr, out); break;
    default: x8_tile_1(type, gw, g0 / 8, groups / 8, xr, k, dr, hr, out);
  }
}

INLINE __m256i rows8_values(int type, const uint8_t *blk, int j) {
  __m256i wv = group_values_avx2(type, blk, j);
  if (signed_values(type) && HAVE_VNNI) wv = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));
  return wv;
}

// N of a group for 8 rows: -(m0 * S0 + m1 * S1) from the negated sums.
INLINE __m256i rows8_mins(int type, const int8_t *x, int m0, int m1) {
  __m256i neg = _mm256_loadu_si256((const __m256i *)(x + 256));
  if (type == T_Q4_1 || type == T_Q5_1) return neg;
  if (type != T_Q2_K) return _mm256_mullo_epi32(neg, _mm256_set1_epi32(m0));
  __m256i neg_first = _mm256_loadu_si256((const __m256i *)(x + 288));
  return _mm256_add_epi32(_mm256_mullo_epi32(neg_first, _mm256_set1_epi32(m0)),
                          _mm256_mullo_epi32(_mm256_sub_epi32(neg, neg_first), _mm256_set1_epi32(m1)));
}

// Blocks of 8 interleaved rows, register-blocked: W weight rows (WTILE, or 1 for the rows left over)
// against one block of 8 activation rows, each 32-byte chunk of activations loaded once for all W
// (a block is 352 bytes a group, from L1 or L2: its traffic per multiply-add is W times lower than
// one weight row at a time). For each group one in-lane shuffle of a weight row's values serves two
// chunks of 4 values (c in the low 128 bits, c + 4 in the high ones) and one integer multiply-add meets
// them with 4 rows each (lane r = row r). Whatever W, each (weight row, activation row) gets the same
// integers and terms, so the same bits as every other path.
#if defined(__AVX512VL__)
#define WTILE 4  // 32 vector registers: 4 rows' 5 accumulators and unpacked values
#else
#define WTILE 2
#endif

// The super-block form: one super-block of W weight rows (blk) against the block's 8 rows, its
// integers summed per row (lanes as lo4/hi4 until the end), then one term each: p[w].
INLINE void rows8_superblock_w(int type, const uint8_t *const *blk, const int8_t *x0, const int W, __m256 *p) {
  const int mins = has_mins(type), off = value_offset(type) + (signed_values(type) ? ROWS8_BIAS : 0);
  sbscale s[WTILE];
  __m256i lo_sum[WTILE], hi_sum[WTILE], min_lo[WTILE], min_hi[WTILE];
#pragma GCC unroll 4
  for (int w = 0; w < W; w++) {
    super_ints(type, blk[w], &s[w]);
    lo_sum[w] = hi_sum[w] = min_lo[w] = min_hi[w] = _mm256_setzero_si256();
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; j++) {
    const int8_t *x = x0 + (size_t)j * ROWS8_GROUP_BYTES;
    __m256i wv[WTILE], lo4[WTILE], hi4[WTILE];
#pragma GCC unroll 4
    for (int w = 0; w < W; w++) {
      wv[w] = rows8_values(type, blk[w], j);
      lo4[w] = hi4[w] = _mm256_setzero_si256();
    }
#define W_CHUNK(c, imm)                                                            \
  {                                                                                \
    __m256i xa = _mm256_loadu_si256((const __m256i *)(x + 32 * c));                 \
    __m256i xb = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c));           \
    _Pragma("GCC unroll 4") for (int w = 0; w < W; w++) {                          \
      __m256i wc = _mm256_shuffle_epi32(wv[w], imm), x0c = xa, x1c = xb;           \
      if (signed_values(type) && !HAVE_VNNI) {                                     \
        x0c = _mm256_sign_epi8(x0c, wc), x1c = _mm256_sign_epi8(x1c, wc);          \
        wc = _mm256_sign_epi8(wc, wc);                                             \
      }                                                                            \
      lo4[w] = dpbusd_acc(lo4[w], wc, x0c);                                        \
      hi4[w] = dpbusd_acc(hi4[w], wc, x1c);                                        \
    }                                                                              \
  }
    W_CHUNK(0, 0x00) W_CHUNK(1, 0x55) W_CHUNK(2, 0xAA) W_CHUNK(3, 0xFF)
#undef W_CHUNK
    __m256i neg = _mm256_loadu_si256((const __m256i *)(x + 256));
    __m256i n_lo = _mm256_setzero_si256(), n_hi = _mm256_setzero_si256();
    if (off || type == T_Q2_K) {  // the halves' sums in rows8's lane order
      __m256i neg_first = _mm256_loadu_si256((const __m256i *)(x + 288));
      __m256i neg_second = _mm256_sub_epi32(neg, neg_first);
      n_lo = _mm256_permute2x128_si256(neg_first, neg_second, 0x20);
      n_hi = _mm256_permute2x128_si256(neg_first, neg_second, 0x31);
    }
#pragma GCC unroll 4
    for (int w = 0; w < W; w++) {
      __m256i scale = _mm256_srai_epi32(HALF_PAIR(s[w].sc, j), 16);
      __m256i mscale = mins ? _mm256_srai_epi32(HALF_PAIR(s[w].mn, j), 16) : _mm256_setzero_si256();
      if (off) {
        lo4[w] = _mm256_add_epi32(lo4[w], _mm256_slli_epi32(n_lo, offset_shift(off)));
        hi4[w] = _mm256_add_epi32(hi4[w], _mm256_slli_epi32(n_hi, offset_shift(off)));
      }
      if (type == T_Q2_K) {
        min_lo[w] = _mm256_add_epi32(min_lo[w], _mm256_mullo_epi32(n_lo, mscale));
        min_hi[w] = _mm256_add_epi32(min_hi[w], _mm256_mullo_epi32(n_hi, mscale));
      } else if (mins) {
        min_lo[w] = _mm256_add_epi32(min_lo[w], _mm256_mullo_epi32(neg, mscale));
      }
      lo_sum[w] = _mm256_add_epi32(lo_sum[w], _mm256_mullo_epi32(lo4[w], scale));
      hi_sum[w] = _mm256_add_epi32(hi_sum[w], _mm256_mullo_epi32(hi4[w], scale));
    }
  }
  __m256 dx = _mm256_loadu_ps((const float *)(x0 + 320));
#pragma GCC unroll 4
  for (int w = 0; w < W; w++) {
    __m256i I = _mm256_add_epi32(_mm256_permute2x128_si256(lo_sum[w], hi_sum[w], 0x20),
                                 _mm256_permute2x128_si256(lo_sum[w], hi_sum[w], 0x31));
    __m256i N = type != T_Q2_K ? min_lo[w]
                               : _mm256_add_epi32(_mm256_permute2x128_si256(min_lo[w], min_hi[w], 0x20),
                                                  _mm256_permute2x128_si256(min_lo[w], min_hi[w], 0x31));
    p[w] = group_term_ps(mins, I, N, _mm256_set1_ps(s[w].d), _mm256_set1_ps(s[w].dmin), dx);
  }
}

// The per-group form for W weight rows against one block of 8 interleaved rows: groups [u0, u0 + n8)
// of the window, group u0 + gi's terms into acc[w][gi].
INLINE void rows8_unit_w(int type, const uint8_t *const *wrows, int g0, int u0, int n8, const int8_t *xi,
                         const int W, __m256 (*acc)[8]) {
  const int mins = has_mins(type), off = value_offset(type) + (signed_values(type) ? ROWS8_BIAS : 0);
  const unsigned per_block = super_block(type) ? 8 : 1;
  size_t bb = block_bytes(type);
#pragma GCC unroll 8
  for (int gi = 0; gi < 8; gi++) {
    if (gi >= n8) continue;  // past the window: adds nothing
    unsigned gg = (unsigned)(g0 + u0 + gi), j = gg % per_block;
    const int8_t *x = xi + (size_t)(u0 + gi) * ROWS8_GROUP_BYTES;
    gscale s[WTILE];
    __m256i wv[WTILE], lo4[WTILE], hi4[WTILE];
#pragma GCC unroll 4
    for (int w = 0; w < W; w++) {
      const uint8_t *blk = wrows[w] + (size_t)(gg / per_block) * bb;
      group_ints(type, blk, (int)j, &s[w]);
      wv[w] = rows8_values(type, blk, (int)j);
      lo4[w] = hi4[w] = _mm256_setzero_si256();
    }
#define W_CHUNK(c, imm)                                                            \
  {                                                                                \
    __m256i xa = _mm256_loadu_si256((const __m256i *)(x + 32 * c));                 \
    __m256i xb = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * c));           \
    _Pragma("GCC unroll 4") for (int w = 0; w < W; w++) {                      \
      __m256i wc = _mm256_shuffle_epi32(wv[w], imm), x0c = xa, x1c = xb;           \
      if (signed_values(type) && !HAVE_VNNI) {                                     \
        x0c = _mm256_sign_epi8(x0c, wc), x1c = _mm256_sign_epi8(x1c, wc);          \
        wc = _mm256_sign_epi8(wc, wc);                                             \
      }                                                                            \
      lo4[w] = dpbusd_acc(lo4[w], wc, x0c);                                        \
      hi4[w] = dpbusd_acc(hi4[w], wc, x1c);                                        \
    }                                                                              \
  }
    W_CHUNK(0, 0x00) W_CHUNK(1, 0x55) W_CHUNK(2, 0xAA) W_CHUNK(3, 0xFF)
#undef W_CHUNK
    __m256i neg = _mm256_loadu_si256((const __m256i *)(x + 256)), neg_first = _mm256_loadu_si256((const __m256i *)(x + 288));
    __m256 dx = _mm256_loadu_ps((const float *)(x + 320));
#pragma GCC unroll 4
    for (int w = 0; w < W; w++) {
      // lanes: lo4 = rows 0-3 (first half) | rows 0-3 (second half), hi4 likewise rows 4-7; the types'
      // offsets (and the signed types' bias) come off the halves: - off * S_h = + off * the negated sums
      __m256i first = _mm256_permute2x128_si256(lo4[w], hi4[w], 0x20), second = _mm256_permute2x128_si256(lo4[w], hi4[w], 0x31);
      if (off) {
        first = _mm256_add_epi32(first, _mm256_slli_epi32(neg_first, offset_shift(off)));
        second = _mm256_add_epi32(second, _mm256_slli_epi32(_mm256_sub_epi32(neg, neg_first), offset_shift(off)));
      }
      __m256i I;
      if (half_scales(type))
        I = _mm256_add_epi32(_mm256_mullo_epi32(first, _mm256_set1_epi32(s[w].sc0)),
                             _mm256_mullo_epi32(second, _mm256_set1_epi32(s[w].sc1)));
      else if (super_block(type))
        I = _mm256_mullo_epi32(_mm256_add_epi32(first, second), _mm256_set1_epi32(s[w].sc0));
      else
        I = _mm256_add_epi32(first, second);
      __m256i N = mins ? rows8_mins(type, x, s[w].m0, s[w].m1) : _mm256_setzero_si256();
      acc[w][gi] = _mm256_add_ps(acc[w][gi], group_term_ps(mins, I, N, _mm256_set1_ps(s[w].dw), _mm256_set1_ps(s[w].bw), dx));
    }
  }
}

// W weight rows (wrows: each row's first byte; W = WTILE or 1) against one block of 8 interleaved
// rows: out[8 w + r].
INLINE void rows8_dot_w(int type, const uint8_t *const *wrows, int g0, int groups, const int8_t *xi, int span,
                        const int W, float *out) {
  __m256 acc[WTILE][8];
  for (int w = 0; w < W; w++)
    for (int e = 0; e < 8; e++) acc[w][e] = _mm256_setzero_ps();
  size_t bb = block_bytes(type), row_stride = W > 1 ? (size_t)(wrows[1] - wrows[0]) : 0;
  if (!super_form(type, span, g0, groups)) {
    for (int u0 = 0; u0 < groups; u0 += 8) rows8_unit_w(type, wrows, g0, u0, groups - u0 < 8 ? groups - u0 : 8, xi, W, acc);
  } else for (int b = 0; b < groups / 8; b++) {
    const uint8_t *blk[WTILE];
    __m256 p[WTILE];
    for (int w = 0; w < W; w++) {
      blk[w] = wrows[w] + (size_t)(g0 / 8 + b) * bb;
      // the next W rows' block (the next tile's): W short streams train the prefetcher late
      for (size_t o = 0; o < bb; o += 64) _mm_prefetch((const char *)(blk[w] + row_stride * W + o), _MM_HINT_T0);
    }
    rows8_superblock_w(type, blk, xi + (size_t)(8 * b) * ROWS8_GROUP_BYTES, W, p);
    for (int w = 0; w < W; w++) acc[w][b % 8] = _mm256_add_ps(acc[w][b % 8], p[w]);
  }
  for (int w = 0; w < W; w++) {  // tree8, lane by lane
    __m256 *A = acc[w];
    __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(A[0], A[1]), _mm256_add_ps(A[2], A[3])),
                             _mm256_add_ps(_mm256_add_ps(A[4], A[5]), _mm256_add_ps(A[6], A[7])));
    _mm256_storeu_ps(out + 8 * w, t);
  }
}

#define ROWS8_W_CASE(T)                                                       \
  case T:                                                                     \
    if (w == WTILE) rows8_dot_w(T, wrows, g0, groups, xi, span, WTILE, out);   \
    else rows8_dot_w(T, wrows, g0, groups, xi, span, 1, out);                  \
    break;
static void rows8_dot_w_any(int type, const uint8_t *const *wrows, int w, int g0, int groups, const int8_t *xi,
                            int span, float *out) {
  switch (type) {
    ROWS8_W_CASE(T_Q4_0) ROWS8_W_CASE(T_Q4_1) ROWS8_W_CASE(T_Q5_0) ROWS8_W_CASE(T_Q5_1)
    ROWS8_W_CASE(T_Q8_0) ROWS8_W_CASE(T_Q4_K) ROWS8_W_CASE(T_Q5_K) ROWS8_W_CASE(T_Q6_K)
    ROWS8_W_CASE(T_Q2_K) ROWS8_W_CASE(T_Q3_K) ROWS8_W_CASE(T_IQ4_NL) ROWS8_W_CASE(T_IQ4_XS)
  }
}

// xq's rows in blocks of 8 (the last one padded with zero rows), laid out for the tiles above: a group's
// 32 bytes at quad q (rows 4q..4q+3) and chunk c (0-3) hold, in the low 16 bytes, those rows' values
// 4c..4c+3 and, in the high 16, their values 16+4c..16+4c+3 (4 bytes a row, rows in order); then the
// 8 rows' negated sums of the group's values and of its first 16 values (int32), and their scales.
static void interleave8(const int8_t *xq, const float *xd, const int16_t *hs, int m, int k, int span, int8_t *xi) {
  int groups = k / 32, blocks = (m + 7) / 8;
#pragma omp parallel for schedule(static) if ((size_t)m * k >= 1 << 16)
  for (int b = 0; b < blocks; b++) {
    int rows = m - 8 * b < 8 ? m - 8 * b : 8;
    for (int g = 0; g < groups; g++) {
      int8_t *out = xi + ((size_t)b * groups + g) * ROWS8_GROUP_BYTES;
      __m256i v[8];
      int32_t sums[8], first_sums[8];
      float scales[8];
      for (int r = 0; r < 8; r++) {
        if (r < rows) {
          size_t row = (size_t)(8 * b + r);
          v[r] = _mm256_loadu_si256((const __m256i *)(xq + row * k + 32 * g));
          int s0 = hs[row * (k / 16) + 2 * g], s1 = hs[row * (k / 16) + 2 * g + 1];
          sums[r] = -(s0 + s1), first_sums[r] = -s0;
          scales[r] = xd[row * (k / span) + g / (span / 32)];
        } else {  // padding: a zero row
          v[r] = _mm256_setzero_si256();
          sums[r] = first_sums[r] = 0;
          scales[r] = 0.f;
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
      memcpy(out + 288, first_sums, 32);
      memcpy(out + 320, scales, 32);
    }
  }
}
#endif

// ---------------------------------------------------------------- prefill tiles on interleaved groups
//
// Big batches (a prompt's chunk) meet an interleaved Q4_K group 8 activation rows at a time: each
// vector of 4 values of the 8 weight rows is unpacked once for the 8 rows, and 16 independent
// multiply-add chains (two a row) keep VNNI's pipes full; 3 vectors a row stay in registers, which
// takes AVX-512VL's 32 (other builds keep the 4-row tiles and the 8-row blocks). The minimums' sums
// go two groups at a time through one int16 multiply-add (m <= 63, |S| <= 4064: exact). Row r's
// integers I and N are q4k_x8_tile's (integer adds in another order: the same numbers) and its float
// steps the same, so the same bits as every other path.
#if defined(__AVX2__) && defined(__AVX512VL__)
#define PF_ROWS 8
// Bytes ahead of its super-block that a group's first tile prefetches: at 8-16 activation rows (a
// decode step of 8+ streams) the group comes from memory while the tile's multiply-adds run, and the
// hardware prefetcher alone left them waiting (7B shapes, 8 rows, 2 threads: 1.2-1.3x with it; no
// change at 108 rows, where the later tiles find the group in cache and prefetch nothing).
#ifndef PF_PREFETCH
#define PF_PREFETCH 4096
#endif
static inline int pf_type(int type) { return type == T_Q4_K; }

// acc += u . s by 4-byte groups (vpdpbusd), accumulating in place: with the intrinsic, GCC copied each
// of the 16 accumulators to a fresh register around every multiply-add (a third of the loop's instructions).
static inline __m256i pf_dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
#else
  return dpbusd_acc(acc, u, s);
#endif
}

INLINE void q4k_x8_prefill_body(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                                const int16_t *hs, const int prefetch, float *out) {
  const int sbs_row = k / 256, H = k / 16;
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i byte = _mm256_set1_epi32(0xff), low16 = _mm256_set1_epi32(0x00ff00ff);
  __m256 A[PF_ROWS][8];
  for (int r = 0; r < PF_ROWS; r++)
    for (int e = 0; e < 8; e++) A[r][e] = _mm256_setzero_ps();
  for (int b = 0; b < sbs; b++) {
    const uint8_t *sb = gw + (size_t)(sb0 + b) * Q4K_X8_BYTES;
    if (prefetch)
      for (int o = 0; o < Q4K_X8_BYTES; o += 64) _mm_prefetch((const char *)(sb + PF_PREFETCH + o), _MM_HINT_T0);
    // lane = weight row: byte j of sc03 = scale j (j < 4), of sc47 = scale 4 + j; minimums likewise
    __m256i sc03, mn03, sc47, mn47;
    q4k_x8_scales(sb, &sc03, &mn03, &sc47, &mn47);
    const int8_t *x0 = xq + 256 * (size_t)b;
    __m256i I[PF_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < PF_ROWS; r++) I[r] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int i = 0; i < 4; i++) {  // groups 2i (low nibbles) and 2i + 1 (high nibbles)
      __m256i lo[PF_ROWS], hi[PF_ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < PF_ROWS; r++) lo[r] = hi[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int c = 0; c < 8; c++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(sb + 128 + 256 * i + 32 * c));
        __m256i wl = _mm256_and_si256(w, m4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
#pragma GCC unroll 8
        for (int r = 0; r < PF_ROWS; r++) {
          const int8_t *x = x0 + (size_t)r * k + 64 * i + 4 * c;
          int32_t xa, xb;
          memcpy(&xa, x, 4), memcpy(&xb, x + 32, 4);
          lo[r] = pf_dpbusd(lo[r], wl, _mm256_set1_epi32(xa));
          hi[r] = pf_dpbusd(hi[r], wh, _mm256_set1_epi32(xb));
        }
      }
      __m256i s4 = i < 2 ? sc03 : sc47;
      __m256i sa = _mm256_and_si256(_mm256_srli_epi32(s4, 16 * (i % 2)), byte);
      __m256i sbv = _mm256_and_si256(_mm256_srli_epi32(s4, 16 * (i % 2) + 8), byte);
#pragma GCC unroll 8
      for (int r = 0; r < PF_ROWS; r++)
        I[r] = _mm256_add_epi32(I[r], _mm256_add_epi32(_mm256_mullo_epi32(lo[r], sa), _mm256_mullo_epi32(hi[r], sbv)));
    }
    // N = -sum_j m_j S_j: int16 pairs (m_j, m_j+2) and (m_j+1, m_j+3) of each word of minimums
    __m256i mp[4] = {_mm256_and_si256(mn03, low16), _mm256_and_si256(_mm256_srli_epi16(mn03, 8), low16),
                     _mm256_and_si256(mn47, low16), _mm256_and_si256(_mm256_srli_epi16(mn47, 8), low16)};
    __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sb));
    __m256 dminv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 16)));
#pragma GCC unroll 8
    for (int r = 0; r < PF_ROWS; r++) {
      const int16_t *h = hs + (size_t)r * H + 16 * (size_t)b;
      uint32_t S[8];
      for (int j = 0; j < 8; j++) S[j] = (uint16_t)(int16_t)(h[2 * j] + h[2 * j + 1]);
      __m256i P = _mm256_setzero_si256();
      P = dpwssd_acc(P, mp[0], _mm256_set1_epi32((int)(S[0] | S[2] << 16)));
      P = dpwssd_acc(P, mp[1], _mm256_set1_epi32((int)(S[1] | S[3] << 16)));
      P = dpwssd_acc(P, mp[2], _mm256_set1_epi32((int)(S[4] | S[6] << 16)));
      P = dpwssd_acc(P, mp[3], _mm256_set1_epi32((int)(S[5] | S[7] << 16)));
      __m256i N = _mm256_sub_epi32(_mm256_setzero_si256(), P);
      A[r][b % 8] = _mm256_add_ps(A[r][b % 8], group_term_ps(1, I[r], N, dv, dminv, _mm256_set1_ps(xd[(size_t)r * sbs_row + b])));
    }
  }
  for (int r = 0; r < PF_ROWS; r++) store_tree8_lanes(A[r], out + 8 * r);
}

// The group's first tile streams it from memory (prefetching ahead); the next ones find it in cache.
static void q4k_x8_prefill(const uint8_t *gw, int sb0, int sbs, const int8_t *xq, int k, const float *xd,
                           const int16_t *hs, int first, float *out) {
  if (first) q4k_x8_prefill_body(gw, sb0, sbs, xq, k, xd, hs, 1, out);
  else q4k_x8_prefill_body(gw, sb0, sbs, xq, k, xd, hs, 0, out);
}
#else
#define PF_ROWS 4
static inline int pf_type(int type) { (void)type; return 0; }
#endif

// Activation rows a pass takes: their int8 values (64 x k bytes) stay in the core's L2 cache while
// every weight row streams past them once.
#define ROW_PASS 64
// Weight rows that take each block of activation rows in turn (see dc_gguf_matmul_parts).
#define ROWS8_WEIGHTS 8
// Batches below this many rows meet an interleaved group (ROWS8_LAYOUT) through its own tiles, 4 rows
// at a time (8 where x8_height says); from it, the group is unpacked for the 8-row blocks (a pf_type's
// group: its prefill tile instead). Measured (bench/README.md): at 16-64 rows the tiles beat unpacking
// (which cost 30-40% at 16 rows), while a real prefill of 118-1,490 tokens took 2.4-2.8x llama-server's
// time through them. The same results either way.
#ifndef X8_MAX_ROWS
#define X8_MAX_ROWS 65
#endif
// Batches from this many rows take the interleaved blocks of 8 (the same results as the per-row
// tiles: only the speed differs).
#ifndef ROWS8_MIN
#define ROWS8_MIN 5
#endif

// One weight tensor as the kernels address it: `rows` rows of row_bytes, blocks of bb bytes, in the
// file's row-major layout or interleaved (ROWS8_LAYOUT).
typedef struct {
  const uint8_t *w;
  size_t row_bytes, bb;
  int rows, type, interleaved;
} wtensor;

static inline wtensor weight_tensor(int type_flags, const uint8_t *w, int rows, int k_full) {
  wtensor t = {w, 0, 0, rows, base_type(type_flags), (type_flags & ROWS8_LAYOUT) != 0};
  t.bb = block_bytes(t.type);
  t.row_bytes = t.bb ? (size_t)(k_full / block_values(t.type)) * t.bb : 0;
  return t;
}

// The 32-value types' byte layout (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL): a block of a group of 8
// rows (8 blocks' worth) holds each field of the file's block with the 8 rows' copies side by side,
// in the file's order, so a field at byte `at` of a block lies at 8 * at: the 8 fp16 scales (16
// bytes: one _mm256_cvtph_ps), Q4_1's/Q5_1's 8 minimums, Q5's 8 words of high bits (lane = row), then
// the values in 4-byte chunks (one vector each, lane = row: Q8_0 values 4c..4c+3; the 4-bit types
// values 4c..4c+3 in the low nibbles and 16+4c..16+4c+3 in the high ones). The groups' blocks follow
// each other, so a group is one sequential stream (blocks32_x8_tile).
static int blocks32_piece(int type, int p, int *at, int *x8_at) {
  int halves = type == T_Q4_1 || type == T_Q5_1 ? 2 : 1;  // 2-byte fields before the 4-byte ones
  int start = p < halves ? 2 * p : 2 * halves + 4 * (p - halves);
  if (start >= (int)block_bytes(type)) return 0;
  return *at = start, *x8_at = 8 * start, p < halves ? 2 : 4;
}

// The byte layouts (x8) of a super-block of a group of 8 rows (Q3K_X8_BYTES..Q6K_X8_BYTES: 8 blocks'
// worth): a block's bytes in pieces of 2 or 4 bytes, piece p of row r at x8 + (its offset) + size * r,
// so the 8 rows' copies of a piece lie side by side. Q4_K: d (8 x 2 bytes), dmin, the three words of
// packed scales, then the values' 32 4-byte chunks in order (chunk 8i + c: values 4c..4c+3 of groups 2i
// and 2i + 1 as low and high nibbles). Q6_K: d, its 16 int8 scales as 4 words, then 16 steps of 96
// bytes in the order q6k_x8_tile reads them: step 8h + c holds chunk c of the high 2 bits of groups
// 4h..4h+3, then chunk c of the two 32-byte runs of low 4 bits that go with them (a sequential read:
// three interleaved runs read side by side measured 2x slower from memory). Q3_K, Q2_K and IQ4_XS: see
// their cases below.
// Piece p of a block: returns its size (0 past the last), its offset in the block and in x8.
static int x8_piece(int type, int p, int *at, int *x8_at) {
  if (block_values(type) == 32) return blocks32_piece(type, p, at, x8_at);
  if (type == T_Q2_K) {  // d, dmin, the scales as 4 words, then 8 steps of 64 bytes: step c holds chunk c
    // of the two runs of 2 bits (groups 0-3, 4-7)
    if (p < 2) return *at = 80 + 2 * p, *x8_at = 16 * p, 2;
    if (p < 6) return *at = 4 * (p - 2), *x8_at = 32 + 32 * (p - 2), 4;
    if (p < 22) {
      int i = p - 6, run = i / 8, c = i % 8;
      return *at = 16 + 32 * run + 4 * c, *x8_at = 160 + 64 * c + 32 * run, 4;
    }
    return 0;
  }
  if (type == T_IQ4_XS) {  // d, the high and the low bits of the scales, then the values' 32 chunks in order
    // (chunk 4j + c: values 4c..4c+3 of group j in the low nibbles, 16+4c..16+4c+3 in the high ones)
    if (p < 2) return *at = 2 * p, *x8_at = 16 * p, 2;
    if (p < 35) return *at = 4 + 4 * (p - 2), *x8_at = 32 + 32 * (p - 2), 4;
    return 0;
  }
  if (type == T_Q3_K) {  // d, the 3 words of packed scales, then 8 steps of 96 bytes (as Q6_K's): step c
    // holds chunk c of the high bits (all 8 groups), then chunk c of the two runs of 2 bits (groups 0-3, 4-7)
    if (p == 0) return *at = 108, *x8_at = 0, 2;
    if (p < 4) return *at = 96 + 4 * (p - 1), *x8_at = 16 + 32 * (p - 1), 4;
    if (p < 12) return *at = 4 * (p - 4), *x8_at = 112 + 96 * (p - 4), 4;
    if (p < 28) {
      int i = p - 12, run = i / 8, c = i % 8;
      return *at = 32 + 32 * run + 4 * c, *x8_at = 112 + 96 * c + 32 + 32 * run, 4;
    }
    return 0;
  }
  if (type == T_Q5_K) {  // Q4_K's pieces with the 5th bits' 8 chunks (x8 128..383) before the low bits
    if (p < 2) return *at = 2 * p, *x8_at = 16 * p, 2;
    if (p < 5) return *at = 4 + 4 * (p - 2), *x8_at = 32 + 32 * (p - 2), 4;
    if (p < 13) return *at = 16 + 4 * (p - 5), *x8_at = 128 + 32 * (p - 5), 4;
    if (p < 45) return *at = 48 + 4 * (p - 13), *x8_at = 384 + 32 * (p - 13), 4;
    return 0;
  }
  if (type == T_Q4_K) {
    if (p < 2) return *at = 2 * p, *x8_at = 16 * p, 2;
    if (p < 5) return *at = 4 + 4 * (p - 2), *x8_at = 32 + 32 * (p - 2), 4;
    if (p < 37) return *at = 16 + 4 * (p - 5), *x8_at = 128 + 32 * (p - 5), 4;
    return 0;
  }
  if (p == 0) return *at = 208, *x8_at = 0, 2;
  if (p < 5) return *at = 192 + 4 * (p - 1), *x8_at = 16 + 32 * (p - 1), 4;
  if (p < 37) {  // low bits: run `span` (32 bytes), chunk c
    int i = p - 5, span = i / 8, c = i % 8;
    return *at = 4 * i, *x8_at = 144 + 96 * (8 * (span / 2) + c) + 32 + 32 * (span % 2), 4;
  }
  if (p < 53) {  // high bits: run `half`, chunk c
    int i = p - 37, half = i / 8, c = i % 8;
    return *at = 128 + 4 * i, *x8_at = 144 + 96 * (8 * half + c), 4;
  }
  return 0;
}

// The types with a ROWS8_LAYOUT.
static inline int blocks32_x8_type(int type) {
  return type == T_Q8_0 || type == T_Q4_0 || type == T_Q5_0 || type == T_Q4_1 || type == T_Q5_1 || type == T_IQ4_NL;
}
static inline int x8_type(int type) {
  return type == T_Q4_K || type == T_Q6_K || type == T_Q5_K || type == T_Q3_K || type == T_Q2_K || type == T_IQ4_XS ||
         blocks32_x8_type(type);
}

// One group of 8 rows between the file's layout (row r's block b at rows + r * row_bytes + b * bb) and
// the byte layout, either way (pack: file to x8).
static void x8_copy(int type, uint8_t *rows, size_t row_bytes, size_t blocks, uint8_t *x8, int pack) {
  size_t bb = block_bytes(type);
  int at, x8_at, size;
  for (int p = 0; (size = x8_piece(type, p, &at, &x8_at)); p++)
    for (size_t b = 0; b < blocks; b++)
      for (int r = 0; r < 8; r++) {
        uint8_t *blk = rows + r * row_bytes + b * bb + at, *there = x8 + b * 8 * bb + x8_at + size * r;
        uint8_t *from = pack ? blk : there, *to = pack ? there : blk;
        if (size == 4) memcpy(to, from, 4);  // (constant sizes: moves, not calls)
        else memcpy(to, from, 2);
      }
}

// Unit g (rows 8g.. of at most 8) of a tensor in the file's layout, as the per-row kernels read it
// (its rows row_bytes apart): an interleaved group is first unpacked into *scratch (8 rows, allocated
// on first use; NULL result: no memory).
static const uint8_t *unit_rows(const wtensor *t, int g, uint8_t **scratch) {
  const uint8_t *base = t->w + (size_t)g * 8 * t->row_bytes;
  if (!t->interleaved || t->rows - 8 * g < 8) return base;  // (rows after the last whole group too)
  if (!*scratch) *scratch = malloc(8 * t->row_bytes);
  if (!*scratch) return NULL;
  x8_copy(t->type, *scratch, t->row_bytes, t->row_bytes / t->bb, (uint8_t *)base, 0);
  return *scratch;
}

// Rearranges a tensor of `rows` rows of k values of `type` (an x8_type, no layout bit) in place into
// ROWS8_LAYOUT, one group of 8 rows at a time (scratch: one group). Returns 0, -1 for a type or width it
// does not take, -2 without memory.
int dc_gguf_interleave(int type, uint8_t *w, int rows, int k) {
  if (!x8_type(type) || k % block_values(type) != 0 || rows < 0) return -1;
  size_t bb = block_bytes(type), blocks = (size_t)(k / block_values(type)), row_bytes = blocks * bb;
  uint8_t *scratch = malloc(8 * row_bytes);
  if (!scratch) return -2;
  for (int g = 0; 8 * g + 8 <= rows; g++) {  // whole groups; the rows after them keep the file's layout
    uint8_t *group = w + (size_t)g * 8 * row_bytes;
    memcpy(scratch, group, 8 * row_bytes);
    x8_copy(type, scratch, row_bytes, blocks, group, 1);
  }
  free(scratch);
  return 0;
}

// The values a scale of the activations spans for a product with these parts: 256 where every part
// is a 256-value super-block type read from a super-block boundary (k0 NULL: whole rows) and k is
// whole super-blocks, so the super-block kernels sum each super-block in integers; else 32.
int dc_gguf_activation_span(int parts, const int *types, const int *k0, int k) {
  if (k % 256 != 0) return 32;
  for (int p = 0; p < parts; p++) {
    int type = base_type(types[p]);
    if (block_values(type) != 256 || block_bytes(type) == 0 || (k0 && k0[p] % 256 != 0)) return 32;
  }
  return 256;
}

// x [m, k] -> the int8 activations every product with a k-wide weight then reads: xq m*k bytes,
// xd m*k/32 floats, xs m*k/16 floats (room for the int16 half sums); one scale per span values
// (dc_gguf_activation_span's answer for the weight). k must be a multiple of 32 (and of the span).
void dc_gguf_quantize_x(const float *x, int m, int k, int8_t *xq, float *xd, float *xs, int span) {
  quantize_rows(x, m, k, span == 256 && k % 256 == 0 ? 256 : 32, xq, xd, (int16_t *)xs);
}

#if defined(__AVX2__)
// Whether a batch of m rows meets this part's interleaved groups through their own tiles (x8_tiles,
// q4k_x8_prefill): below X8_MAX_ROWS rows, or at any size for a pf_type.
static int x8_direct(const wtensor *t, int span, int g0, int groups, int m) {
  return t->interleaved && x8_window(t->type, span, g0, groups) && (m < X8_MAX_ROWS || pf_type(t->type));
}
#endif

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
  span = span == 256 && k % 256 == 0 ? 256 : 32;  // as dc_gguf_quantize_x took it
  enum { MAX_PARTS = 8 };
  wtensor wt[MAX_PARTS];
  int first_group[MAX_PARTS], n = 0;
  const int16_t *hs = (const int16_t *)xs;
  if (parts < 1 || parts > MAX_PARTS || k % 32 != 0) return -1;
  for (int p = 0; p < parts; p++) {
    int full = k_full ? k_full[p] : k, start = k0 ? k0[p] : 0;
    wt[p] = weight_tensor(types[p], w[p], rows[p], full);
    int type = wt[p].type;
    if (wt[p].bb == 0 || float16_type(type) || full % block_values(type) != 0 || start % 32 != 0 || start + k > full ||
        rows[p] < 0)
      return -1;
    first_group[p] = start / 32;
    n += rows[p];
  }
  int groups = k / 32, units = 0;
  for (int p = 0; p < parts; p++) units += (rows[p] + 7) / 8;
#if defined(__AVX2__)
  int8_t *xi = NULL;  // ROWS8_MIN rows or more: blocks of 8, interleaved for rows8_dot
  int blocks8 = m >= ROWS8_MIN, direct = 1;
  for (int p = 0; p < parts; p++)  // (rows after a part's last whole group keep the file's layout)
    direct &= x8_direct(&wt[p], span, first_group[p], groups, m) && rows[p] % 8 == 0;
  if (blocks8 && !direct) {  // (where every unit takes its group's own tiles, no unit reads the blocks)
    xi = malloc((size_t)((m + 7) / 8) * groups * ROWS8_GROUP_BYTES);
    if (xi) interleave8(xq, xd, hs, m, k, span, xi);
    else blocks8 = 0;
  }
  if (blocks8) {
    // Units of up to 8 weight rows of one part, each 16-row block of activations met by the whole unit
    // in turn: a block (k/32 groups x 352 bytes each: 10 KB at k = 896) is then read from L1 by every
    // row of the unit, not from L2 once a weight row.
    size_t block_stride = (size_t)groups * ROWS8_GROUP_BYTES;
    int failed = 0;
    // Handed out in chunks as threads come free (about 32 a thread: the last one's wait is then ~1%
    // of the product), not split in equal shares up front: a unit of a slower type (Q6_K beside Q4_K
    // in a fused q/k/v) or a thread the OS takes away for a while would otherwise leave the others
    // spinning at the end. Which thread computes a unit never changes its bits.
    int chunk = units / (32 * omp_get_max_threads());
#pragma omp parallel for schedule(dynamic, chunk > 0 ? chunk : 1)
    for (int u = 0; u < units; u++) {
      int p = 0, unit = u, i = 0;
      while (unit >= (rows[p] + 7) / 8) unit -= (rows[p] + 7) / 8, i += rows[p++];
      int row0 = 8 * unit, count = rows[p] - row0 < 8 ? rows[p] - row0 : 8, g0 = first_group[p];
      if (count == 8 && x8_direct(&wt[p], span, g0, groups, m)) {
        // an interleaved group: its tiles over the activation rows 4 at a time, or 8 (pf_type) (the
        // group stays in L1/L2 meanwhile; faster than unpacking it for the 8-row blocks)
        const uint8_t *gw = wt[p].w + (size_t)row0 * wt[p].row_bytes;
        for (int r0 = 0; r0 < m;) {
          // Q4_K: its prefill tile 8 rows at a time (PF_ROWS, where the build has it); the others
          // x8_height's 8 (Q6_K, Q3_K on AVX-512VL), 4, 2 or 1
          int pf = pf_type(wt[p].type) && m - r0 >= PF_ROWS, mr = pf ? PF_ROWS : x8_height(wt[p].type, m - r0);
          float out[8 * (PF_ROWS > X8_TILE_ROWS ? PF_ROWS : X8_TILE_ROWS)];
#if PF_ROWS > MAX_TILE
          if (pf)
            q4k_x8_prefill(gw, g0 / 8, groups / 8, xq + (size_t)r0 * k, k, xd + (size_t)r0 * (k / span),
                           hs + (size_t)r0 * (k / 16), r0 == 0, out);
          else
#endif
          x8_tiles(wt[p].type, gw, g0, groups, xq, xd, hs, k, span, r0, mr, out);
          for (int r = 0; r < mr; r++)
            for (int e = 0; e < 8; e++)
              y[(size_t)(r0 + r) * ldy + i + row0 + e] = out[8 * r + e] + (bias && bias[p] ? bias[p][row0 + e] : 0.f);
          r0 += mr;
        }
        continue;
      }
      uint8_t *scratch = NULL;
      const uint8_t *first = unit_rows(&wt[p], unit, &scratch);
      if (!first) {
        failed = 1;
        continue;
      }
      for (int r0 = 0; r0 < m; r0 += 16) {
        int left = m - r0, blocks = left > 8 ? 2 : 1, rows_here = left < 8 * blocks ? left : 8 * blocks;
        for (int e0 = 0; e0 < count;) {
          int wn = e0 + WTILE <= count ? WTILE : 1;  // WTILE weight rows at once where there are that many
          const uint8_t *wrows[WTILE];
          float outw[8 * WTILE];
          for (int e = 0; e < wn; e++) wrows[e] = first + (size_t)(e0 + e) * wt[p].row_bytes;
          for (int nb = 0; nb < blocks; nb++) {
            rows8_dot_w_any(wt[p].type, wrows, wn, first_group[p], groups,
                            xi + (size_t)(r0 / 8 + nb) * block_stride, span, outw);
            for (int e = 0; e < wn; e++) {
              int row = row0 + e0 + e;
              float b = bias && bias[p] ? bias[p][row] : 0.f;
              for (int r = 0; r < 8 && 8 * nb + r < rows_here; r++) y[(size_t)(r0 + 8 * nb + r) * ldy + i + row] = outw[8 * e + r] + b;
            }
          }
          e0 += wn;
        }
      }
      free(scratch);
    }
    free(xi);
    return failed ? -2 : 0;
  }
#endif
  int failed = 0;
  for (int p0 = 0; p0 < m; p0 += ROW_PASS) {
    int p1 = m - p0 < ROW_PASS ? m : p0 + ROW_PASS;
    // units of up to 8 weight rows of one part: an interleaved group read as one stream where a kernel
    // takes it (x8_tile_*), any other unit row by row
#pragma omp parallel for schedule(static)
    for (int u = 0; u < units; u++) {
      int p = 0, unit = u, i = 0;
      while (unit >= (rows[p] + 7) / 8) unit -= (rows[p] + 7) / 8, i += rows[p++];
      const wtensor *t = &wt[p];
      int type = t->type, row0 = 8 * unit, count = rows[p] - row0 < 8 ? rows[p] - row0 : 8, g0 = first_group[p];
      int whole = t->interleaved && count == 8 && x8_window(type, span, g0, groups);
      const uint8_t *gw = t->w + (size_t)row0 * t->row_bytes;
      float out[8 * MAX_TILE];
      for (int r0 = p0; r0 < p1;) {
        int left = p1 - r0, mr = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const int8_t *xr = xq + (size_t)r0 * k;
        const float *dr = xd + (size_t)r0 * (k / span);
        const int16_t *hr = hs + (size_t)r0 * (k / 16);
#if defined(__AVX2__)
        if (whole) x8_tiles(type, gw, g0, groups, xq, xd, hs, k, span, r0, mr, out);
        else
#else
        (void)whole, (void)gw;
#endif
        {
          uint8_t *scratch = NULL;
          const uint8_t *first = unit_rows(t, unit, &scratch);
          if (!first) {
            failed = 1;
            break;
          }
          for (int e = 0; e < count; e++) {
            float o[MAX_TILE];
            const uint8_t *wrow = first + (size_t)e * t->row_bytes;
            switch (mr) {
              case 4: tile_dot_4(type, wrow, g0, groups, xr, k, dr, hr, span, o); break;
              case 2: tile_dot_2(type, wrow, g0, groups, xr, k, dr, hr, span, o); break;
              default: tile_dot_1(type, wrow, g0, groups, xr, k, dr, hr, span, o);
            }
            for (int r = 0; r < mr; r++) out[8 * r + e] = o[r];
          }
          free(scratch);
        }
        for (int r = 0; r < mr; r++)
          for (int e = 0; e < count; e++)
            y[(size_t)(r0 + r) * ldy + i + row0 + e] = out[8 * r + e] + (bias && bias[p] ? bias[p][row0 + e] : 0.f);
        r0 += mr;
      }
    }
  }
  return failed ? -2 : 0;
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

// Weight rows [row0, row0 + rows) of a tensor of `total` rows as float32 into out [rows, k] (float
// fallbacks, tests; type may carry ROWS8_LAYOUT).
int dc_gguf_dequantize(int type, const uint8_t *w, int row0, int rows, int total, int k, float *out) {
  wtensor t = weight_tensor(type, w, total, k);
  if (t.bb == 0 || k % block_values(t.type) != 0 || row0 < 0 || rows < 0 || row0 + rows > total) return -1;
  int failed = 0, u0 = row0 / 8, u1 = (row0 + rows + 7) / 8;
#pragma omp parallel for schedule(static)
  for (int u = u0; u < u1; u++) {  // units of 8 rows (an interleaved group read through unit_rows)
    uint8_t *scratch = NULL;
    const uint8_t *first = unit_rows(&t, u, &scratch);
    if (!first) {
      failed = 1;
      continue;
    }
    for (int e = 0; e < 8; e++) {
      int row = 8 * u + e;
      if (row >= row0 && row < row0 + rows) dequantize_row(t.type, first + (size_t)e * t.row_bytes, k, out + (size_t)(row - row0) * k);
    }
    free(scratch);
  }
  return failed ? -2 : 0;
}

// Rows ids[0..n) of a GGUF weight [total, k] as float32 out [n, k]: an embedding lookup that
// dequantizes only the rows it reads (type may carry ROWS8_LAYOUT: the table a tied head shares is
// interleaved for the head's products; a row of a whole group is then read by unpacking its group).
// Returns -1 for a type or width the kernels lack or an id outside [0, total), -2 without memory.
int dc_gguf_dequantize_rows(int type, const uint8_t *w, int total, const int64_t *ids, int n, int k, float *out) {
  wtensor t = weight_tensor(type, w, total, k);
  if (t.bb == 0 || k % block_values(t.type) != 0) return -1;
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= total) return -1;
  int failed = 0;
#pragma omp parallel for schedule(static) if (n >= 64)
  for (int i = 0; i < n; i++) {
    int row = (int)ids[i];
    uint8_t *scratch = NULL;  // one group's rows, unpacked (8 times a row's bytes: far below the dequantization's cost)
    const uint8_t *first = unit_rows(&t, row / 8, &scratch);
    if (!first) failed = 1;
    else dequantize_row(t.type, first + (size_t)(row % 8) * t.row_bytes, k, out + (size_t)i * k);
    free(scratch);
  }
  return failed ? -2 : 0;
}
