/* Portable SIMD helpers for the native CPU kernels: GCC/Clang vector extensions, 16 floats per vector
 * (one AVX-512 register, two AVX2 registers, four NEON registers; the compiler picks). */
#ifndef SPARSEMOE_VEC_H
#define SPARSEMOE_VEC_H

#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4))); /* unaligned access */
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
#define VL 16

/* Keep a value in a register: without it GCC reloads loop-invariant vectors from memory for every FMA. */
#if defined(__AVX512F__)
#define PIN(v) __asm__("" : "+v"(v))
#else
#define PIN(v) ((void)0)
#endif

static inline vf load(const float* p) { return *(const vfu*)p; }
static inline void store(float* p, vf v) { *(vfu*)p = v; }
static inline vf splat(float s) { return (vf){0} + s; }

/* bfloat16 values (the top 16 bits of a float32, stored as uint16_t): widened to float32 exactly; stored
 * rounded to nearest-even as PyTorch's conversion does, NaN -> 0x7FC0. With AVX-512 each direction is one
 * conversion instruction and a shift or the rounding (GCC lowers the generic forms to six or more). */
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef uint16_t vbf16 __attribute__((vector_size(32)));
typedef uint16_t vbf16u __attribute__((vector_size(32), aligned(2))); /* unaligned */

static inline vu32 bf16_bits(vf v) {
  vu32 bits = (vu32)v;
  vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  vu32 nan = (vu32)(v != v);
  return (rounded & ~nan) | (0x7FC0u & nan);
}
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf load_bf16(const uint16_t* p) {
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
}
static inline void store_bf16(uint16_t* p, vf v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)bf16_bits(v)));
}
#else
static inline vf load_bf16(const uint16_t* p) { return (vf)(__builtin_convertvector(*(const vbf16u*)p, vu32) << 16); }
static inline void store_bf16(uint16_t* p, vf v) { *(vbf16u*)p = __builtin_convertvector(bf16_bits(v), vbf16); }
#endif

/* 32 bfloat16 values and the CPU's pair dot product (AVX512-BF16: acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1],
 * products exact, sums float32, bfloat16 denormals read as zero); HAVE_DPBF16 is 0 where the CPU (as the
 * compiler targets it) has none, and the callers keep their float32 path. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
typedef __m512bh vbf16x32;
static inline vbf16x32 load_bf16x32(const uint16_t* p) { return (vbf16x32)_mm512_loadu_si512((const void*)p); }
static inline vf dot_bf16x32(vf acc, vbf16x32 a, vbf16x32 b) { return (vf)_mm512_dpbf16_ps((__m512)acc, a, b); }
#else
#define HAVE_DPBF16 0
#endif

/* 16 bytes from p: unsigned, zero-extended into the lanes of an int32 vector; signed, as floats. */
typedef uint8_t vu8x16 __attribute__((vector_size(16), aligned(1)));
typedef int8_t vi8x16 __attribute__((vector_size(16), aligned(1)));
#if defined(__AVX512F__) /* GCC scalarises the generic conversions below: one instruction each here */
static inline vi load_u8x16(const uint8_t* p) { return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline vf load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#else
static inline vi load_u8x16(const uint8_t* p) { return __builtin_convertvector(*(const vu8x16*)p, vi); }
static inline vf load_i8(const int8_t* p) { return __builtin_convertvector(__builtin_convertvector(*(const vi8x16*)p, vi), vf); }
#endif

static inline float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* One float rounded to bfloat16 bits as bf16_bits rounds a vector (nearest-even, NaN -> 0x7FC0). */
static inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if (f != f) return 0x7FC0u;
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* The first n (< VL) values, the rest zero; and its inverse. For loop tails, so they use the same math:
 * load_part / store_part (float) and load_part_bf16 / store_part_bf16, through a VL-value buffer. */
#define DEFINE_PARTIAL_ACCESS(T, SUFFIX)                                        \
  static inline vf load_part##SUFFIX(const T* p, int64_t n) {                   \
    T buf[VL] = {0};                                                            \
    memcpy(buf, p, (size_t)n * sizeof(T));                                      \
    return load##SUFFIX(buf);                                                   \
  }                                                                             \
  static inline void store_part##SUFFIX(T* p, vf v, int64_t n) {                \
    T buf[VL];                                                                  \
    store##SUFFIX(buf, v);                                                      \
    memcpy(p, buf, (size_t)n * sizeof(T));                                      \
  }
DEFINE_PARTIAL_ACCESS(float, )
DEFINE_PARTIAL_ACCESS(uint16_t, _bf16)
#undef DEFINE_PARTIAL_ACCESS

static inline float hsum(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

/* mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give). */
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* min/max that keep NaN in x (a comparison with NaN is false, so x is selected). */
static inline vf clamp_keep_nan(vf x, float lo, float hi) {
  x = vselect(x > splat(hi), splat(hi), x);
  return vselect(x < splat(lo), splat(lo), x);
}

/* exp(x), float32, within 2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 and p the degree-6
 * minimax polynomial of the Cephes library. Past the float range it gives inf (x > 88.72) and 0
 * (x < -87.33: below the smallest normal float, denormals are flushed); NaN stays NaN. */
static inline vf vexp(vf x) {
  vf xc = clamp_keep_nan(x, -87.33f, 88.37f);
  const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  vf n = (xc * splat(1.44269504088896341f) + magic) - magic;
  vf r = xc - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n as float bits; n in [-126, 127] */
  vf y = p * (vf)e;
  y = vselect(x > splat(88.72f), splat(__builtin_inff()), y);
  return vselect(x < splat(-87.33f), splat(0.0f), y);
}

#endif
