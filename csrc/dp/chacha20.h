#pragma once
// ChaCha20 (Bernstein 2008; RFC 8439), the stream cipher behind secure_mode's noise and sampling.
// Header-only and free of torch, like philox.h.
//
// NOTE [ChaCha20 layout in secure mode]
// The state is RFC 8439's: 4 constant words, 8 key words, then words 12..15. We use words 12-13
// as a 64-bit block counter and 14-15 as a 64-bit nonce (Bernstein's original layout; with
// word 13 read as the first nonce word it is exactly RFC 8439's 32-bit counter + 96-bit nonce,
// which is how the test vectors check it). The key is 256 bits from the OS (getrandom) and is
// never derived from torch's seed: secure-mode noise cannot be reproduced, by design. One key
// serves one process; the nonce separates uses (noise, Poisson sampling) and the block counter
// only increases, so no (key, nonce, counter) is used twice.
#include <cstdint>

#include "dp/isa.h"

namespace ftl::dp {
inline namespace FTL_DP_ISA {

inline constexpr uint32_t kChaChaConst[4] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u};

template <int L>
inline __attribute__((always_inline)) void chachaQuarter(uint32_t (&x)[16][L], int a, int b, int c, int d) {
  auto rotl = [](uint32_t v, int n) { return (v << n) | (v >> (32 - n)); };
  for (int i = 0; i < L; ++i) {
    x[a][i] += x[b][i];
    x[d][i] = rotl(x[d][i] ^ x[a][i], 16);
    x[c][i] += x[d][i];
    x[b][i] = rotl(x[b][i] ^ x[c][i], 12);
    x[a][i] += x[b][i];
    x[d][i] = rotl(x[d][i] ^ x[a][i], 8);
    x[c][i] += x[d][i];
    x[b][i] = rotl(x[b][i] ^ x[c][i], 7);
  }
}

// L consecutive ChaCha20 blocks, counters block0 .. block0 + L - 1, lane-wise: out[w][i] is word w
// of block block0 + i (so each output word vectorises across blocks).
template <int L>
inline __attribute__((always_inline)) void chacha20Blocks(const uint32_t key[8], uint64_t nonce,
                                                          uint64_t block0, uint32_t (&out)[16][L]) {
  uint32_t init[16];
  for (int w = 0; w < 4; ++w) init[w] = kChaChaConst[w];
  for (int w = 0; w < 8; ++w) init[4 + w] = key[w];
  init[14] = uint32_t(nonce);
  init[15] = uint32_t(nonce >> 32);
  for (int w = 0; w < 16; ++w)
    for (int i = 0; i < L; ++i) out[w][i] = init[w];
  for (int i = 0; i < L; ++i) {
    const uint64_t ctr = block0 + uint64_t(i);
    out[12][i] = uint32_t(ctr);
    out[13][i] = uint32_t(ctr >> 32);
  }
  uint32_t ctr_lo[L], ctr_hi[L];
  for (int i = 0; i < L; ++i) {
    ctr_lo[i] = out[12][i];
    ctr_hi[i] = out[13][i];
  }
  for (int round = 0; round < 10; ++round) {
    chachaQuarter<L>(out, 0, 4, 8, 12);
    chachaQuarter<L>(out, 1, 5, 9, 13);
    chachaQuarter<L>(out, 2, 6, 10, 14);
    chachaQuarter<L>(out, 3, 7, 11, 15);
    chachaQuarter<L>(out, 0, 5, 10, 15);
    chachaQuarter<L>(out, 1, 6, 11, 12);
    chachaQuarter<L>(out, 2, 7, 8, 13);
    chachaQuarter<L>(out, 3, 4, 9, 14);
  }
  for (int w = 0; w < 16; ++w) {
    if (w == 12 || w == 13) continue;
    for (int i = 0; i < L; ++i) out[w][i] += init[w];
  }
  for (int i = 0; i < L; ++i) {
    out[12][i] += ctr_lo[i];
    out[13][i] += ctr_hi[i];
  }
}

}  // namespace FTL_DP_ISA
}  // namespace ftl::dp
