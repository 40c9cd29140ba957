#pragma once
// Box-Muller from raw random bits, in float and in double, written lane-wise so that the compiler
// vectorises it (no libm calls: log, sin and cos are polynomials on reduced ranges).
//
// NOTE [The normal transform]
// A pair of standard normals is (r cos t, r sin t) with r = sqrt(-2 ln u), u uniform in (0, 1],
// and t uniform in [0, 2 pi). We never compute t: three random bits pick one of the 8 symmetries
// of the square (swap the coordinates or not, the sign of each), and the remaining bits give an
// angle phi uniform in [0, pi/4). The 8 images of [0, pi/4) under those symmetries cover every
// angle the same number of times (the swap reflects [0, pi/4) onto [pi/4, pi/2)), so the angle
// is uniform on the circle and sin/cos are only needed on [0, pi/4), where short Taylor
// polynomials are accurate to the format's precision.
//   float: u from 31 bits, u in [2^-32, 1], so |z| <= sqrt(64 ln 2) = 6.66 (no output larger);
//          phi from 24 bits.
//   double: u from 63 bits, u in [2^-64, 1], so |z| <= sqrt(128 ln 2) = 9.42; phi from 61 bits.
// Each is exact Box-Muller up to the rounding of u and phi and the polynomials' error (below
// 2 ulp of the format in [0, pi/4) and for log on [sqrt(1/2), sqrt(2))).
// Every instruction set gives the same bits for the same counter (same seed, same noise, on any
// machine): the kernels are compiled with -ffp-contract=off, and the fused multiply-adds below are
// explicit (__builtin_fma, one rounding everywhere: an instruction with FMA hardware, libm without).
#include <cstdint>

#include "dp/isa.h"

namespace ftl::dp {
inline namespace FTL_DP_ISA {

inline __attribute__((always_inline)) float fmaF(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
inline __attribute__((always_inline)) double fmaD(double a, double b, double c) {
  return __builtin_fma(a, b, c);
}

// z0[i], z1[i] = a standard normal pair from the bits a[i] (radius) and b[i] (angle).
template <int L>
inline __attribute__((always_inline)) void boxMullerF32(const uint32_t* a, const uint32_t* b, float* z0,
                                                        float* z1) {
  float r[L];
  for (int i = 0; i < L; ++i) {
    const float u = fmaF(float(int32_t(a[i] >> 1)), 0x1p-31f, 0x1p-32f);  // in [2^-32, 1]
    const uint32_t ub = __builtin_bit_cast(uint32_t, u);
    // u = m 2^e, m in [sqrt(1/2), sqrt(2))
    const uint32_t big = ((ub & 0x7FFFFFu) > 0x3504F3u) ? 1u : 0u;  // mantissa above sqrt(2)
    const float e = float(int32_t(ub >> 23) - 127 + int32_t(big));
    const float m = __builtin_bit_cast(float, (ub & 0x7FFFFFu) | ((127u - big) << 23));
    // ln m = t + t^2 Q(t), t = m - 1 in [-0.293, 0.415]: Q a least-squares fit of degree 7
    // (relative error of ln m below 6e-8, under float's epsilon)
    const float t = m - 1.0f;
    // (Estrin's scheme: a dependency chain of 4 instead of 8)
    const float t2 = t * t;
    const float t4 = t2 * t2;
    const float q01 = fmaF(0.33334264817589915f, t, -0.4999999548126186f);
    const float q23 = fmaF(0.19951635944829185f, t, -0.25001533628765965f);
    const float q45 = fmaF(0.15015285049492152f, t, -0.16570599335710795f);
    const float q67 = fmaF(0.08516030449406356f, t, -0.14337589391639569f);
    const float q = fmaF(fmaF(q67, t2, q45), t4, fmaF(q23, t2, q01));
    const float ln = fmaF(e, 0.693147181f, fmaF(t2, q, t));
    const float r2 = -2.0f * ln;
    r[i] = __builtin_sqrtf(r2 > 0.0f ? r2 : 0.0f);
  }
  for (int i = 0; i < L; ++i) {
    const uint32_t bits = b[i];
    const float phi =
        fmaF(float(int32_t((bits & 0x1FFFFFFFu) >> 5)), 0x1p-24f * 0.785398163f, 0x1p-25f * 0.785398163f);
    const float q = phi * phi;
    // least-squares polynomials on Chebyshev nodes of [0, pi/4): sin = phi + phi^3 P(phi^2),
    // cos = 1 + phi^2 Q(phi^2), errors below 2e-9 and 6e-11
    float sn = -0.000194966053967941f;
    sn = fmaF(sn, q, 0.008331987566174839f);
    sn = fmaF(sn, q, -0.16666650859068768f);
    sn = fmaF(sn * q, phi, phi);
    float cs = 2.4394102238984335e-05f;
    cs = fmaF(cs, q, -0.0013886808635204845f);
    cs = fmaF(cs, q, 0.04166662501357823f);
    cs = fmaF(cs, q, -0.49999999743785234f);
    cs = fmaF(cs, q, 1.0f);
    const bool swap = (bits >> 31) != 0;
    // the sign bits of the two outputs: bits 30 and 29, moved to bit 31
    const uint32_t sx = (bits << 1) & 0x80000000u;
    const uint32_t sy = (bits << 2) & 0x80000000u;
    z0[i] = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, r[i] * (swap ? sn : cs)) ^ sx);
    z1[i] = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, r[i] * (swap ? cs : sn)) ^ sy);
  }
}

