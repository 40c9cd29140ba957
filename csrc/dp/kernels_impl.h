#pragma once
// The bodies of the DP noise kernels, compiled once per instruction set (NOTE [Kernels per
// instruction set] in isa.h): include only from kernels_<isa>.cpp, after defining FTL_DP_ISA.
#include <cstdint>
#include <type_traits>

#include "dp/chacha20.h"
#include "dp/gaussian.h"
#include "dp/kernels.h"
#include "dp/philox.h"

#define FTL_INLINE inline __attribute__((always_inline))

namespace ftl::dp {
inline namespace FTL_DP_ISA {

constexpr int kL = kLanes;

// Groups are made kBatch at a time: one group alone leaves the vector units waiting on the
// latency of each round; four independent ones keep them busy. The values do not depend on the
// batching (each group's counters and layout are fixed), only the speed does.
constexpr int kBatch = 4;
constexpr int kBL = kBatch * kL;  // lanes per batch

FTL_INLINE void philoxLanes(uint64_t key, uint64_t counter, uint32_t stream, uint32_t rank,
                            uint32_t (&c0)[kBL], uint32_t (&c1)[kBL], uint32_t (&c2)[kBL],
                            uint32_t (&c3)[kBL]) {
  for (int i = 0; i < kBL; ++i) {
    const uint64_t c = counter + uint64_t(i);
    c0[i] = uint32_t(c);
    c1[i] = uint32_t(c >> 32);
    c2[i] = stream;
    c3[i] = rank;
  }
  philox4x32_10<kBL>(c0, c1, c2, c3, uint32_t(key), uint32_t(key >> 32));
}

// The normals of groups g .. g + kBatch - 1 (counters from `counter`), each group's in its own
// layout: float group = [z0 of words 0,1 | z1 of words 0,1 | z0 of words 2,3 | z1 of words 2,3],
// 16 lanes each; double group = [z0 | z1] of the 64-bit words (0,1) and (2,3).
FTL_INLINE void philoxBatch(uint64_t key, uint64_t counter, uint32_t stream, uint32_t rank,
                            float (&z)[kBatch * kGroupF32]) {
  uint32_t c0[kBL], c1[kBL], c2[kBL], c3[kBL];
  philoxLanes(key, counter, stream, rank, c0, c1, c2, c3);
  float a0[kBL], a1[kBL], b0[kBL], b1[kBL];
  boxMullerF32<kBL>(c0, c1, a0, a1);
  boxMullerF32<kBL>(c2, c3, b0, b1);
  for (int g = 0; g < kBatch; ++g) {
    float* zg = z + g * kGroupF32;
    for (int i = 0; i < kL; ++i) {
      zg[i] = a0[g * kL + i];
      zg[kL + i] = a1[g * kL + i];
      zg[2 * kL + i] = b0[g * kL + i];
      zg[3 * kL + i] = b1[g * kL + i];
    }
  }
}

FTL_INLINE void philoxBatch(uint64_t key, uint64_t counter, uint32_t stream, uint32_t rank,
                            double (&z)[kBatch * kGroupF64]) {
  uint32_t c0[kBL], c1[kBL], c2[kBL], c3[kBL];
  philoxLanes(key, counter, stream, rank, c0, c1, c2, c3);
  uint64_t a[kBL], b[kBL];
  for (int i = 0; i < kBL; ++i) {
    a[i] = uint64_t(c0[i]) | (uint64_t(c1[i]) << 32);
    b[i] = uint64_t(c2[i]) | (uint64_t(c3[i]) << 32);
  }
  double z0[kBL], z1[kBL];
  boxMullerF64<kBL>(a, b, z0, z1);
  for (int g = 0; g < kBatch; ++g) {
    for (int i = 0; i < kL; ++i) {
      z[g * kGroupF64 + i] = z0[g * kL + i];
      z[g * kGroupF64 + kL + i] = z1[g * kL + i];
    }
  }
}

// One ChaCha20 group (16 blocks): 64 normal pairs from 128-bit draws.
FTL_INLINE void chachaGroup(const uint32_t* key, uint64_t nonce, uint64_t block, double (&z)[kGroupSecure]) {
  uint32_t w[16][kL];
  chacha20Blocks<kL>(key, nonce, block, w);
  uint64_t a[4 * kL], b[4 * kL];
  for (int q = 0; q < 4; ++q) {
    for (int i = 0; i < kL; ++i) {
      a[q * kL + i] = uint64_t(w[4 * q][i]) | (uint64_t(w[4 * q + 1][i]) << 32);
      b[q * kL + i] = uint64_t(w[4 * q + 2][i]) | (uint64_t(w[4 * q + 3][i]) << 32);
    }
  }
  double z0[4 * kL], z1[4 * kL];
  boxMullerF64<4 * kL>(a, b, z0, z1);
  for (int q = 0; q < 4; ++q) {
    for (int i = 0; i < kL; ++i) {
      z[2 * q * kL + i] = z0[q * kL + i];
      z[(2 * q + 1) * kL + i] = z1[q * kL + i];
    }
  }
}

// Groups [g0, g1) of one tensor: out[j] = (sum[j] + std z[j]) * scale. (No lambdas here: a lambda's
// body is a function of its own, compiled for the default instruction set, not the caller's.)
template <typename T>
FTL_INLINE void philoxBody(T* out, const T* sum, int64_t n, T std, T scale, uint64_t key, uint64_t counter0,
                           uint32_t stream, uint32_t rank, int64_t g0, int64_t g1) {
  constexpr int64_t G = std::is_same_v<T, float> ? kGroupF32 : kGroupF64;
  constexpr int64_t BG = kBatch * G;
  for (int64_t g = g0; g < g1; g += kBatch) {
    // a batch may run past g1 or the tensor's last group: those values are made and dropped (their
    // counters belong to nobody here or are remade identically by the neighbouring task)
    T z[BG];
    philoxBatch(key, counter0 + uint64_t(g) * kL, stream, rank, z);
    const int64_t base = g * G;
    const int64_t end_group = g + kBatch < g1 ? g + kBatch : g1;
    const int64_t limit = end_group * G < n ? end_group * G : n;
    const int64_t m = limit - base;
    T* o = out + base;
    if (m == BG) {
      if (sum != nullptr) {
        const T* s = sum + base;
        for (int64_t j = 0; j < BG; ++j) o[j] = (s[j] + std * z[j]) * scale;
      } else {
        for (int64_t j = 0; j < BG; ++j) o[j] = std * z[j] * scale;
      }
    } else {
      for (int64_t j = 0; j < m; ++j) o[j] = ((sum != nullptr ? sum[base + j] : T(0)) + std * z[j]) * scale;
    }
  }
}

// Secure mode: the sum and the noise meet in double precision and the result is rounded to the
// grid before it is scaled and stored (NOTE [secure_mode's noise]).
template <typename T>
FTL_INLINE void secureBody(T* out, const T* sum, int64_t n, double std, double scale, double grid,
                           const uint32_t* key, uint64_t nonce, uint64_t block0, int64_t g0, int64_t g1) {
  const double inv_grid = 1.0 / grid;  // exact: grid is a power of two
  for (int64_t g = g0; g < g1; ++g) {
    double z[kGroupSecure];
    chachaGroup(key, nonce, block0 + uint64_t(g) * kL, z);
    const int64_t base = g * kGroupSecure;
    const int64_t m = (n - base < kGroupSecure ? n - base : kGroupSecure);
    for (int64_t j = 0; j < m; ++j) {
      const double s = sum != nullptr ? double(sum[base + j]) : 0.0;
      const double y = __builtin_rint((s + std * z[j]) * inv_grid) * grid;
      out[base + j] = T(y * scale);
    }
  }
}

void philoxF32(float* o, const float* s, int64_t n, float sd, float sc, uint64_t k, uint64_t c, uint32_t st,
               uint32_t r, int64_t g0, int64_t g1) {
  philoxBody<float>(o, s, n, sd, sc, k, c, st, r, g0, g1);
}
void philoxF64(double* o, const double* s, int64_t n, double sd, double sc, uint64_t k, uint64_t c,
               uint32_t st, uint32_t r, int64_t g0, int64_t g1) {
  philoxBody<double>(o, s, n, sd, sc, k, c, st, r, g0, g1);
}
void secureF32(float* o, const float* s, int64_t n, double sd, double sc, double gr, const uint32_t* k,
               uint64_t nc, uint64_t b, int64_t g0, int64_t g1) {
  secureBody<float>(o, s, n, sd, sc, gr, k, nc, b, g0, g1);
}
void secureF64(double* o, const double* s, int64_t n, double sd, double sc, double gr, const uint32_t* k,
               uint64_t nc, uint64_t b, int64_t g0, int64_t g1) {
  secureBody<double>(o, s, n, sd, sc, gr, k, nc, b, g0, g1);
}

}  // namespace FTL_DP_ISA
}  // namespace ftl::dp

#define FTL_DP_STR2(x) #x
#define FTL_DP_STR(x) FTL_DP_STR2(x)
// The table of this instruction set's kernels, for the kernels_<isa>.cpp that includes this file.
#define FTL_DP_KERNEL_TABLE                                                                       \
  ::ftl::dp::NoiseKernels {                                                                       \
    FTL_DP_STR(FTL_DP_ISA), &::ftl::dp::FTL_DP_ISA::philoxF32, &::ftl::dp::FTL_DP_ISA::philoxF64, \
        &::ftl::dp::FTL_DP_ISA::secureF32, &::ftl::dp::FTL_DP_ISA::secureF64                      \
  }
