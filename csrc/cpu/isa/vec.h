// The vector types of the CPU kernels: GCC/Clang vector extensions as wide as the instruction set
// the including object is compiled for (16 bytes for baseline x86-64, 32 for AVX2, 64 for
// AVX-512), with the loads, stores and conversions of the four dtypes (Traits). Included only by
// the files of csrc/cpu/isa/, inside their per-instruction-set namespace (isa_object.h): every
// function here is a distinct symbol in each object, so no AVX2 code can stand in for a baseline
// one at link time.
//
// Conversions: float16 through F16C/AVX-512 instructions where present, else exact integer
// arithmetic; bfloat16 by shifts (to float32) and round-to-nearest-even on the bits (from it).
#pragma once

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef double vdouble __attribute__((vector_size(kVecBytes)));
typedef int32_t vint32 __attribute__((vector_size(kVecBytes)));
typedef uint32_t vuint32 __attribute__((vector_size(kVecBytes)));
typedef int64_t vint64 __attribute__((vector_size(kVecBytes)));
typedef uint16_t vuint16_half __attribute__((vector_size(kVecBytes / 2)));  // as many lanes as vfloat

// The vector of an accumulator type and its lane count.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vfloat;
  using bits = vint32;
  static constexpr int kLanes = kVecBytes / 4;
};
template <>
struct Vec<double> {
  using type = vdouble;
  using bits = vint64;
  static constexpr int kLanes = kVecBytes / 8;
};

// Every lane value: a broadcast. value - 0 keeps every value's bits (-0.0 - 0.0 is -0.0), where
// V{} + value would turn -0.0 into +0.0, and compiles to the broadcast alone.
template <typename V, typename S>
inline V splat(S value) {
  return value - V{};
}

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// |x|: the sign bit cleared (nan stays nan).
inline vfloat vabs(const vfloat& x) { return (vfloat)((vint32)x & 0x7fffffff); }
inline vdouble vabs(const vdouble& x) { return (vdouble)((vint64)x & INT64_C(0x7fffffffffffffff)); }

// --- float16 --------------------------------------------------------------------------------------

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  // Exponent and mantissa moved into float32's fields, then scaled by 2^112 (exact, subnormals
  // included); inf and nan keep their mantissa under an all-ones exponent.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits;
  if (em >= 0x7c00u) {
    bits = (em << 13) | 0x7f800000u;
  } else {
    float f;
    const uint32_t shifted = em << 13;
    std::memcpy(&f, &shifted, 4);
    f *= 0x1.0p+112f;
    std::memcpy(&bits, &f, 4);
  }
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  // Round to nearest even by letting float32 addition do the rounding at the float16 precision
  // (the bias moves the mantissa bits to drop below the float32 ulp); overflow goes to inf.
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
  float bias_value, base = (f < 0 ? -f : f) * 0x1.0p+112f * 0x1.0p-110f;
  std::memcpy(&bias_value, &bias_bits, 4);
  base = bias_value + base;
  uint32_t b;
  std::memcpy(&b, &base, 4);
  const uint32_t nonsign = ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
#endif
}

inline vfloat load_half(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__) && defined(__F16C__)
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  const vint32 h = __builtin_convertvector(load<vuint16_half>(p), vint32);
  const vint32 sign = (h & 0x8000) << 16;
  const vint32 em = h & 0x7fff;
  const vint32 scaled = (vint32)((vfloat)(em << 13) * 0x1.0p+112f);
  return (vfloat)((em >= 0x7c00 ? ((em << 13) | 0x7f800000) : scaled) | sign);
#endif
}

inline void store_half(uint16_t* p, const vfloat& v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX2__) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int l = 0; l < Vec<float>::kLanes; ++l) p[l] = float_to_half(v[l]);
#endif
}

// --- bfloat16 -------------------------------------------------------------------------------------

inline float bfloat16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Round to nearest even on the bits; nan becomes the canonical quiet nan, as torch's conversion.
inline uint16_t float_to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline vfloat load_bfloat16(const uint16_t* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  // One widening load (GCC's generic conversion takes two halves and an insert).
  return (vfloat)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  return (vfloat)(__builtin_convertvector(load<vuint16_half>(p), vuint32) << 16);
#endif
}

// The bits of v rounded to bfloat16 (to nearest even; nan the canonical quiet nan), in the low 16
// bits of each 32-bit lane.
inline vuint32 bfloat16_bits(const vfloat& v) {
  const vuint32 u = (vuint32)v;
  const vuint32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? splat<vuint32>(0x7fc0u) : rounded;
}

inline void store_bfloat16(uint16_t* p, const vfloat& v) {
  store(p, __builtin_convertvector(bfloat16_bits(v), vuint16_half));
}

// Two vectors' worth, at p and p + the lane count: on AVX2 one saturating pack of both (every value
// is at most 0xffff, so exact) and a lane permute, where one vector alone would waste half a pack.
inline void store_bfloat16_pair(uint16_t* p, const vfloat& a, const vfloat& b) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256i packed = _mm256_packus_epi32((__m256i)bfloat16_bits(a), (__m256i)bfloat16_bits(b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
#else
  store_bfloat16(p, a);
  store_bfloat16(p + Vec<float>::kLanes, b);
#endif
}

// --- the four dtypes: storage, accumulator, and their loads and stores ----------------------------

template <DType dtype>
struct Traits;

template <>
struct Traits<DType::kFloat32> {
  using storage = float;
  using acc = float;
  static vfloat load(const float* p) { return ::FUSEDCLIP_ISA_NAMESPACE::load<vfloat>(p); }
  static void store(float* p, const vfloat& v) { ::FUSEDCLIP_ISA_NAMESPACE::store(p, v); }
  static void store2(float* p, const vfloat& a, const vfloat& b) { store(p, a), store(p + Vec<float>::kLanes, b); }
  static float widen(float x) { return x; }
  static float narrow(float x) { return x; }
};

template <>
struct Traits<DType::kFloat64> {
  using storage = double;
  using acc = double;
  static vdouble load(const double* p) { return ::FUSEDCLIP_ISA_NAMESPACE::load<vdouble>(p); }
  static void store(double* p, const vdouble& v) { ::FUSEDCLIP_ISA_NAMESPACE::store(p, v); }
  static void store2(double* p, const vdouble& a, const vdouble& b) { store(p, a), store(p + Vec<double>::kLanes, b); }
  static double widen(double x) { return x; }
  static double narrow(double x) { return x; }
};

template <>
struct Traits<DType::kFloat16> {
  using storage = uint16_t;
  using acc = float;
  static vfloat load(const uint16_t* p) { return load_half(p); }
  static void store(uint16_t* p, const vfloat& v) { store_half(p, v); }
  static void store2(uint16_t* p, const vfloat& a, const vfloat& b) { store(p, a), store(p + Vec<float>::kLanes, b); }
  static float widen(uint16_t x) { return half_to_float(x); }
  static uint16_t narrow(float x) { return float_to_half(x); }
};

template <>
struct Traits<DType::kBFloat16> {
  using storage = uint16_t;
  using acc = float;
  static vfloat load(const uint16_t* p) { return load_bfloat16(p); }
  static void store(uint16_t* p, const vfloat& v) { store_bfloat16(p, v); }
  static void store2(uint16_t* p, const vfloat& a, const vfloat& b) { store_bfloat16_pair(p, a, b); }
  static float widen(uint16_t x) { return bfloat16_to_float(x); }
  static uint16_t narrow(float x) { return float_to_bfloat16(x); }
};
