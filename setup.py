"""Build of xmcnas_fast._C, the compiled core.

C++ kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. CUDA kernels
(csrc/cuda/*.cu) are added when the torch we build against is a CUDA build and
nvcc is found, or when FORCE_CUDA=1; XMCNAS_NO_CUDA=1 leaves them out.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even if detection says no
  XMCNAS_NO_CUDA=1        never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    GPU targets (default "8.0;9.0" when no GPU is visible)
  CUDA_HOME               CUDA toolkit root (found from nvcc when unset)
  XMCNAS_DEBUG=1          -O0 -g instead of -O3
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import json
import os
import re
import shutil

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel


def _toolkit_root(nvcc):
    """The CUDA toolkit folder behind an nvcc, following wrapper scripts and links."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it calls
            for path in re.findall(rb"(/[\w./+-]+)/bin/nvcc\b", head):
                candidates.insert(0, os.path.realpath(path.decode()))
    except OSError:
        pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(root, "lib*", "libcudart.so*")) or glob.glob(
            os.path.join(root, "targets", "*", "lib", "libcudart.so*"))
        if has_nvcc and has_cudart:
            return root
    return None


def _configure_cuda_env():
    """Set CUDA_HOME and TORCH_CUDA_ARCH_LIST before torch.utils.cpp_extension reads them."""
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        nvcc = shutil.which("nvcc")
        root = _toolkit_root(nvcc) if nvcc else None
        if root:
            os.environ["CUDA_HOME"] = root
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


_configure_cuda_env()

import torch  # noqa: E402  (after the environment is set)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    if os.environ.get("XMCNAS_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True
    return bool(torch.version.cuda) and CUDA_HOME is not None


def _extension():
    debug = os.environ.get("XMCNAS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-fopenmp", "-fvisibility=hidden", "-Wno-unused-parameter"]
    if os.environ.get("XMCNAS_NATIVE", "0") == "1":
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="xmcnas_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if _want_cuda():
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr", "-lineinfo",
                      "-DXMCNAS_WITH_CUDA"]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DXMCNAS_WITH_CUDA"], "nvcc": nvcc}
        return CUDAExtension(**kwargs), True
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return CppExtension(**kwargs), False


class BuildWithInfo(BuildExtension):
    """Builds the extension and records, beside it, the torch it was built against.

    xmcnas_fast.ops reads _build_info.json before loading _C and refuses an
    extension built for another torch (whose symbols would not match).
    """

    def run(self):
        super().run()
        for ext in self.extensions:
            out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            info = {"torch": torch.__version__, "cuda": WITH_CUDA,
                    "torch_cuda": torch.version.cuda,
                    "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None}
            os.makedirs(out_dir, exist_ok=True)
            tmp = os.path.join(out_dir, "_build_info.json.tmp")
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, os.path.join(out_dir, "_build_info.json"))


class WheelLeavingNoBuildDir(bdist_wheel):
    """`pip install .` builds its wheel under the source tree's build/ (tens of MB of objects):
    removed once the wheel is written, unless it was there before (a development build's, kept for
    incremental rebuilds)."""

    def run(self):
        build_base = os.path.abspath(self.get_finalized_command("build").build_base)
        existed = os.path.exists(build_base)
        try:
            super().run()
        finally:
            if not existed:
                shutil.rmtree(build_base, ignore_errors=True)


EXTENSION, WITH_CUDA = _extension()

setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True), "bdist_wheel": WheelLeavingNoBuildDir},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
