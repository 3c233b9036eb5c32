// int8 activations for the quantized matmul (kernels/native/quantized_matmul.cc): what
// llama.cpp does for its Q4/Q8 dot products, and the reason it multiplies four times as many
// weights per instruction as float32 FMAs.
//
// x is quantized per row and block of 32 inputs (QuantizeRows, the same arithmetic as
// kernels/quantized_matmul.quantize_rows_int8): d = max|x| * (1/127), q = round_half_even(x * (1/d))
// in [-127, 127] (all zero when d = 0). A block's dot product with a weight column is then an
// exact integer sum S = sum_j q_x[j] q_w[j] (|S| < 2^20), and
//   y += d_x * (d_w * S + m_w * sum_j q_x[j])      (q8: m_w = 0)
// in float32. vpdpbusd multiplies four unsigned bytes by four signed bytes and adds the four
// products into an int32 lane: the weights' 16 columns in the lanes, four consecutive inputs in
// each lane's bytes, the four x bytes broadcast. q4 codes (0..15) are the unsigned operand and x
// the signed one. q8 codes are signed, so x goes in unsigned, as q_x + 128, and 128 * sum_j q_w[j]
// is taken off again.

#ifndef JAXLLM_QUANTIZED_MATMUL_INT8_H_
#define JAXLLM_QUANTIZED_MATMUL_INT8_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace int8_activations {

constexpr int kBlock = 32;
constexpr int kCols = 16;

// x f32 [rows, K] row-major -> q s8 [rows, K] (and, for q8 weights, u = q + 128 as u8), the
// scale d [rows, K/32] and the offset term d * sum(q) [rows, K/32] of each block.
inline void QuantizeRows(const float* x, int64_t rows, int64_t blocks, int8_t* q, uint8_t* u,
                         float* scale, float* offset) {
  const int64_t k = blocks * kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = x + r * k + b * kBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float d = amax * (1.0f / 127.0f);
      const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
      // vcvtps2dq rounds by MXCSR: to nearest even, as nearbyint below; |x * id| <= 127.
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
      const __m256i packed = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm512_cvtsepi32_epi8(qlo)), _mm512_cvtsepi32_epi8(qhi), 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * k + b * kBlock), packed);
      if (u != nullptr) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + r * k + b * kBlock),
                            _mm256_xor_si256(packed, _mm256_set1_epi8(static_cast<char>(0x80))));
      }
      scale[r * blocks + b] = d;
      offset[r * blocks + b] =
          d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
#else
      float amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
      const float d = amax * (1.0f / 127.0f);
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      int8_t* qb = q + r * k + b * kBlock;
      int32_t sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        // nearbyint: the current rounding mode, round half to even (as jnp.round).
        const float v = std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(xb[j] * id)));
        qb[j] = static_cast<int8_t>(v);
        sum += qb[j];
      }
      if (u != nullptr) {
        for (int j = 0; j < kBlock; ++j) u[r * k + b * kBlock + j] = static_cast<uint8_t>(qb[j] + 128);
      }
      scale[r * blocks + b] = d;
      offset[r * blocks + b] = d * static_cast<float>(sum);
#endif
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
// Byte 4l + i of the result = byte 16i + l of the input: four code rows of 16 columns
// ([input][column]) become 16 lanes of four consecutive inputs ([column][input]).
inline __m512i QuadIndex() {
  alignas(64) static constexpr uint8_t kIndex[64] = {
      0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51,
      4, 20, 36, 52, 5, 21, 37, 53, 6, 22, 38, 54, 7, 23, 39, 55,
      8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
  return _mm512_load_si512(kIndex);
}

// The weights of one block of 16 columns as 8 quad vectors, inputs 4i..4i+3 in w[i]; q8: also
// -128 * each column's code sum (what q_x + 128 adds).
inline void Q4Quads(const uint8_t* codes, __m512i w[8]) {
  const __m512i index = QuadIndex(), low = _mm512_set1_epi8(15);
  for (int i = 0; i < 4; ++i) {  // code rows 4i..4i+3 hold inputs 4i.. (low) and 16+4i.. (high)
    const __m512i t = _mm512_permutexvar_epi8(index, _mm512_loadu_si512(codes + 64 * i));
    w[i] = _mm512_and_si512(t, low);
    w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(t, 4), low);
  }
}

inline __m512i Q8Quads(const int8_t* codes, __m512i w[8]) {
  const __m512i index = QuadIndex(), ones = _mm512_set1_epi8(1);
  __m512i sums = _mm512_setzero_si512();
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_permutexvar_epi8(index, _mm512_loadu_si512(codes + 64 * i));
    sums = _mm512_dpbusd_epi32(sums, ones, w[i]);
  }
  return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
}

inline int32_t Quad(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
#endif

}  // namespace int8_activations

#endif  // JAXLLM_QUANTIZED_MATMUL_INT8_H_
