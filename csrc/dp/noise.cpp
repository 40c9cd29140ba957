// The DP-SGD noise kernels (noise.h). Compiled with -O3 -ffp-contract=off (CMakeLists.txt): the
// loops below are written for the vectoriser, and every instruction set must give the same bits.
//
// NOTE [One pass over the gradient]
// A DP-SGD step ends, per parameter, with grad = (clipped_sum + sigma C z) / expected_batch_size.
// Done with tensor ops that is a noise tensor the size of the parameter, an add and a divide: three
// passes over memory and a model-sized temporary. Here the noise of 64 values is made in registers
// (a stack block, L1-resident), added and scaled, and written once into `out`, which is the
// clipped sum itself (in place) or the parameter's `.grad`. Counter-based generators make the
// blocks independent, so the loop is split over threads (at::parallel_for) and the values do not
// depend on the number of threads.
#include "dp/noise.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <type_traits>

#include <sys/random.h>

#include "dp/chacha20.h"
#include "dp/kernels.h"
#include "dp/philox.h"

namespace ftl::dp {
namespace {

constexpr int64_t kGrain = 1 << 15;  // values per task of at::parallel_for

const NoiseKernels& pickKernels() {
  const char* force = std::getenv("FUNCTORCH_LITE_NOISE_ISA");
  const bool generic_only = force != nullptr && std::string(force) == "generic";
#if defined(__x86_64__)
  if (!generic_only) {
    __builtin_cpu_init();
    if (kAvx512Kernels != nullptr && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
      return *kAvx512Kernels;
    if (kAvx2Kernels != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return *kAvx2Kernels;
  }
#endif
  return kGenericKernels;
}

const NoiseKernels& kernels() {
  static const NoiseKernels& k = pickKernels();
  return k;
}

void checkPair(const at::Tensor& out, const at::Tensor& sum, const char* what) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous(), what,
                    ": out must be a contiguous CPU tensor");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, what,
                   ": out must be float32 or float64, got ", out.scalar_type());
  if (sum.defined()) {
    TORCH_CHECK_VALUE(sum.device().is_cpu() && sum.is_contiguous() &&
                          sum.scalar_type() == out.scalar_type() && sum.numel() == out.numel(),
                      what, ": sum must be a contiguous CPU tensor of out's dtype and numel");
  }
}

template <typename T>
const T* sumPtr(const at::Tensor& sum) {
  return sum.defined() ? sum.const_data_ptr<T>() : nullptr;
}

void fillKey(std::array<uint32_t, 8>& key) {
  auto* p = reinterpret_cast<unsigned char*>(key.data());
  size_t got = 0;
  while (got < sizeof(key)) {
    const ssize_t r = getrandom(p + got, sizeof(key) - got, 0);
    if (r > 0) {
      got += size_t(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  if (got < sizeof(key)) {  // a kernel without getrandom(2)
    std::ifstream urandom("/dev/urandom", std::ios::binary);
    urandom.read(reinterpret_cast<char*>(p), sizeof(key));
    TORCH_CHECK(
        urandom.gcount() == std::streamsize(sizeof(key)),
        "secure_mode: could not read 32 bytes of OS entropy (getrandom and /dev/urandom both failed)");
  }
}

constexpr uint64_t kNonceNoise = 0;
constexpr uint64_t kNonceSampling = 1;

}  // namespace

int64_t philoxNoisy(const at::Tensor& out, const at::Tensor& sum, double std, double scale, uint64_t key,
                    uint64_t counter0, uint32_t stream, uint32_t rank) {
  checkPair(out, sum, "philox noise");
  const int64_t n = out.numel();
  const NoiseKernels& k = kernels();
  const bool f32 = out.scalar_type() == at::kFloat;
  const int64_t group = f32 ? kGroupF32 : kGroupF64;
  const int64_t groups = (n + group - 1) / group;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / group), [&](int64_t g0, int64_t g1) {
    if (f32) {
      k.philox_f32(out.mutable_data_ptr<float>(), sumPtr<float>(sum), n, float(std), float(scale), key,
                   counter0, stream, rank, g0, g1);
    } else {
      k.philox_f64(out.mutable_data_ptr<double>(), sumPtr<double>(sum), n, std, scale, key, counter0, stream,
                   rank, g0, g1);
    }
  });
  return groups * kLanes;
}

SecureRandom::SecureRandom() {
  fillKey(key_);
}

// NOTE [secure_mode's noise]
// Gaussian noise in floating point can leak the value it is added to: Mironov (CCS 2012) showed
// for the Laplace mechanism that the set of floats x + noise can take depends on x, so one output
// can rule out an input. Secure mode closes that channel by construction instead of blurring it:
//   1. 128 bits from ChaCha20 per pair of normals; double-precision Box-Muller whose uniforms keep
//      63 and 61 bits (gaussian.h), so the noise has a resolution near 2^-50 sigma C;
//   2. the clipped sum and the noise are added in double precision;
//   3. the result is rounded to a fixed grid of spacing `grid` = a power of two about sigma C / 256
//      (Mironov's snapping): every output is a grid point, and which grid points can occur no
//      longer depends on the input (the grid depends only on the public sigma C). Rounding is
//      post-processing of the (near-exact) Gaussian mechanism; the remaining deviation from an
//      exact Gaussian, bounded in docs/dp.md, is charged to delta there;
//   4. only then the division by the expected batch size and the cast to the gradient's dtype
//      (both post-processing).
// The key never comes from torch's seed and is never exposed; the noise cannot be reproduced.
void SecureRandom::noisy(const at::Tensor& out, const at::Tensor& sum, double std, double scale,
                         double grid) {
  checkPair(out, sum, "secure noise");
  int exp = 0;
  TORCH_CHECK_VALUE(grid > 0 && std::frexp(grid, &exp) == 0.5,
                    "secure noise: grid must be a power of two, got ", grid);
  const int64_t n = out.numel();
  const int64_t groups = (n + kGroupSecure - 1) / kGroupSecure;
  const uint64_t block0 = noise_block_;
  noise_block_ += uint64_t(groups) * kLanes;
  const NoiseKernels& k = kernels();
  const uint32_t* kp = key_.data();
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / kGroupSecure), [&](int64_t g0, int64_t g1) {
    if (out.scalar_type() == at::kFloat) {
      k.secure_f32(out.mutable_data_ptr<float>(), sumPtr<float>(sum), n, std, scale, grid, kp, kNonceNoise,
                   block0, g0, g1);
    } else {
      k.secure_f64(out.mutable_data_ptr<double>(), sumPtr<double>(sum), n, std, scale, grid, kp, kNonceNoise,
                   block0, g0, g1);
    }
  });
}

