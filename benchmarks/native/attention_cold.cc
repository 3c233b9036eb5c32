// Cold-cache decode attention over 30 layers, timed in C++ around the native kernel's own code
// (kernels/native/paged_attention.cc is #included, nothing is copied): 32 sequences, 9 q / 3 kv
// heads, head_dim 64, page 16, pages shuffled, each layer its own cache so every layer reads
// DRAM as in the engine. Min of 15 repetitions. Why C++: the shared machine's drift (+-30 %)
// hides kernel changes of this size in attention_bench.py's per-call jit timing.
//
//   g++ -O3 -march=native -std=c++17 -fno-math-errno -pthread \
//     -isystem "$(python -c 'import jax; print(jax.ffi.include_dir())')" \
//     benchmarks/native/attention_cold.cc -o /tmp/attention_cold
//   /tmp/attention_cold [context=192] [threads=1|2] [cache=bf16|f32] [warm: one shared cache]
//   add -DPA_SRC='"/path/to/other/paged_attention.cc"' to time another version of the kernel
#ifndef PA_SRC
#define PA_SRC "../../kernels/native/paged_attention.cc"
#endif
#include PA_SRC
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <algorithm>
#include <string>
int main(int argc, char** argv) {
  const int layers = 30, seqs = 32, ctx = argc > 1 ? atoi(argv[1]) : 192, page = 16, hq = 9, hkv = 3, d = 64;
  const int threads = argc > 2 ? atoi(argv[2]) : 1; const int warm = argc > 4;
  const int pages_per_seq = 256 / page * 4, num_pages = 1456;
  const size_t page_elems = (size_t)page * 2 * hkv * d;
  const bool f32 = argc > 3 && std::string(argv[3]) == "f32";
  std::vector<std::vector<uint16_t>> caches(layers, std::vector<uint16_t>(num_pages * page_elems * (f32 ? 2 : 1)));
  std::mt19937 g(1);
  for (auto& c : caches) for (auto& x : c) x = 0x3f80 + (g() & 0x7f);
  std::vector<int32_t> pidx(seqs * pages_per_seq, 0);
  std::vector<int> perm(num_pages); for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), g);
  for (int s = 0; s < seqs; ++s) for (int p = 0; p < pages_per_seq && s * 45 + p < num_pages; ++p) pidx[s * pages_per_seq + p] = perm[s * 45 + p];
  std::vector<float> q(seqs * hq * d), out(seqs * hq * d);
  for (auto& x : q) x = (g() % 1000) / 1000.0f - 0.5f;
  std::vector<int32_t> kv(seqs, ctx), cu(seqs + 1);
  for (int s = 0; s <= seqs; ++s) cu[s] = s;
  std::vector<char> other(64 << 20, 2);
  double best = 1e9;
  for (int rep = 0; rep < (warm ? 150 : 15); ++rep) {
    if (!warm) for (size_t i = 0; i < other.size(); i += 64) other[i]++;
    auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      Problem pb{};
      pb.q = q.data(); pb.cache = caches[warm ? 0 : l].data(); pb.cache_bf16 = !f32; pb.page_indices = pidx.data();
      pb.out = out.data(); pb.num_pages = num_pages; pb.page_size = page; pb.num_q_heads = hq; pb.num_kv_heads = hkv;
      pb.head_dim = d; pb.pages_per_seq = pages_per_seq; pb.sm_scale = 0.125f; pb.soft_cap = 0; pb.sliding_window = 0;
      auto job = std::make_shared<Job>(); job->pb = pb;
      job->units = PlanUnits(pb, seqs, seqs, kv.data(), cu.data(), seqs);
      if (threads > 1) { std::thread t([&] { job->Work(); }); job->Work(); t.join(); } else job->Work();
    }
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  double bytes = (double)layers * seqs * ctx * 2 * hkv * d * (f32 ? 4 : 2);
  printf("ctx %d threads %d: %.2f ms for %d layers, %.1f GB/s  out %g\n", ctx, threads, best * 1e3, layers, bytes / best / 1e9, out[5]);
}
