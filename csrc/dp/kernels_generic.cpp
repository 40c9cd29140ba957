// The portable DP noise kernels (NOTE [Kernels per instruction set] in isa.h).
#define FTL_DP_ISA generic
#include "dp/kernels_impl.h"

namespace ftl::dp {
const NoiseKernels kGenericKernels = FTL_DP_KERNEL_TABLE;
}  // namespace ftl::dp
