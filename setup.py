"""Builds the localgp op library with CMake + Ninja (see CMakeLists.txt).

LOCALGP_CUDA=auto (default) builds the CUDA kernels when torch has CUDA and nvcc is found;
LOCALGP_CUDA=1 requires them and fails if they cannot be built; LOCALGP_CUDA=0 builds CPU only.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def resolve_cuda():
    """Returns the nvcc path when CUDA kernels are to be built, else None."""
    import torch

    wanted = os.environ.get("LOCALGP_CUDA", "auto").lower()
    if wanted not in ("auto", "0", "1"):
        sys.exit(f"LOCALGP_CUDA must be auto, 0 or 1, got {wanted!r}")
    if wanted == "0":
        return None
    nvcc = find_nvcc()
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} was built without CUDA")
    if nvcc is None:
        reasons.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if reasons:
        if wanted == "1":
            sys.exit("LOCALGP_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("localgp: building the CPU library only: " + "; ".join(reasons))
        return None
    return nvcc


def cuda_arch_list():
    """The GPUs present, or Ampere + Hopper when none is visible at build time, with PTX for the
    newest: GPUs after Hopper compile it at load instead of failing with "no kernel image"."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "8.0;9.0+PTX"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed build tree keeps rebuilds incremental (pip's editable builds use a new temp dir).
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = resolve_cuda()
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LOCALGP_BUILD_TYPE', 'Release')}",
            f"-DLOCALGP_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        env = dict(os.environ)
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, *args],
                       check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True, env=env)


setup(ext_modules=[CMakeExtension("localgp._C")], cmdclass={"build_ext": CMakeBuild})
