// y = x @ W for weights kept in GGUF quantization blocks, for XLA CPU as an XLA FFI custom call
// (jaxllm.kernels.quantized_matmul).
//
// Why: the default model ships as Q4_1/Q8_0 blocks. Dequantized to float32 its weights are
// 540 MB, read once per decode step; kept in blocks they are ~100 MB. Every block value is
// d * q + m with d, m float16 and q a 4- or 8-bit integer, so d * q is exact in float32 and the
// value rebuilt here in registers is bit-identical to the float32 weight the dequantizing
// loader produces: only the summation order of the dot products differs from XLA's.
//
// Layout (built by kernels/quantized_weights.py): output columns in groups of 16 (one vector),
// K in blocks of 32. For group g and block b:
//   q4: codes u8 [G, B, 16, 16]: byte [g, b, j, l] = q[32b+j] | q[32b+j+16] << 4 of column
//       16g+l (GGUF's own nibble pairing); scales, mins f16 [G, B, 16]; w = d * q + m.
//   q8: codes s8 [G, B, 32, 16]: q[32b+j] of column 16g+l; scales f16 [G, B, 16]; w = d * q.
// Inputs: x f32 [M, K] row-major, codes, scales, mins (q8: ignored, any shape). Per precision
// the kernel first lays x out in a per-thread scratch buffer, for tiles of W rows:
//   float32: [ceil(M/W), K, W], row index fastest, so a tile's broadcasts are offsets from one
//       pointer (TileRows; W <= 16);
//   bfloat16: pairs of bfloat16 (x[r, 32b+j], x[r, 32b+j+16]) as u32 [ceil(M/W), K/2, W] and
//       per block the sum of the rounded x (PreparePairs; W <= 12);
//   int8: x quantized per row and block of 32, row-major, with per-block scales
//       (quantized_matmul_int8.h; W <= 8), block sums in integers with vpdpbusd (AVX512-VNNI
//       and VBMI; portable loops otherwise).
// Output: y f32 [M, N] row-major, N <= 16 G (columns past N are padding and never written).
//
// Work: a register tile of up to 16 rows of x against one group's 16 columns, over all of K.
// A unit is a band of row tiles against a chunk of groups; units are handed out through an atomic counter to the caller's
// thread and, when the call is big enough, to tasks on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <memory>
#include <mutex>
#include <vector>

#include "quantized_matmul_int8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kCols = 16;          // output columns per group: one vector
constexpr int kBlock = 32;         // weights per quantization block along K
constexpr int kMaxRows = 16;       // rows of x per register tile
constexpr int kInt8MaxRows = 8;    // int8: 8 weight quads, an integer sum and a total per row
constexpr int64_t kMinUnits = 16;
constexpr double kParallelFlops = 2e6;  // below this a second thread costs more than it saves

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// The three loads below are single instructions with AVX-512 (vcvtph2ps, vpmovzxbd,
// vpmovsxbd); GCC's generic vector conversions scalarize them, so they are spelled out.
// Other CPUs get the portable element loops (correct, slower).
inline v16f LoadHalves(const _Float16* p) {  // float16 -> float32 is exact
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  v16f f;
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return f;
#endif
}

inline v16i LoadBytes(const uint8_t* p) {
#if defined(__AVX512F__)
  return (v16i)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v16i v;
  for (int i = 0; i < 16; ++i) v[i] = p[i];
  return v;
#endif
}

inline v16f ToFloats(v16i v) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps((__m512i)v);
#else
  return __builtin_convertvector(v, v16f);
#endif
}

inline v16f SignedBytesToFloats(const int8_t* p) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  v16f f;
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return f;
#endif
}

