# find_package(FunctorchLite): build a torch extension whose operators get batching rules written
# in C++ (docs/extending_cpp.md). Defines the imported target functorch_lite::rules: the public
# headers (#include <functorch_lite/rules.h>) and the functorch_lite._C module of this package,
# which exports the core those headers call into (NOTE [One copy of the core] in
# include/functorch_lite/core/export.h: there must be one copy of it in a process, so extensions
# link it rather than compile it).
#
#   find_package(Torch REQUIRED)
#   find_package(FunctorchLite REQUIRED)
#   target_link_libraries(myext PRIVATE functorch_lite::rules)
#
# with CMAKE_PREFIX_PATH from
#   python -c "import torch.utils, functorch_lite as ft; print(torch.utils.cmake_prefix_path + ';' + ft.cmake_prefix_path)"
#
# Sets FunctorchLite_INCLUDE_DIRS, FunctorchLite_LIBRARY (the _C module; set it yourself to choose
# one when several Python versions' builds sit in the package) and FunctorchLite_VERSION.
include(CMakeFindDependencyMacro)
if(NOT TARGET torch)
  find_dependency(Torch)
endif()

get_filename_component(_ftl_root "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

file(STRINGS "${_ftl_root}/version.py" _ftl_version REGEX "^__version__")
string(REGEX REPLACE "^__version__ *= *\"([^\"]*)\".*" "\\1" FunctorchLite_VERSION "${_ftl_version}")

if(NOT FunctorchLite_LIBRARY)
  file(GLOB _ftl_candidates "${_ftl_root}/_C*.so")
  if(Python3_SOABI)
    list(FILTER _ftl_candidates INCLUDE REGEX "\\.${Python3_SOABI}\\.so$")
  elseif(Python_SOABI)
    list(FILTER _ftl_candidates INCLUDE REGEX "\\.${Python_SOABI}\\.so$")
  endif()
  list(LENGTH _ftl_candidates _ftl_n)
  if(_ftl_n EQUAL 0)
    set(${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
    set(${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE
        "no functorch_lite/_C*.so in ${_ftl_root}: functorch_lite is not built there")
    return()
  elseif(NOT _ftl_n EQUAL 1)
    set(${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
    set(${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE
        "several functorch_lite/_C*.so in ${_ftl_root} (${_ftl_candidates}): set FunctorchLite_LIBRARY "
        "to the one of the Python you will load the extension into (python -c 'import functorch_lite; "
        "print(functorch_lite.library_path())')")
    return()
  endif()
  set(FunctorchLite_LIBRARY "${_ftl_candidates}")
endif()
set(FunctorchLite_INCLUDE_DIRS "${_ftl_root}/include")

if(NOT TARGET functorch_lite::rules)
  get_filename_component(_ftl_soname "${FunctorchLite_LIBRARY}" NAME)
  add_library(functorch_lite::rules SHARED IMPORTED)
  set_target_properties(functorch_lite::rules PROPERTIES
    IMPORTED_LOCATION "${FunctorchLite_LIBRARY}"
    IMPORTED_SONAME "${_ftl_soname}"
    INTERFACE_INCLUDE_DIRECTORIES "${FunctorchLite_INCLUDE_DIRS}"
    INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}"
    INTERFACE_COMPILE_FEATURES cxx_std_20)
endif()
