// Ragged paged attention for XLA CPU as an XLA FFI custom call (jaxllm.kernels.cpu_native).
//
// Why native: on XLA CPU the math over pages gathered into fresh arrays costs several times
// the bytes it reads. Here every query row reads its sequence's K/V rows straight out of the
// cache buffer, page by page, with an online (running max / running sum) softmax in float32,
// so nothing is gathered or copied and a page is read while it sits in L1. Pages lie anywhere
// in the cache, where the hardware prefetcher cannot follow: the next page of a sequence (or,
// on its last page, the first page of the worker's next unit) is prefetched while the current
// one is computed, a few lines at a time from the inner loops (decode attention is a stream
// from DRAM: each layer's cache is read once per step). The query heads sharing a KV head (GQA) are handled
// together, up to 4 at a time, so each K/V row is loaded once for all of them.
//
// Work unit: (sequence, block of up to kQueryBlock consecutive query tokens), all heads. A
// decode token is a unit of its own; a prefill chunk is cut into blocks whose queries reuse
// each loaded page. Units run on the caller's thread plus, when the call is big enough, one
// task on XLA's intra-op thread pool; they are handed out through an atomic counter.
//
// Semantics are those of kernels/reference.py: token t belongs to the sequence s < num_seqs
// with cu_q_lens[s] <= t < cu_q_lens[s+1] (counted like ragged_layout.token_layout), sits at
// position kv_lens[s] - q_len[s] + (t - cu_q_lens[s]) and attends to key positions
// (pos - sliding_window, pos] that lie in its page table. Keys outside that range are never
// read, so NaN in unused slots or pages cannot reach the output. Padding tokens and rows with
// no visible key give zeros. soft_cap c maps logits to c * tanh(logits / c).
//
// Inputs: q f32 [T, Hq, D]; k_new, v_new f32 [T, Hkv, D]; slots s32 [T] (page * page_size +
// slot of each new token's K/V, -1: write nothing; ragged_layout.new_kv_slots); kv_cache f32
// or bf16 [num_pages, page_size, 2*Hkv, D] (K of kv head h at 2h, V at 2h+1); kv_lens s32 [S];
// page_indices s32 [S, P]; cu_q_lens s32 [S+1]; num_seqs s32 [1]. Attributes: sm_scale f32,
// sliding_window s64 (0 = none), soft_cap f32 (0 = none). Outputs: f32 [T, Hq, D] and the
// cache, aliased to the input cache: the new K/V are written in place (bfloat16 rounded to
// nearest even, as XLA converts) before any query reads. Written here rather than by an XLA
// scatter because XLA CPU scatters into a bfloat16 array by converting the whole array to
// float32 and back (a batch-32 decode step measured 45 -> 350 ms with a bfloat16 cache).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;               // floats per vector (one AVX-512 register)
constexpr int kQueryBlock = 16;          // query tokens of one sequence per work unit
constexpr int kMaxPageSize = 256;        // kernels/validation.py MAX_PAGE_SIZE
constexpr double kParallelFlops = 4e6;   // below this a second thread costs more than it saves

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf Load(const uint16_t* p) {  // bfloat16 -> float32: the high half of the bits
#if defined(__AVX512F__)
  // One vpmovzxwd + shift; GCC's generic vector conversion below is scalarized.
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu w = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#endif
}

inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline float ToFloat(float x) { return x; }

inline float ToFloat(uint16_t x) {
  uint32_t w = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline vf Splat(float x) { return vf{} + x; }

inline float HorizontalSum(vf a) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += a[i];
  return s;
}