struct Problem {
  const float* x;         // float32 precision: [tiles, K, W] (TileRows)
  const uint32_t* xp;     // bfloat16 precision: bfloat16 pairs [tiles, B, 16, W] (PreparePairs)
  const float* xsums;     // bfloat16 precision: block sums of the rounded x [tiles, B, W]
  const int8_t* xq;       // int8 precision: x quantized [M, K] (QuantizeRows), and + 128 (q8)
  const uint8_t* xu;
  const float* xscale;    // int8 precision: per row and block [M, B], d and d * sum(q)
  const float* xoffset;
  const uint8_t* codes;
  const _Float16* scales;
  const _Float16* mins;
  float* y;
  int64_t rows, k, n, groups, blocks, tile_width;
  bool q4, bf16, int8;
};

// Independent accumulator chains per row, so the FMA latency is hidden even for a few rows.
constexpr int Chains(int rows) { return rows >= 8 ? 1 : rows >= 4 ? 2 : rows >= 2 ? 4 : 8; }

// y[r, 16g:16g+16] = x[r, :] . W[:, 16g:16g+16] for the R rows of a tile; x[r, i] at
// xt[i * pb.tile_width + r].
template <bool kQ4, int R>
void Tile(const Problem& pb, int64_t g, const float* xt, float* y_rows) {
  const int64_t ld = pb.tile_width;
  constexpr int P = Chains(R);
  v16f acc[P][R];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = v16f{};
  for (int64_t b = 0; b < pb.blocks; ++b) {
    const int64_t gb = g * pb.blocks + b;
    const v16f d = LoadHalves(pb.scales + gb * kCols);
    const float* xb = xt + b * kBlock * ld;
    if constexpr (kQ4) {
      const v16f m = LoadHalves(pb.mins + gb * kCols);
      const uint8_t* c = pb.codes + gb * (kBlock / 2) * kCols;
#pragma GCC unroll 16
      for (int j = 0; j < kBlock / 2; ++j) {
        const v16i q = LoadBytes(c + j * kCols);
        const v16f lo = ToFloats(q & 15) * d + m;
        const v16f hi = ToFloats(q >> 4) * d + m;
        const float* x_lo = xb + j * ld;
        const float* x_hi = xb + (j + kBlock / 2) * ld;
        for (int r = 0; r < R; ++r) {
          acc[(2 * j) % P][r] = x_lo[r] * lo + acc[(2 * j) % P][r];
          acc[(2 * j + 1) % P][r] = x_hi[r] * hi + acc[(2 * j + 1) % P][r];
        }
      }
    } else {
      const int8_t* c = reinterpret_cast<const int8_t*>(pb.codes) + gb * kBlock * kCols;
#pragma GCC unroll 32
      for (int j = 0; j < kBlock; ++j) {
        const v16f w = SignedBytesToFloats(c + j * kCols) * d;
        const float* xj = xb + j * ld;
        for (int r = 0; r < R; ++r) acc[j % P][r] = xj[r] * w + acc[j % P][r];
      }
    }
  }
  const int64_t col0 = g * kCols;
  const int64_t width = std::min<int64_t>(kCols, pb.n - col0);
  for (int r = 0; r < R; ++r) {
    v16f sum = acc[0][r];
    for (int p = 1; p < P; ++p) sum += acc[p][r];
    std::memcpy(y_rows + r * pb.n + col0, &sum, width * sizeof(float));
  }
}

// --- bfloat16 precision ------------------------------------------------------------------
// x rounded to bfloat16 by the caller; every code (4- or 8-bit integer) is exact in bfloat16.
// vdpbf16ps multiplies pairs of bfloat16 and adds both products into a float32 lane: two K
// per instruction, twice the float32 FMA rate. The pair is (32b+j, 32b+j+16), GGUF's nibble
// pairing. Per block the codes' dot products S are scaled afterwards:
// sum_b d_b * S_b + m_b * sum(x_b), with sum(x_b) precomputed by the caller.

typedef uint32_t v16u __attribute__((vector_size(64)));

// Lane l: bfloat16(lo[l]) in the low half, bfloat16(hi[l]) in the high half, for floats that
// bfloat16 holds exactly (small integers): the top 16 bits of each.
inline v16u PairWeights(v16f lo, v16f hi) {
  return ((v16u)lo >> 16) | ((v16u)hi & 0xFFFF0000u);
}

