"""Where functorch_lite's C++ API lives, for extensions that write batching rules for their own
operators in C++ (docs/extending_cpp.md).

    cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils, functorch_lite as ft;
        print(torch.utils.cmake_prefix_path + ";" + ft.cmake_prefix_path)')" ...

or, with torch.utils.cpp_extension: extra_include_paths=[ft.get_include()],
extra_ldflags=[ft.library_path(), "-Wl,-rpath," + os.path.dirname(ft.library_path())].
"""

import os

from ._load import _C

_ROOT = os.path.dirname(os.path.abspath(__file__))

#: The directory to add to CMAKE_PREFIX_PATH for find_package(FunctorchLite) (the target
#: functorch_lite::rules), like torch.utils.cmake_prefix_path for find_package(Torch).
cmake_prefix_path = os.path.join(_ROOT, "share", "cmake")


def get_include():
    """The include directory of the public C++ headers (#include <functorch_lite/rules.h>)."""
    return os.path.join(_ROOT, "include")


def library_path():
    """The shared library an extension links to use those headers: the loaded functorch_lite._C
    (NOTE [One copy of the core] in functorch_lite/core/export.h says why it is not a copy)."""
    return os.path.abspath(_C.__file__)