template <int L>
inline __attribute__((always_inline)) void boxMullerF64(const uint64_t* a, const uint64_t* b, double* z0,
                                                        double* z1) {
  double r[L];
  for (int i = 0; i < L; ++i) {
    const double u = fmaD(double(int64_t(a[i] >> 1)), 0x1p-63, 0x1p-64);  // in [2^-64, 1]
    const uint64_t ub = __builtin_bit_cast(uint64_t, u);
    const uint64_t big =
        ((ub & 0xFFFFFFFFFFFFFull) > 0x6A09E667F3BCCull) ? 1u : 0u;  // mantissa above sqrt(2)
    const double e = double(int64_t(ub >> 52) - 1023 + int64_t(big));
    const double m = __builtin_bit_cast(double, (ub & 0xFFFFFFFFFFFFFull) | ((1023ull - big) << 52));
    // ln m = 2 atanh(s) = sum_k 2 s^(2k+1) / (2k+1), s = (m - 1) / (m + 1), |s| <= 0.1716, k <= 10:
    // truncation error below 2^-60
    const double s = (m - 1.0) / (m + 1.0);
    const double s2 = s * s;
    double p = 2.0 / 21;
    p = fmaD(p, s2, 2.0 / 19);
    p = fmaD(p, s2, 2.0 / 17);
    p = fmaD(p, s2, 2.0 / 15);
    p = fmaD(p, s2, 2.0 / 13);
    p = fmaD(p, s2, 2.0 / 11);
    p = fmaD(p, s2, 2.0 / 9);
    p = fmaD(p, s2, 2.0 / 7);
    p = fmaD(p, s2, 2.0 / 5);
    p = fmaD(p, s2, 2.0 / 3);
    p = fmaD(p, s2 * s, 2.0 * s);  // 2 s + s^3 (...)
    // e ln 2 with ln 2 in two parts, so that e ln 2 (|e| <= 64) keeps every bit
    const double ln = fmaD(e, 6.93147180369123816490e-01, fmaD(e, 1.90821492927058770002e-10, p));
    const double r2 = -2.0 * ln;
    r[i] = __builtin_sqrt(r2 > 0.0 ? r2 : 0.0);
  }
  for (int i = 0; i < L; ++i) {
    const uint64_t bits = b[i];
    const double phi = fmaD(double(int64_t(bits & 0x1FFFFFFFFFFFFFFFull)), 0x1p-61 * 0.78539816339744830962,
                            0x1p-62 * 0.78539816339744830962);
    const double q = phi * phi;
    // Taylor to phi^17 (sin) and phi^18 (cos): error below 2^-58 on [0, pi/4)
    double sn = 2.8114572543455206e-15;
    sn = fmaD(sn, q, -7.647163731819816e-13);
    sn = fmaD(sn, q, 1.6059043836821613e-10);
    sn = fmaD(sn, q, -2.505210838544172e-08);
    sn = fmaD(sn, q, 2.7557319223985893e-06);
    sn = fmaD(sn, q, -0.0001984126984126984);
    sn = fmaD(sn, q, 0.008333333333333333);
    sn = fmaD(sn, q, -0.16666666666666666);
    sn = fmaD(sn * q, phi, phi);
    double cs = -1.5619206968586225e-16;
    cs = fmaD(cs, q, 4.779477332387385e-14);
    cs = fmaD(cs, q, -1.1470745597729725e-11);
    cs = fmaD(cs, q, 2.08767569878681e-09);
    cs = fmaD(cs, q, -2.755731922398589e-07);
    cs = fmaD(cs, q, 2.48015873015873e-05);
    cs = fmaD(cs, q, -0.001388888888888889);
    cs = fmaD(cs, q, 0.041666666666666664);
    cs = fmaD(cs, q, -0.5);
    cs = fmaD(cs, q, 1.0);
    const bool swap = (bits >> 63) != 0;
    const uint64_t sx = (bits << 1) & 0x8000000000000000ull;
    const uint64_t sy = (bits << 2) & 0x8000000000000000ull;
    z0[i] = __builtin_bit_cast(double, __builtin_bit_cast(uint64_t, r[i] * (swap ? sn : cs)) ^ sx);
    z1[i] = __builtin_bit_cast(double, __builtin_bit_cast(uint64_t, r[i] * (swap ? cs : sn)) ^ sy);
  }
}

}  // namespace FTL_DP_ISA
}  // namespace ftl::dp