// The pair (q[j], q[j+16]) of a q4 byte q[j] | q[j+16] << 4 per column.
inline v16u NibblePairs(const uint8_t* p) {
#if defined(__AVX512BW__)
  // Word indices (q & 15, q >> 4) looked up in a table of bfloat16(0..15) (constant-initialized:
  // no guard in the loop).
  alignas(64) static constexpr uint16_t kTable[32] = {
      0, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // (q | q << 12) & 0x000F000F: low nibble in word 0, high nibble in word 1.
  const __m512i idx = _mm512_ternarylogic_epi32(q, _mm512_slli_epi32(q, 12),
                                                _mm512_set1_epi32(0x000F000F), 0xA8);
  return (v16u)_mm512_permutexvar_epi16(idx, _mm512_load_si512(kTable));
#else
  const v16i q = LoadBytes(p);
  return PairWeights(ToFloats(q & 15), ToFloats(q >> 4));
#endif
}

// acc[l] += x.lo * w[l].lo + x.hi * w[l].hi for one pair of bfloat16 x at *xp.
inline v16f DotPairs(v16f acc, v16u w, const uint32_t* xp) {
#if defined(__AVX512BF16__)
  return (v16f)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)_mm512_set1_epi32(*xp));
#else
  const uint32_t x = *xp;
  uint32_t lo_bits = x << 16, hi_bits = x & 0xFFFF0000u;
  float x_lo, x_hi;
  std::memcpy(&x_lo, &lo_bits, 4);
  std::memcpy(&x_hi, &hi_bits, 4);
  return x_lo * (v16f)(w << 16) + (x_hi * (v16f)(w & 0xFFFF0000u) + acc);
#endif
}

// Chains per row of the block sums: vdpbf16ps's latency needs ~12 independent ones in flight.
constexpr int PairChains(int rows) { return rows >= 12 ? 1 : rows >= 6 ? 2 : rows >= 3 ? 4 : 8; }

// As Tile, at bfloat16 precision: x pair (r, b, j) at xp[(b * 16 + j) * W + r], the block sums
// at sums[b * W + r].
template <bool kQ4, int R>
void PairTile(const Problem& pb, int64_t g, const uint32_t* xp, const float* sums,
              float* y_rows) {
  const int64_t ld = pb.tile_width;
  constexpr int P = PairChains(R);
  constexpr int kPairs = kBlock / 2;
  v16f total[R];
  for (int r = 0; r < R; ++r) total[r] = v16f{};
  for (int64_t b = 0; b < pb.blocks; ++b) {
    const int64_t gb = g * pb.blocks + b;
    const uint32_t* xb = xp + b * kPairs * ld;
    v16f part[P][R];
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r) part[p][r] = v16f{};
#pragma GCC unroll 16
    for (int j = 0; j < kPairs; ++j) {
      v16u w;
      if constexpr (kQ4) {
        w = NibblePairs(pb.codes + (gb * kPairs + j) * kCols);
      } else {
        const int8_t* c = reinterpret_cast<const int8_t*>(pb.codes) + gb * kBlock * kCols;
        w = PairWeights(SignedBytesToFloats(c + j * kCols),
                        SignedBytesToFloats(c + (j + kPairs) * kCols));
      }
      const uint32_t* xj = xb + j * ld;
      for (int r = 0; r < R; ++r) part[j % P][r] = DotPairs(part[j % P][r], w, xj + r);
    }
    const v16f d = LoadHalves(pb.scales + gb * kCols);
    for (int r = 0; r < R; ++r) {
      v16f s = part[0][r];
      for (int p = 1; p < P; ++p) s += part[p][r];
      total[r] = s * d + total[r];
    }
    if constexpr (kQ4) {
      const v16f m = LoadHalves(pb.mins + gb * kCols);
      for (int r = 0; r < R; ++r) total[r] = sums[b * ld + r] * m + total[r];
    }
  }
  const int64_t col0 = g * kCols;
  const int64_t width = std::min<int64_t>(kCols, pb.n - col0);
  for (int r = 0; r < R; ++r) std::memcpy(y_rows + r * pb.n + col0, &total[r], width * sizeof(float));
}

