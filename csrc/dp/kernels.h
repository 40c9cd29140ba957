#pragma once
// The table of DP noise kernels one instruction set provides (NOTE [Kernels per instruction set]
// in isa.h). Torch-free: the per-ISA files that define these must not include torch headers.
#include <cstdint>

namespace ftl::dp {

inline constexpr int kLanes = 16;                    // counters (Philox) or blocks (ChaCha20) per group
inline constexpr int64_t kGroupF32 = 4 * kLanes;     // float normals per group of 16 Philox counters
inline constexpr int64_t kGroupF64 = 2 * kLanes;     // double normals per group (64 bits per uniform)
inline constexpr int64_t kGroupSecure = 8 * kLanes;  // double normals per group of 16 ChaCha20 blocks

// Each kernel handles groups [g0, g1) of an n-value tensor: out = (sum + std z) * scale (secure:
// snapped to `grid` before the scale). `sum` may be null (zero) or equal to `out`.
struct NoiseKernels {
  const char* isa;
  void (*philox_f32)(float* out, const float* sum, int64_t n, float std, float scale, uint64_t key,
                     uint64_t counter0, uint32_t stream, uint32_t rank, int64_t g0, int64_t g1);
  void (*philox_f64)(double* out, const double* sum, int64_t n, double std, double scale, uint64_t key,
                     uint64_t counter0, uint32_t stream, uint32_t rank, int64_t g0, int64_t g1);
  void (*secure_f32)(float* out, const float* sum, int64_t n, double std, double scale, double grid,
                     const uint32_t* key, uint64_t nonce, uint64_t block0, int64_t g0, int64_t g1);
  void (*secure_f64)(double* out, const double* sum, int64_t n, double std, double scale, double grid,
                     const uint32_t* key, uint64_t nonce, uint64_t block0, int64_t g0, int64_t g1);
};

// Constant-initialised tables (no code runs to build them: the AVX ones must be safe to name on a
// CPU that lacks AVX). The AVX ones are null where the build is not for x86-64.
extern const NoiseKernels kGenericKernels;
extern const NoiseKernels* const kAvx2Kernels;
extern const NoiseKernels* const kAvx512Kernels;

}  // namespace ftl::dp