// The 8 sums of lanes i and i + 8.
inline v8f FoldHalves(vf a) {
  return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Lanes 0-3: the sums of the lanes of a0..a3 (halves folded, then pairwise transpose-and-add).
inline v8f ReduceFour(vf b0, vf b1, vf b2, vf b3) {
  const v8f a0 = FoldHalves(b0), a1 = FoldHalves(b1), a2 = FoldHalves(b2), a3 = FoldHalves(b3);
  const v8f t0 = __builtin_shufflevector(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f t1 = __builtin_shufflevector(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f u = __builtin_shufflevector(t0, t1, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(t0, t1, 2, 3, 10, 11, 6, 7, 14, 15);
  return u + __builtin_shufflevector(u, u, 4, 5, 6, 7, 0, 1, 2, 3);
}

// exp for x <= 0 (softmax numerators): Cody-Waite range reduction and a degree-6 polynomial,
// relative error ~1e-7. Inputs below -87 give exp(-87) ~ 1.6e-38 instead of a smaller number,
// which no softmax sum (>= 1) can notice. NaN propagates through the polynomial.
inline vf Exp(vf x) {
  const vf lo = Splat(-87.0f);
  x = x < lo ? lo : x;
  const vf shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = x * 1.44269504088896341f + shifter;
  n = n - shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// The next page's cache lines, issued a few at a time from the inner loops of the current
// page: issued all at once they fill the core's miss buffers, the prefetch instructions stall
// and the compute waits for them (measured: cold pages cost as much again as the compute).
// Into L2 (prefetcht1), not L1: L2 tracks more misses in flight, and a float32 page (24 KB)
// next to the current one does not fit a 32 KB L1. Measured on Zen 4, 30 layers of batch-32
// decode attention at context 192: 18.7 -> 13.2 ms (bfloat16 cache), 21.3 -> 15.7 ms (float32);
// prefetching two pages ahead or a whole page at once was no better.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  int per_step = 0;  // lines per call of Step

  void Start(const void* page, std::ptrdiff_t bytes, int steps) {
    next = static_cast<const char*>(page);
    end = next + bytes;
    const std::ptrdiff_t lines = (bytes + 63) / 64;
    per_step = static_cast<int>(std::max<std::ptrdiff_t>(1, (lines + steps - 1) / std::max(1, steps)));
  }
  inline void Step() {
    for (int i = 0; i < per_step && next < end; ++i, next += 64) __builtin_prefetch(next, 0, 2);
  }
  void Finish() {
    for (; next < end; next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// s[g * ld + j] = <q_g, k_j> for NG query rows q_g = q + g * d and n key rows
// k_j = k + j * stride: each key row is loaded once for the NG rows of a GQA group, four keys
// at a time (their sums reduced together).
template <int NG, typename T>
void GroupDots(const float* q, const T* k, std::ptrdiff_t stride, int n, int d, float* s,
               int ld, Prefetcher& pf) {
  const int dv = d - d % kLanes;
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = k + (j) * stride;
    const T* k1 = k + (j + 1) * stride;
    const T* k2 = k + (j + 2) * stride;
    const T* k3 = k + (j + 3) * stride;
    pf.Step();
    vf a[NG][4] = {};
    for (int c = 0; c < dv; c += kLanes) {
      const vf x0 = Load(k0 + c), x1 = Load(k1 + c), x2 = Load(k2 + c), x3 = Load(k3 + c);
      for (int g = 0; g < NG; ++g) {
        const vf qv = Load(q + g * d + c);
        a[g][0] += qv * x0;
        a[g][1] += qv * x1;
        a[g][2] += qv * x2;
        a[g][3] += qv * x3;
      }
    }
    for (int g = 0; g < NG; ++g) {
      const v8f r = ReduceFour(a[g][0], a[g][1], a[g][2], a[g][3]);
      float* out = s + g * ld + j;
      for (int u = 0; u < 4; ++u) out[u] = r[u];
      for (int c = dv; c < d; ++c) {
        const float qc = q[g * d + c];
        out[0] += qc * ToFloat(k0[c]);
        out[1] += qc * ToFloat(k1[c]);
        out[2] += qc * ToFloat(k2[c]);
        out[3] += qc * ToFloat(k3[c]);
      }
    }
  }
  for (; j < n; ++j) {
    const T* row = k + j * stride;
    for (int g = 0; g < NG; ++g) {
      vf a = {};
      for (int c = 0; c < dv; c += kLanes) a += Load(q + g * d + c) * Load(row + c);
      float t = HorizontalSum(a);
      for (int c = dv; c < d; ++c) t += q[g * d + c] * ToFloat(row[c]);
      s[g * ld + j] = t;
    }
  }
}

// acc_g[c0 : c0 + NV*8] += sum_j p_g[j] * v_j[c0 : ...] for NG rows (acc_g = acc + g * d,
// p_g = p + g * ld, v_j = v + j * stride), the accumulators kept in registers over the n rows.
template <int NG, int NV, typename T>
inline void AxpyBlock(float* acc, const float* p, int ld, const T* v, std::ptrdiff_t stride,
                      int n, int d, int c0, Prefetcher& pf) {
  vf a[NG][NV];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < NV; ++i) a[g][i] = Load(acc + g * d + c0 + i * kLanes);
  for (int j = 0; j < n; ++j) {
    const T* row = v + j * stride + c0;
    pf.Step();
    vf x[NV];
    for (int i = 0; i < NV; ++i) x[i] = Load(row + i * kLanes);
    for (int g = 0; g < NG; ++g) {
      const vf pj = Splat(p[g * ld + j]);
      for (int i = 0; i < NV; ++i) a[g][i] += pj * x[i];
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < NV; ++i) Store(acc + g * d + c0 + i * kLanes, a[g][i]);
}

// acc_g[:d] += sum_j p_g[j] * v_j for NG rows; each value row is loaded once for the group.
template <int NG, typename T>
void GroupAxpys(float* acc, const float* p, int ld, const T* v, std::ptrdiff_t stride, int n,
                int d, Prefetcher& pf) {
  constexpr int kWide = NG <= 2 ? 8 : 4;  // NG * kWide accumulators stay in registers
  int c = 0;
  for (; c + kWide * kLanes <= d; c += kWide * kLanes) {
    AxpyBlock<NG, kWide>(acc, p, ld, v, stride, n, d, c, pf);
  }
  if constexpr (kWide > 4) {
    if (c + 4 * kLanes <= d) {
      AxpyBlock<NG, 4>(acc, p, ld, v, stride, n, d, c, pf);
      c += 4 * kLanes;
    }
  }
  if (c + 2 * kLanes <= d) {
    AxpyBlock<NG, 2>(acc, p, ld, v, stride, n, d, c, pf);
    c += 2 * kLanes;
  }
  if (c + kLanes <= d) {
    AxpyBlock<NG, 1>(acc, p, ld, v, stride, n, d, c, pf);
    c += kLanes;
  }
  for (; c < d; ++c) {
    for (int g = 0; g < NG; ++g) {
      float t = acc[g * d + c];
      for (int j = 0; j < n; ++j) t += p[g * ld + j] * ToFloat(v[j * stride + c]);
      acc[g * d + c] = t;
    }
  }
}

inline void PutRow(float* dst, const float* src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void PutRow(uint16_t* dst, const float* src, int64_t n) {  // to bfloat16, nearest even
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, 4);
    dst[i] = (bits & 0x7FFFFFFFu) > 0x7F800000u
                 ? static_cast<uint16_t>((bits >> 16) | 0x40u)  // NaN stays a (quiet) NaN
                 : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// K/V of token t into cache slot slots[t] (rows of 2*Hkv*D elements), skipping slots < 0.
template <typename T>
void WriteNewKv(T* cache, int64_t capacity, int64_t num_kv_heads, int64_t d, const float* k,
                const float* v, const int32_t* slots, int64_t num_tokens) {
  const int64_t row_len = 2 * num_kv_heads * d;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0 || s >= capacity) continue;
    T* row = cache + s * row_len;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      PutRow(row + 2 * h * d, k + (t * num_kv_heads + h) * d, d);
      PutRow(row + (2 * h + 1) * d, v + (t * num_kv_heads + h) * d, d);
    }
  }
}

// Everything a work unit needs to know about one call; plain pointers into XLA's buffers.
struct Problem {
  const float* q;
  const void* cache;
  bool cache_bf16;
  const int32_t* page_indices;
  float* out;
  int64_t num_pages, page_size, num_q_heads, num_kv_heads, head_dim, pages_per_seq;
  float sm_scale, soft_cap;
  int64_t sliding_window;
};

// A block of consecutive query tokens of one sequence; `first_pos` is the position of t0.
struct Unit {
  int64_t seq, t0, t1, first_pos;
  double flops;
};

constexpr int kGroupRows = 4;  // query heads of one KV head handled together (registers)
constexpr int kLogitsStride = kMaxPageSize + kLanes;

// Per-worker running softmax state of one unit's rows (row = query token x query head), and
// the logits of one group of rows over one page.
struct Scratch {
  std::vector<float> q, acc, row_max, row_sum;
  Prefetcher prefetch;
  alignas(64) float logits[kGroupRows * kLogitsStride];
};

// Inclusive key range [lo, hi] of a query at `pos` (lo > hi: nothing visible).
inline void KeyRange(const Problem& pb, int64_t pos, int64_t* lo, int64_t* hi) {
  *lo = pb.sliding_window > 0 ? std::max<int64_t>(0, pos - pb.sliding_window + 1) : 0;
  *hi = std::min(pos, pb.pages_per_seq * pb.page_size - 1);
}

// Folds the logits s[0:n] of one row into its running max m, sum l and accumulator acc[0:d];
// leaves the weights exp(s - m) in s (0 in the padding lanes up to a multiple of 8).
inline void SoftmaxUpdate(const Problem& pb, float* s, int n, float& m, float& l, float* acc) {
  const int d = static_cast<int>(pb.head_dim);
  if (pb.soft_cap > 0.0f) {
    const float inv = 1.0f / pb.soft_cap;
    for (int j = 0; j < n; ++j) s[j] = pb.soft_cap * std::tanh(s[j] * inv);
  }
  const int padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int j = n; j < padded; ++j) s[j] = -INFINITY;
  vf mx = Load(s);
  for (int j = kLanes; j < padded; j += kLanes) {
    const vf x = Load(s + j);
    mx = x > mx ? x : mx;
  }
  float block_max = mx[0];
  for (int i = 1; i < kLanes; ++i) block_max = std::max(block_max, mx[i]);
  if (block_max > m) {
    if (l > 0.0f) {
      const float alpha = std::exp(m - block_max);
      l *= alpha;
      for (int c = 0; c < d; ++c) acc[c] *= alpha;
    }
    m = block_max;
  }
  const vf mv = Splat(m);
  vf sum = {};
  for (int j = 0; j < padded; j += kLanes) {
    const vf e = Exp(Load(s + j) - mv);
    Store(s + j, e);
    sum += e;
  }
  for (int j = n; j < padded; ++j) {  // padding lanes: exp(-87), not 0
    sum[j % kLanes] -= s[j];
    s[j] = 0.0f;
  }
  l += HorizontalSum(sum);
}

// Rows [row, row + NG) (query heads of one KV head at one query token) against the n key and
// value rows at k and k + d (stride row_len): each K/V row is read once for the group.
template <int NG, typename T>
void GroupStep(const Problem& pb, Scratch& sc, int64_t row, const T* k, std::ptrdiff_t row_len,
               int n) {
  const int d = static_cast<int>(pb.head_dim);
  GroupDots<NG>(sc.q.data() + row * d, k, row_len, n, d, sc.logits, kLogitsStride, sc.prefetch);
  for (int g = 0; g < NG; ++g) {
    SoftmaxUpdate(pb, sc.logits + g * kLogitsStride, n, sc.row_max[row + g],
                  sc.row_sum[row + g], sc.acc.data() + (row + g) * d);
  }
  GroupAxpys<NG>(sc.acc.data() + row * d, sc.logits, kLogitsStride, k + d, row_len, n, d,
                 sc.prefetch);
}

// Page by page (each page is one contiguous block of the cache, consumed while in L1, the next
// one prefetched meanwhile: pages lie anywhere, so the hardware prefetcher cannot guess them);
// within a page every query token of the unit and every KV head's group of query heads.
// `after`: the first page of the unit this worker runs next (nullptr: none), prefetched
// during this unit's last page.
template <typename T>
void RunUnit(const Problem& pb, const Unit& u, const int32_t* page_row, Scratch& sc,
             const void* after) {
  const int64_t nq = u.t1 - u.t0, hq = pb.num_q_heads, d = pb.head_dim;
  const int64_t group = hq / pb.num_kv_heads, rows = nq * hq;
  const int64_t row_len = 2 * pb.num_kv_heads * d, page_elems = pb.page_size * row_len;
  const T* cache = static_cast<const T*>(pb.cache);
  sc.q.resize(rows * d);
  sc.acc.assign(rows * d, 0.0f);
  sc.row_max.assign(rows, -INFINITY);
  sc.row_sum.assign(rows, 0.0f);
  const float* q = pb.q + u.t0 * hq * d;
  for (int64_t i = 0; i < rows * d; ++i) sc.q[i] = q[i] * pb.sm_scale;

  int64_t first_lo, first_hi, last_lo, last_hi;
  KeyRange(pb, u.first_pos, &first_lo, &first_hi);
  KeyRange(pb, u.first_pos + nq - 1, &last_lo, &last_hi);
  if (first_lo <= last_hi) {
    const int64_t last_col = last_hi / pb.page_size;
    auto page_at = [&](int64_t col) {
      return cache + std::clamp<int64_t>(page_row[col], 0, pb.num_pages - 1) * page_elems;
    };
    // Calls of Prefetcher::Step in one page's work (GroupDots: one per 4 keys; AxpyBlock:
    // one per key and block of columns), counted for full pages.
    const int64_t group_calls = nq * pb.num_kv_heads * ((group + kGroupRows - 1) / kGroupRows);
    const int steps_per_page = static_cast<int>(
        group_calls * (pb.page_size / 4 + pb.page_size * ((d + 63) / 64)));
    for (int64_t page_col = first_lo / pb.page_size; page_col <= last_col; ++page_col) {
      const void* next_page = page_col < last_col ? page_at(page_col + 1) : after;
      if (next_page != nullptr) {
        sc.prefetch.Start(next_page, page_elems * static_cast<int64_t>(sizeof(T)),
                          steps_per_page);
      }
      const int64_t page_start = page_col * pb.page_size;
      const T* page_base = page_at(page_col);
      for (int64_t i = 0; i < nq; ++i) {
        int64_t lo, hi;
        KeyRange(pb, u.first_pos + i, &lo, &hi);
        lo = std::max(lo, page_start);
        hi = std::min(hi, page_start + pb.page_size - 1);
        if (lo > hi) continue;
        const int n = static_cast<int>(hi - lo + 1);
        const T* key_rows = page_base + (lo - page_start) * row_len;
        for (int64_t h = 0; h < pb.num_kv_heads; ++h) {
          const T* k = key_rows + 2 * h * d;
          for (int64_t g0 = 0; g0 < group; g0 += kGroupRows) {
            const int64_t row = i * hq + h * group + g0;
            switch (std::min<int64_t>(kGroupRows, group - g0)) {
              case 1: GroupStep<1>(pb, sc, row, k, row_len, n); break;
              case 2: GroupStep<2>(pb, sc, row, k, row_len, n); break;
              case 3: GroupStep<3>(pb, sc, row, k, row_len, n); break;
              default: GroupStep<4>(pb, sc, row, k, row_len, n); break;
            }
          }
        }
      }
      sc.prefetch.Finish();
    }
  }
  float* out = pb.out + u.t0 * hq * d;
  for (int64_t row = 0; row < rows; ++row) {
    const float l = sc.row_sum[row];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t c = 0; c < d; ++c) out[row * d + c] = sc.acc[row * d + c] * inv;
  }
}

// Cuts the valid tokens into units, zeroing the output of every token that is not valid.
std::vector<Unit> PlanUnits(const Problem& pb, int64_t num_tokens, int64_t max_seqs,
                            const int32_t* kv_lens, const int32_t* cu, int64_t num_seqs) {
  const int64_t n = std::clamp<int64_t>(num_seqs, 0, max_seqs);
  bool sorted = true;
  for (int64_t s = 0; s < n; ++s) sorted = sorted && cu[s] <= cu[s + 1];
  std::vector<int64_t> seq_of(num_tokens);
  int64_t s_sweep = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (sorted) {  // count of real sequences ending at or before t, as token_layout does
      while (s_sweep < n && cu[s_sweep + 1] <= t) ++s_sweep;
      seq_of[t] = s_sweep;
    } else {
      int64_t count = 0;
      for (int64_t s = 0; s < n; ++s) count += cu[s + 1] <= t;
      seq_of[t] = count;
    }
  }
  const int64_t row_elems = pb.num_q_heads * pb.head_dim;
  std::vector<Unit> units;
  Unit cur{-1, 0, 0, 0, 0.0};
  auto flush = [&] {
    if (cur.seq >= 0) units.push_back(cur);
    cur.seq = -1;
  };
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = seq_of[t];
    bool valid = n > 0 && t < cu[n] && t >= cu[0] && s < n;
    int64_t pos = 0;
    if (valid) {
      const int64_t q_len = static_cast<int64_t>(cu[s + 1]) - cu[s];
      pos = static_cast<int64_t>(kv_lens[s]) - q_len + (t - cu[s]);
      valid = pos >= 0;
    }
    if (!valid) {
      flush();
      std::fill(pb.out + t * row_elems, pb.out + (t + 1) * row_elems, 0.0f);
      continue;
    }
    if (cur.seq != s || cur.t1 - cur.t0 >= kQueryBlock) {
      flush();
      cur = Unit{s, t, t, pos, 0.0};
    }
    cur.t1 = t + 1;
    int64_t lo, hi;
    KeyRange(pb, pos, &lo, &hi);
    cur.flops += 4.0 * static_cast<double>(std::max<int64_t>(0, hi - lo + 1)) * row_elems;
  }
  flush();
  // Largest first, so the last units handed out are small and the workers finish together.
  std::stable_sort(units.begin(), units.end(),
                   [](const Unit& a, const Unit& b) { return a.flops > b.flops; });
  return units;
}