inline uint32_t RoundToBfloat16(float f) {  // round to nearest even (x is never NaN here)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// x f32 [M, K] row-major -> the pairs and block sums PairTile reads, rows in tiles of W (rows
// past M are zero). One pass over x, on the calling thread, before the units start.
void PreparePairs(const float* x, int64_t rows, int64_t blocks, int64_t w, uint32_t* pairs,
                  float* sums) {
  constexpr int kPairs = kBlock / 2;
  const int64_t tiles = (rows + w - 1) / w;
  const int64_t k = blocks * kBlock;
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < w; ++r) {
      const int64_t row = t * w + r;
      for (int64_t b = 0; b < blocks; ++b) {
        uint32_t* out = pairs + ((t * blocks + b) * kPairs) * w + r;
        float* sum = sums + (t * blocks + b) * w + r;
        if (row >= rows) {
          for (int j = 0; j < kPairs; ++j) out[j * w] = 0;
          *sum = 0.0f;
          continue;
        }
        const float* xb = x + row * k + b * kBlock;
        alignas(64) uint32_t pair[kPairs];
#if defined(__AVX512BF16__)
        const __m512i lo = _mm512_cvtepu16_epi32(
            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xb)));
        const __m512i hi = _mm512_cvtepu16_epi32(
            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xb + kPairs)));
        _mm512_store_si512(pair, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        const v16u both = (v16u)_mm512_load_si512(pair);
        *sum = _mm512_reduce_add_ps((__m512)(both << 16)) +
               _mm512_reduce_add_ps((__m512)(both & 0xFFFF0000u));
#else
        float total = 0.0f;
        for (int j = 0; j < kPairs; ++j) {
          const uint32_t lo = RoundToBfloat16(xb[j]), hi = RoundToBfloat16(xb[j + kPairs]);
          pair[j] = lo | hi << 16;
          const uint32_t lo_bits = lo << 16, hi_bits = hi << 16;
          float a, c;
          std::memcpy(&a, &lo_bits, 4);
          std::memcpy(&c, &hi_bits, 4);
          total += a + c;
        }
        *sum = total;
#endif
        for (int j = 0; j < kPairs; ++j) out[j * w] = pair[j];
      }
    }
  }
}

// --- int8 precision (quantized_matmul_int8.h) ----------------------------------------------

// As Tile, at int8 precision, for the R rows from row0: exact integer block sums, then scaled.
template <bool kQ4, int R>
void Int8Tile(const Problem& pb, int64_t g, int64_t row0, float* y_rows) {
  v16f total[R];
  for (int r = 0; r < R; ++r) total[r] = v16f{};
  for (int64_t b = 0; b < pb.blocks; ++b) {
    const int64_t gb = g * pb.blocks + b;
    v16i sums[R];
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
    __m512i w[8];
    __m512i start = _mm512_setzero_si512();
    if constexpr (kQ4) {
      int8_activations::Q4Quads(pb.codes + gb * (kBlock / 2) * kCols, w);
    } else {
      start = int8_activations::Q8Quads(
          reinterpret_cast<const int8_t*>(pb.codes) + gb * kBlock * kCols, w);
    }
    __m512i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = start;
    for (int i = 0; i < 8; ++i) {
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row0 + r) * pb.k + b * kBlock + 4 * i;
        if constexpr (kQ4) {
          acc[r] = _mm512_dpbusd_epi32(acc[r], w[i],
                                       _mm512_set1_epi32(int8_activations::Quad(pb.xq + at)));
        } else {
          acc[r] = _mm512_dpbusd_epi32(acc[r],
                                       _mm512_set1_epi32(int8_activations::Quad(pb.xu + at)), w[i]);
        }
      }
    }
    for (int r = 0; r < R; ++r) sums[r] = (v16i)acc[r];
