// The DP noise kernels for AVX2 (NOTE [Kernels per instruction set] in isa.h): built with
// its -m flags on x86-64 only; noise.cpp calls them only on a CPU that has the features.
#include "dp/kernels.h"

#if defined(__AVX2__)
#define FTL_DP_ISA avx2
#include "dp/kernels_impl.h"

namespace ftl::dp {
namespace {
const NoiseKernels kTable = FTL_DP_KERNEL_TABLE;
}  // namespace
const NoiseKernels* const kAvx2Kernels = &kTable;
}  // namespace ftl::dp
#else
namespace ftl::dp {
const NoiseKernels* const kAvx2Kernels = nullptr;
}  // namespace ftl::dp
#endif
