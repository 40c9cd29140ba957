"""Build functorch_lite._C against the torch that is already installed.

There is exactly one build: CMakeLists.txt. This file only drives it (configure once, then ninja
for incremental rebuilds) and copies the extension module into place, so `pip install
--no-build-isolation [-e] .` and a plain `cmake` build can never drift apart.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    ns = {}
    with open(os.path.join(ROOT, "functorch_lite", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(
                "functorch_lite builds against an installed torch: `pip install torch` first, "
                "then `pip install --no-build-isolation .`"
            )
        import torch.utils

        build_dir = os.environ.get("FUNCTORCH_LITE_BUILD_DIR", os.path.join(ROOT, "build", "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        build_type = os.environ.get("FUNCTORCH_LITE_BUILD_TYPE", "Release")
        cmake = shutil.which("cmake") or sys.exit("cmake not found: `pip install cmake ninja`")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if not os.path.exists(cache):
            cfg = [
                cmake,
                ROOT,
                *generator,
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DCMAKE_BUILD_TYPE={build_type}",
            ]
            subprocess.check_call(cfg, cwd=build_dir)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(
            [cmake, "--build", ".", "--target", "functorch_lite_C", "-j", jobs], cwd=build_dir
        )
        built = os.path.join(build_dir, "functorch_lite", os.path.basename(self.get_ext_filename(ext.name)))
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built, dest)


setup(
    name="functorch_lite",
    version=_version(),
    description="JAX-like composable function transforms for PyTorch, as a C++ extension",
    packages=["functorch_lite", "functorch_lite.dp"],
    # The public C++ headers and the CMake package for extensions with their own batching rules
    # (docs/extending_cpp.md). In a checkout the headers are symlinks into csrc/; wheels get copies.
    package_data={
        "functorch_lite": [
            "include/functorch_lite/*.h",
            "include/functorch_lite/core/*.h",
            "include/functorch_lite/vmap/*.h",
            "share/cmake/FunctorchLite/*.cmake",
        ]
    },
    ext_modules=[CMakeExtension("functorch_lite._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        # privacy accounting for functorch_lite.dp (imported lazily: ft.dp works without it)
        "dp": ["dp-accounting>=0.4"],
        # the main job, examples/demo.py
        "demo": ["dp-accounting>=0.4", "scikit-learn", "tqdm", "matplotlib"],
        # development: tests (hypothesis for the fuzzer, Opacus as an oracle and a benchmark
        # contender, transformers for GPT-2-style layers in the DP tests, matplotlib for the
        # benchmark charts) and the formatters that
        # scripts/format.sh applies and scripts/lint.sh checks (pinned)
        "dev": [
            "pytest",
            "expecttest",
            "hypothesis",
            "opacus==1.6.0",
            "transformers==4.57.1",
            "matplotlib",
            "ruff==0.17.6",
            "clang-format==23.1.5",
        ],
        # the docs site, `bash scripts/docs.sh` (Sphinx 9.0 needs Python >= 3.11); the tutorials
        # it executes use matplotlib, scikit-learn's digits, dp-accounting and transformers
        "docs": [
            "sphinx==9.0.4",
            "furo==2025.12.19",
            "myst-parser==5.2.0",
            "sphinx-gallery==0.22.1",
            "matplotlib",
            "scikit-learn",
            "dp-accounting>=0.4",
            # the GPT-2 fine-tuning tutorial (t8) builds its model from a config (no download)
            "transformers==4.57.1",
        ],
    },
    zip_safe=False,
)