#else
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = pb.xq + (row0 + r) * pb.k + b * kBlock;
      for (int l = 0; l < kCols; ++l) {
        int32_t s = 0;
        for (int j = 0; j < kBlock; ++j) {
          int32_t code;
          if constexpr (kQ4) {
            const uint8_t byte = pb.codes[(gb * (kBlock / 2) + j % 16) * kCols + l];
            code = j < 16 ? (byte & 15) : (byte >> 4);
          } else {
            code = reinterpret_cast<const int8_t*>(pb.codes)[(gb * kBlock + j) * kCols + l];
          }
          s += code * xb[j];
        }
        sums[r][l] = s;
      }
    }
#endif
    const v16f d = LoadHalves(pb.scales + gb * kCols);
    for (int r = 0; r < R; ++r) {
      total[r] = ToFloats(sums[r]) * (d * pb.xscale[(row0 + r) * pb.blocks + b]) + total[r];
    }
    if constexpr (kQ4) {
      const v16f m = LoadHalves(pb.mins + gb * kCols);
      for (int r = 0; r < R; ++r) total[r] = m * pb.xoffset[(row0 + r) * pb.blocks + b] + total[r];
    }
  }
  const int64_t col0 = g * kCols;
  const int64_t width = std::min<int64_t>(kCols, pb.n - col0);
  for (int r = 0; r < R; ++r) std::memcpy(y_rows + r * pb.n + col0, &total[r], width * sizeof(float));
}

template <bool kQ4, int R = kMaxRows>
void Groups(const Problem& pb, int64_t g0, int64_t g1, int64_t tile, float* y_rows, int rows) {
  if constexpr (R > 1) {
    if (rows < R) return Groups<kQ4, R - 1>(pb, g0, g1, tile, y_rows, rows);
  }
  if (pb.int8) {
    if constexpr (R <= kInt8MaxRows) {  // int8 tiles are never wider
      for (int64_t g = g0; g < g1; ++g) Int8Tile<kQ4, R>(pb, g, tile * pb.tile_width, y_rows);
    }
  } else if (pb.bf16) {
    const uint32_t* xp = pb.xp + tile * pb.blocks * (kBlock / 2) * pb.tile_width;
    const float* sums = pb.xsums + tile * pb.blocks * pb.tile_width;
    for (int64_t g = g0; g < g1; ++g) PairTile<kQ4, R>(pb, g, xp, sums, y_rows);
  } else {
    const float* xt = pb.x + tile * pb.k * pb.tile_width;
    for (int64_t g = g0; g < g1; ++g) Tile<kQ4, R>(pb, g, xt, y_rows);
  }
}

// A unit is a band of up to kTilesPerBand row tiles against a chunk of column groups, taken
// kGroupsPerStep groups at a time: those groups' weights are read from memory once and reused
// from L2 for the band's tiles, while each tile's x stays in L1 over the groups (tile by tile
// over the whole chunk, a weight too big for the caches -- the LM head -- was streamed from
// DRAM once per tile).
constexpr int64_t kTilesPerBand = 4;
constexpr int64_t kGroupsPerStep = 8;  // Q8_0 at K = 576: 8 groups' codes are 74 KB

struct Split {
  int64_t tiles, bands, chunks_per_band, groups_per_chunk;
  int64_t units() const { return bands * chunks_per_band; }
};

Split SplitWork(const Problem& pb) {
  Split s;
  s.tiles = (pb.rows + pb.tile_width - 1) / pb.tile_width;
  s.bands = (s.tiles + kTilesPerBand - 1) / kTilesPerBand;
  // Enough units to balance a few threads.
  const int64_t chunks = std::min<int64_t>(
      pb.groups, std::max<int64_t>(1, (kMinUnits + s.bands - 1) / s.bands));
  s.groups_per_chunk = (pb.groups + chunks - 1) / chunks;
  s.chunks_per_band = (pb.groups + s.groups_per_chunk - 1) / s.groups_per_chunk;
  return s;
}

