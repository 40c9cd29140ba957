// The DP noise kernels for AVX512 (NOTE [Kernels per instruction set] in isa.h): built with
// its -m flags on x86-64 only; noise.cpp calls them only on a CPU that has the features.
#include "dp/kernels.h"

#if defined(__AVX512F__)
#define FTL_DP_ISA avx512
#include "dp/kernels_impl.h"

namespace ftl::dp {
namespace {
const NoiseKernels kTable = FTL_DP_KERNEL_TABLE;
}  // namespace
const NoiseKernels* const kAvx512Kernels = &kTable;
}  // namespace ftl::dp
#else
namespace ftl::dp {
const NoiseKernels* const kAvx512Kernels = nullptr;
}  // namespace ftl::dp
#endif
