#pragma once
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// the counter-based generator torch uses on CUDA. Header-only and free of torch so that the
// noise kernels and the C++ tests share one definition.
//
// NOTE [Philox counters in the DP noise]
// A Philox output is a pure function of a 64-bit key and a 128-bit counter, so any block of the
// stream can be computed without the blocks before it (the kernels fill lanes of independent
// counters at once). The DP noise uses
//   key     = 64 bits drawn from the trainer's torch.Generator once per step (same seed, same noise;
//             every step draws a fresh key, so steps never share a stream),
//   counter = (block index lo, block index hi, stream, rank):
//     block index: position / 4 of the value within the step's noise, over all parameters in
//                  order (parameters never share a block),
//     stream:      what the bits are for (kNoiseStream, ...),
//     rank:        the torch.distributed rank (ranks never share a counter even with one key).
#include <cstdint>

#include "dp/isa.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ftl::dp {
inline namespace FTL_DP_ISA {

inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// One counter, for tests and tails: the same rounds on scalars.
inline void philox4x32_10_one(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * ctr[0];
    const uint64_t p1 = uint64_t(kPhiloxM1) * ctr[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ ctr[1] ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ ctr[3] ^ k1;
    ctr[1] = uint32_t(p1);
    ctr[3] = uint32_t(p0);
    ctr[0] = n0;
    ctr[2] = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Ten Philox rounds on L independent counters held lane-wise (c0[i], c1[i], c2[i],
// c3[i] is lane i's counter), in place. Compiled once per instruction set (NOTE [Kernels per
// instruction set] in kernels_impl.h): with AVX-512 or AVX2 the 32x32->64 products are vpmuludq on
// even and odd lanes (compilers vectorise the portable loop with a full 64-bit multiply, several
// times slower).
#if defined(__AVX512F__)
inline __attribute__((always_inline)) void philoxMulHiLo(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  // even lanes: the high half of `even`'s 64-bit products, swapped down; odd lanes: `odd`'s, in place
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
  // the low halves are in the same two products: even lanes in place, odd lanes swapped up (a
  // shuffle instead of vpmulld, which costs two multiplier uops)
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
}
#elif defined(__AVX2__)
inline __attribute__((always_inline)) void philoxMulHiLo(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

// L lanes (a multiple of 16); the vector paths keep L / 16 (or L / 8) registers per word in flight
// so that the rounds' dependency chains overlap (one register alone is latency-bound).
template <int L>
inline __attribute__((always_inline)) void philox4x32_10(uint32_t* c0, uint32_t* c1, uint32_t* c2,
                                                         uint32_t* c3, uint32_t k0, uint32_t k1) {
  static_assert(L % 16 == 0, "Philox lanes come in multiples of 16");
#if defined(__AVX512F__)
  constexpr int V = L / 16;
  __m512i a[V], b[V], c[V], d[V];
  for (int v = 0; v < V; ++v) {
    a[v] = _mm512_loadu_si512(c0 + 16 * v);
    b[v] = _mm512_loadu_si512(c1 + 16 * v);
    c[v] = _mm512_loadu_si512(c2 + 16 * v);
    d[v] = _mm512_loadu_si512(c3 + 16 * v);
  }
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxM0)), m1 = _mm512_set1_epi32(int(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    const __m512i kv0 = _mm512_set1_epi32(int(k0)), kv1 = _mm512_set1_epi32(int(k1));
    for (int v = 0; v < V; ++v) {
      __m512i hi_a, lo_a, hi_c, lo_c;
      philoxMulHiLo(a[v], m0, hi_a, lo_a);
      philoxMulHiLo(c[v], m1, hi_c, lo_c);
      a[v] = _mm512_ternarylogic_epi32(hi_c, b[v], kv0, 0x96);  // three-way xor
      c[v] = _mm512_ternarylogic_epi32(hi_a, d[v], kv1, 0x96);
      b[v] = lo_c;
      d[v] = lo_a;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_si512(c0 + 16 * v, a[v]);
    _mm512_storeu_si512(c1 + 16 * v, b[v]);
    _mm512_storeu_si512(c2 + 16 * v, c[v]);
    _mm512_storeu_si512(c3 + 16 * v, d[v]);
  }
#elif defined(__AVX2__)
  constexpr int V = L / 8;
  auto load = [](const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto store = [](uint32_t* p, __m256i x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); };
  __m256i a[V], b[V], c[V], d[V];
  for (int v = 0; v < V; ++v) {
    a[v] = load(c0 + 8 * v);
    b[v] = load(c1 + 8 * v);
    c[v] = load(c2 + 8 * v);
    d[v] = load(c3 + 8 * v);
  }
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    const __m256i kv0 = _mm256_set1_epi32(int(k0)), kv1 = _mm256_set1_epi32(int(k1));
    for (int v = 0; v < V; ++v) {
      __m256i hi_a, lo_a, hi_c, lo_c;
      philoxMulHiLo(a[v], m0, hi_a, lo_a);
      philoxMulHiLo(c[v], m1, hi_c, lo_c);
      a[v] = _mm256_xor_si256(_mm256_xor_si256(hi_c, b[v]), kv0);
      c[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, d[v]), kv1);
      b[v] = lo_c;
      d[v] = lo_a;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < V; ++v) {
    store(c0 + 8 * v, a[v]);
    store(c1 + 8 * v, b[v]);
    store(c2 + 8 * v, c[v]);
    store(c3 + 8 * v, d[v]);
  }
#else
  for (int i = 0; i < L; ++i) {
    uint32_t ctr[4] = {c0[i], c1[i], c2[i], c3[i]};
    philox4x32_10_one(ctr, k0, k1);
    c0[i] = ctr[0];
    c1[i] = ctr[1];
    c2[i] = ctr[2];
    c3[i] = ctr[3];
  }
#endif
}

}  // namespace FTL_DP_ISA
}  // namespace ftl::dp