void RunUnit(const Problem& pb, const Split& split, int64_t unit) {
  const int64_t band = unit / split.chunks_per_band, chunk = unit % split.chunks_per_band;
  const int64_t t0 = band * kTilesPerBand, t1 = std::min(split.tiles, t0 + kTilesPerBand);
  const int64_t g0 = chunk * split.groups_per_chunk;
  const int64_t g1 = std::min(pb.groups, g0 + split.groups_per_chunk);
  for (int64_t ga = g0; ga < g1; ga += kGroupsPerStep) {
    const int64_t gb = std::min(g1, ga + kGroupsPerStep);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t r0 = tile * pb.tile_width;
      const int rows = static_cast<int>(std::min<int64_t>(pb.tile_width, pb.rows - r0));
      float* y_rows = pb.y + r0 * pb.n;
      if (pb.q4) {
        Groups<true>(pb, ga, gb, tile, y_rows, rows);
      } else {
        Groups<false>(pb, ga, gb, tile, y_rows, rows);
      }
    }
  }
}

// Shared by the caller and the pool tasks; a task may start after the caller is done, so it
// holds its own reference and touches the buffers only while a unit is still unclaimed.
struct Job {
  Problem pb;
  Split split;
  int64_t units = 0;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable all_done;
  int64_t done = 0;

  void Work() {
    int64_t finished = 0;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      RunUnit(pb, split, u);
      ++finished;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(mu);
      done += finished;
      if (done == units) all_done.notify_all();
    }
  }
};

// x f32 [M, K] row-major -> [tiles, K, W], row index fastest (rows past M are zero): what Tile
// reads. On the calling thread before the units start: microseconds for a decode batch, where
// an XLA transpose before the call cost a fusion of its own per matmul.
void TileRows(const float* x, int64_t rows, int64_t k, int64_t w, float* out) {
  const int64_t tiles = (rows + w - 1) / w;
  for (int64_t t = 0; t < tiles; ++t) {
    float* tile = out + t * k * w;
    const int64_t live = std::min<int64_t>(w, rows - t * w);
    for (int64_t r = 0; r < live; ++r) {
      const float* row = x + (t * w + r) * k;
      for (int64_t i = 0; i < k; ++i) tile[i * w + r] = row[i];
    }
    for (int64_t r = live; r < w; ++r) {
      for (int64_t i = 0; i < k; ++i) tile[i * w + r] = 0.0f;
    }
  }
}

constexpr int kPairMaxRows = 12;  // bfloat16 register tile: a block sum and a total per row live