// Shared by the caller and the pool task; the task may start after the caller is done, so it
// holds its own reference and touches the buffers only while a unit is still unclaimed.
struct Job {
  Problem pb;
  std::vector<Unit> units;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable all_done;
  int64_t done = 0;

  // The first page unit u reads (nullptr: it reads none).
  const void* FirstPage(const Unit& u) const {
    int64_t lo, hi;
    KeyRange(pb, u.first_pos, &lo, &hi);
    if (lo > hi) return nullptr;
    const int64_t page = std::clamp<int64_t>(
        pb.page_indices[u.seq * pb.pages_per_seq + lo / pb.page_size], 0, pb.num_pages - 1);
    const int64_t page_bytes =
        pb.page_size * 2 * pb.num_kv_heads * pb.head_dim * (pb.cache_bf16 ? 2 : 4);
    return static_cast<const char*>(pb.cache) + page * page_bytes;
  }

  void Work() {
    Scratch sc;
    int64_t finished = 0;
    const int64_t n = static_cast<int64_t>(units.size());
    // Each worker claims its next unit before running the current one, so the current one's
    // last page can prefetch the next one's first.
    for (int64_t i = next.fetch_add(1); i < n;) {
      const int64_t following = next.fetch_add(1);
      const void* after = following < n ? FirstPage(units[following]) : nullptr;
      const Unit& u = units[i];
      const int32_t* page_row = pb.page_indices + u.seq * pb.pages_per_seq;
      if (pb.cache_bf16) {
        RunUnit<uint16_t>(pb, u, page_row, sc, after);
      } else {
        RunUnit<float>(pb, u, page_row, sc, after);
      }
      ++finished;
      i = following;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(mu);
      done += finished;
      if (done == static_cast<int64_t>(units.size())) all_done.notify_all();
    }
  }
};

