#pragma once
// NOTE [One copy of the core]
// The level stack is a thread-local singleton behind levelStack(), and our wrappers are recognised
// by their dispatch key and level id: a second copy of the core in one process (a user extension
// that compiled our sources, or linked a static copy) would keep its own stack, see no levels, and
// hand batched tensors to kernels as if they were plain. There is therefore exactly one copy, in
// functorch_lite._C. The core is built with hidden visibility; the few functions that the inline
// and template code of the public headers (functorch_lite/rules.h) calls are marked FTL_API and
// exported from _C, and user extensions link against _C (the CMake target functorch_lite::rules).
#include <c10/macros/Export.h>

#define FTL_API C10_EXPORT