// x f32 [M, K] row-major. precision 0: float32, x tiled here (TileRows); 1: bfloat16, x rounded
// and paired here (PreparePairs); 2: int8, x quantized here (QuantizeRows); each into a
// per-thread scratch buffer.
ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer codes, ffi::Buffer<ffi::F16> scales,
                               ffi::Buffer<ffi::F16> mins, ffi::ResultBuffer<ffi::F32> y,
                               int32_t precision) {
  const auto x_dims = x.dimensions();
  const auto c_dims = codes.dimensions();
  const auto s_dims = scales.dimensions();
  const auto y_dims = y->dimensions();
  if (precision < 0 || precision > 2) {
    return ffi::Error::InvalidArgument("quantized matmul: precision must be 0, 1 or 2");
  }
  const bool bf16 = precision == 1, int8 = precision == 2;
  if (x_dims.size() != 2 || c_dims.size() != 4 || s_dims.size() != 3 || y_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "quantized matmul: x and y must be rank 2, codes rank 4, scales rank 3");
  }
  auto job = std::make_shared<Job>();
  Problem& pb = job->pb;
  pb.bf16 = bf16;
  pb.int8 = int8;
  pb.rows = y_dims[0];
  pb.n = y_dims[1];
  pb.groups = c_dims[0];
  pb.blocks = c_dims[1];
  pb.k = pb.blocks * kBlock;
  pb.tile_width =
      std::max<int64_t>(1, std::min<int64_t>(pb.rows, int8   ? kInt8MaxRows
                                                      : bf16 ? kPairMaxRows
                                                             : kMaxRows));
  if (codes.element_type() == ffi::DataType::U8) {
    pb.q4 = true;
  } else if (codes.element_type() == ffi::DataType::S8) {
    pb.q4 = false;
  } else {
    return ffi::Error::InvalidArgument("quantized matmul: codes must be u8 (q4) or s8 (q8)");
  }
  const int64_t rows_per_block = pb.q4 ? kBlock / 2 : kBlock;
  const bool x_ok = x_dims[0] == pb.rows && x_dims[1] == pb.k;
  if (c_dims[2] != rows_per_block || c_dims[3] != kCols || !x_ok || s_dims[0] != pb.groups ||
      s_dims[1] != pb.blocks || s_dims[2] != kCols || pb.n > pb.groups * kCols ||
      pb.n <= (pb.groups - 1) * kCols ||
      (pb.q4 && mins.element_count() != scales.element_count())) {
    return ffi::Error::InvalidArgument("quantized matmul: inconsistent input shapes");
  }
  if (pb.rows == 0 || pb.n == 0) return ffi::Error::Success();
  pb.x = x.typed_data();
  pb.codes = static_cast<const uint8_t*>(codes.untyped_data());
  pb.scales = reinterpret_cast<const _Float16*>(scales.typed_data());
  pb.mins = reinterpret_cast<const _Float16*>(mins.typed_data());
  pb.y = y->typed_data();
  // Scratch reused across calls on this thread (no allocation per call); read by the pool
  // tasks only while this call waits for them.
  const int64_t tiles = (pb.rows + pb.tile_width - 1) / pb.tile_width;
  if (!bf16 && !int8 && pb.tile_width > 1) {  // one row: [1, K] is already its own tile
    thread_local std::vector<float> tiled;
    tiled.resize(std::max<size_t>(tiled.size(), tiles * pb.tile_width * pb.k));
    TileRows(pb.x, pb.rows, pb.k, pb.tile_width, tiled.data());
    pb.x = tiled.data();
  }
  if (bf16) {
    thread_local std::vector<uint32_t> pairs;
    thread_local std::vector<float> sums;
    pairs.resize(std::max<size_t>(pairs.size(), tiles * pb.tile_width * pb.k / 2));
    sums.resize(std::max<size_t>(sums.size(), tiles * pb.tile_width * pb.blocks));
    PreparePairs(pb.x, pb.rows, pb.blocks, pb.tile_width, pairs.data(), sums.data());
    pb.xp = pairs.data();
    pb.xsums = sums.data();
  }
  if (int8) {
    thread_local std::vector<int8_t> quantized;
    thread_local std::vector<uint8_t> shifted;
    thread_local std::vector<float> scale, offset;
    const size_t elems = pb.rows * pb.k, per_block = pb.rows * pb.blocks;
    quantized.resize(std::max(quantized.size(), elems));
    if (!pb.q4) shifted.resize(std::max(shifted.size(), elems));
    scale.resize(std::max(scale.size(), per_block));
    offset.resize(std::max(offset.size(), per_block));
    int8_activations::QuantizeRows(pb.x, pb.rows, pb.blocks, quantized.data(),
                                   pb.q4 ? nullptr : shifted.data(), scale.data(), offset.data());
    pb.xq = quantized.data();
    pb.xu = shifted.data();
    pb.xscale = scale.data();
    pb.xoffset = offset.data();
  }
  job->split = SplitWork(pb);
  job->units = job->split.units();
  const double flops = 2.0 * static_cast<double>(pb.rows) * pb.k * pb.n;
  if (job->units > 1 && flops >= kParallelFlops && pool.num_threads() > 0) {
    // The caller works too: one helper per further core.
    const int64_t helpers =
        std::min<int64_t>(std::max<int64_t>(1, pool.num_threads() - 1), job->units - 1);
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->all_done.wait(lock, [&] { return job->done == job->units; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("precision"));
