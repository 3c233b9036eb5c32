// One GGUF-block matmul on one thread, timed in C++ around the native kernel's own code
// (kernels/native/quantized_matmul.cc is #included): min of 200 calls, weights random.
//
//   g++ -O3 -march=native -std=c++17 -fno-math-errno -pthread \
//     -isystem "$(python -c 'import jax; print(jax.ffi.include_dir())')" \
//     benchmarks/native/quantized_matmul_tiles.cc -o /tmp/qmm
//   /tmp/qmm M K N q4(1: Q4_1, 0: Q8_0) bf16(0: float32 activations, 1: bfloat16)
//   e.g. the LM head at batch 32: /tmp/qmm 32 576 49152 0 0
#ifndef QM_SRC
#define QM_SRC "../../kernels/native/quantized_matmul.cc"
#endif
#include QM_SRC
#include <chrono>
#include <cstdio>
#include <random>
int main(int argc, char** argv) {
  const int64_t M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]); const bool q4 = atoi(argv[4]); const bool bf16 = atoi(argv[5]);
  const int64_t G = (N + 15) / 16, B = K / 32, W = bf16 ? std::min<int64_t>(M, 12) : std::min<int64_t>(M, 16);
  const int64_t tiles = (M + W - 1) / W;
  std::mt19937 g(1);
  std::vector<uint8_t> codes(G * B * (q4 ? 16 : 32) * 16); for (auto& c : codes) c = g();
  std::vector<_Float16> sc(G * B * 16), mn(G * B * 16); for (auto& x : sc) x = (_Float16)(0.01f * (g() % 100)); for (auto& x : mn) x = (_Float16)(-0.01f * (g() % 100));
  std::vector<float> x(M * K), xt(tiles * K * W, 0.0f), y(M * N);
  for (auto& v : x) v = (g() % 2000) / 1000.0f - 1.0f;
  for (int64_t r = 0; r < M; ++r) for (int64_t k = 0; k < K; ++k) xt[((r / W) * K + k) * W + r % W] = x[r * K + k];
  std::vector<uint32_t> pairs(tiles * W * K / 2); std::vector<float> sums(tiles * W * B);
  Problem pb{}; pb.x = xt.data(); pb.codes = codes.data(); pb.scales = sc.data(); pb.mins = mn.data(); pb.y = y.data();
  pb.rows = M; pb.k = K; pb.n = N; pb.groups = G; pb.blocks = B; pb.tile_width = W; pb.q4 = q4; pb.bf16 = bf16;
  double best = 1e9;
  for (int rep = 0; rep < 200; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    if (bf16) { PreparePairs(x.data(), M, B, W, pairs.data(), sums.data()); pb.xp = pairs.data(); pb.xsums = sums.data(); }
    Split s = SplitWork(pb);
    for (int64_t u = 0; u < s.units(); ++u) RunUnit(pb, s, u);
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  printf("M %ld K %ld N %ld q4 %d bf16 %d: %.1f us, %.0f GFLOP/s (1 thread)  %g\n", M, K, N, q4, bf16, best * 1e6, 2.0 * M * K * N / best / 1e9, y[7]);
}