at::Tensor SecureRandom::bernoulli(int64_t n, double q) {
  TORCH_CHECK_VALUE(n >= 0, "secure sampling: n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(q > 0 && q <= 1, "secure sampling: the rate must be in (0, 1], got ", q);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.mutable_data_ptr<bool>();
  // P(word < threshold) = threshold / 2^64, within 2^-64 of q; q = 1 takes every example.
  const bool all = q >= 1.0;
  const uint64_t threshold = all ? 0 : uint64_t(std::ldexp(q, 64));
  int64_t done = 0;
  while (done < n) {
    uint32_t w[16][kLanes];
    chacha20Blocks<kLanes>(key_.data(), kNonceSampling, sample_block_, w);
    sample_block_ += kLanes;
    for (int p = 0; p < 8 && done < n; ++p) {
      for (int i = 0; i < kLanes && done < n; ++i, ++done) {
        const uint64_t word = uint64_t(w[2 * p][i]) | (uint64_t(w[2 * p + 1][i]) << 32);
        o[done] = all || word < threshold;
      }
    }
  }
  return out;
}

std::string noiseIsa() {
  return kernels().isa;
}

std::array<uint32_t, 4> philoxBlock(std::array<uint32_t, 4> counter, uint32_t k0, uint32_t k1) {
  philox4x32_10_one(counter.data(), k0, k1);
  return counter;
}

std::array<uint32_t, 16> chachaBlock(std::array<uint32_t, 8> key, uint64_t nonce, uint64_t block) {
  uint32_t w[16][1];
  chacha20Blocks<1>(key.data(), nonce, block, w);
  std::array<uint32_t, 16> out{};
  for (int i = 0; i < 16; ++i) out[i] = w[i][0];
  return out;
}

}  // namespace ftl::dp
