#pragma once
// The DP-SGD noise kernels: Gaussian noise from Philox (the default) or from ChaCha20 keyed by the
// OS (secure mode), fused with the step's last pass over each gradient (NOTE [One pass over the
// gradient] in noise.cpp).
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>

namespace ftl::dp {

// out = (sum + std * z) * scale, z the Philox standard normals of counters counter0, counter0 + 1,
// ... (NOTE [Philox counters in the DP noise] in philox.h). `out` and `sum` are contiguous CPU
// tensors of one dtype (float32 or float64) and one numel; `sum` may be `out` itself, or undefined
// for zero. Returns the number of counters used (a multiple of 16): the next parameter's counter0.
int64_t philoxNoisy(const at::Tensor& out, const at::Tensor& sum, double std, double scale, uint64_t key,
                    uint64_t counter0, uint32_t stream, uint32_t rank);

// Secure mode (NOTE [secure_mode's noise] in noise.cpp): a ChaCha20 stream keyed from the OS.
class SecureRandom {
 public:
  SecureRandom();  // draws the key with getrandom(2)
  // out = snap_grid(sum + std * z) * scale, the sum and noise added in double precision.
  void noisy(const at::Tensor& out, const at::Tensor& sum, double std, double scale, double grid);
  // n independent Bernoulli(q) draws (Poisson sampling), as a bool tensor.
  at::Tensor bernoulli(int64_t n, double q);
  int64_t blocksUsed() const { return static_cast<int64_t>(noise_block_ + sample_block_); }

 private:
  std::array<uint32_t, 8> key_;
  uint64_t noise_block_ = 0;
  uint64_t sample_block_ = 0;
};

// Which kernel variant runs here: "avx512", "avx2" or "generic". Setting the environment variable
// FUNCTORCH_LITE_NOISE_ISA=generic before the first call forces the portable one (the tests check
// that every variant gives the same bits).
std::string noiseIsa();

// The raw Philox4x32-10 block for one counter, and raw ChaCha20 words, for the tests.
std::array<uint32_t, 4> philoxBlock(std::array<uint32_t, 4> counter, uint32_t k0, uint32_t k1);
std::array<uint32_t, 16> chachaBlock(std::array<uint32_t, 8> key, uint64_t nonce, uint64_t block);

}  // namespace ftl::dp