ffi::Error RaggedPagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                    ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                                    ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer kv_cache,
                                    ffi::Buffer<ffi::S32> kv_lens,
                                    ffi::Buffer<ffi::S32> page_indices,
                                    ffi::Buffer<ffi::S32> cu_q_lens,
                                    ffi::Buffer<ffi::S32> num_seqs,
                                    ffi::ResultBuffer<ffi::F32> out,
                                    ffi::Result<ffi::AnyBuffer> cache_out, float sm_scale,
                                    int64_t sliding_window, float soft_cap) {
  const auto q_dims = q.dimensions();
  const auto c_dims = kv_cache.dimensions();
  const auto p_dims = page_indices.dimensions();
  const auto k_dims = k_new.dimensions();
  if (q_dims.size() != 3 || c_dims.size() != 4 || p_dims.size() != 2 || k_dims.size() != 3) {
    return ffi::Error::InvalidArgument("paged attention: q and k_new must be rank 3, kv_cache "
                                       "rank 4, page_indices rank 2");
  }
  const int64_t num_tokens = q_dims[0], max_seqs = p_dims[0];
  auto job = std::make_shared<Job>();
  Problem& pb = job->pb;
  pb.q = q.typed_data();
  pb.cache = cache_out->untyped_data();
  pb.page_indices = page_indices.typed_data();
  pb.out = out->typed_data();
  pb.num_q_heads = q_dims[1];
  pb.head_dim = q_dims[2];
  pb.num_pages = c_dims[0];
  pb.page_size = c_dims[1];
  pb.num_kv_heads = c_dims[2] / 2;
  pb.pages_per_seq = p_dims[1];
  pb.sm_scale = sm_scale;
  pb.soft_cap = soft_cap;
  pb.sliding_window = sliding_window;
  if (kv_cache.element_type() == ffi::DataType::BF16) {
    pb.cache_bf16 = true;
  } else if (kv_cache.element_type() == ffi::DataType::F32) {
    pb.cache_bf16 = false;
  } else {
    return ffi::Error::InvalidArgument("paged attention: kv_cache must be f32 or bf16");
  }
  if (c_dims[3] != pb.head_dim || pb.num_kv_heads < 1 || c_dims[2] != 2 * pb.num_kv_heads ||
      pb.num_q_heads % pb.num_kv_heads != 0 || pb.page_size < 1 ||
      pb.page_size > kMaxPageSize || pb.num_pages < 1 ||
      kv_lens.element_count() != static_cast<size_t>(max_seqs) ||
      cu_q_lens.element_count() != static_cast<size_t>(max_seqs + 1) ||
      num_seqs.element_count() < 1 || k_dims[0] != num_tokens ||
      k_dims[1] != pb.num_kv_heads || k_dims[2] != pb.head_dim ||
      v_new.element_count() != k_new.element_count() ||
      slots.element_count() != static_cast<size_t>(num_tokens) ||
      cache_out->element_type() != kv_cache.element_type() ||
      cache_out->size_bytes() != kv_cache.size_bytes()) {
    return ffi::Error::InvalidArgument("paged attention: inconsistent input shapes");
  }
  if (cache_out->untyped_data() != kv_cache.untyped_data()) {  // not aliased: start from a copy
    std::memcpy(cache_out->untyped_data(), kv_cache.untyped_data(), kv_cache.size_bytes());
  }
  const int64_t capacity = pb.num_pages * pb.page_size;
  if (pb.cache_bf16) {
    WriteNewKv(static_cast<uint16_t*>(cache_out->untyped_data()), capacity, pb.num_kv_heads,
               pb.head_dim, k_new.typed_data(), v_new.typed_data(), slots.typed_data(),
               num_tokens);
  } else {
    WriteNewKv(static_cast<float*>(cache_out->untyped_data()), capacity, pb.num_kv_heads,
               pb.head_dim, k_new.typed_data(), v_new.typed_data(), slots.typed_data(),
               num_tokens);
  }
  job->units = PlanUnits(pb, num_tokens, max_seqs, kv_lens.typed_data(), cu_q_lens.typed_data(),
                         num_seqs.typed_data()[0]);
  if (job->units.empty()) return ffi::Error::Success();
  double flops = 0.0;
  for (const Unit& u : job->units) flops += u.flops;
  if (job->units.size() > 1 && flops >= kParallelFlops && pool.num_threads() > 0) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->all_done.wait(lock, [&] { return job->done == static_cast<int64_t>(job->units.size()); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmRaggedPagedAttention, RaggedPagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
