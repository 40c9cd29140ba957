#pragma once
// NOTE [Kernels per instruction set]
// The DP noise kernels are compiled three times, by kernels_generic.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp, each with its own -m flags (CMakeLists.txt); noise.cpp picks one at run time
// from the CPU's features. Everything those files include (philox.h, chacha20.h, gaussian.h,
// kernels_impl.h) lives in the inline namespace FTL_DP_ISA, which each of them sets to its own name
// before any include: the three copies of every inline function then have different symbols, so
// the linker can never hand the generic code an AVX-512 copy (the classic ODR trap of compiling one
// header with several -m flags). For the same reason these files include no torch header.
// All three give the same bits for the same counter (-ffp-contract=off, the same lane count).
#ifndef FTL_DP_ISA
#define FTL_DP_ISA generic
#endif
