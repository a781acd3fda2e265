"""Build kvkernels, with the CUDA extension ``kvkernels._C`` when nvcc is available.

The extension is built by CMake (CMakeLists.txt) + ninja:

* ``KVKERNELS_BUILD_CUDA=0``: never build it (pure-Python package: torch and Triton backends).
* ``KVKERNELS_BUILD_CUDA=1``: build it; a missing nvcc or a failed build is an error.
* unset (auto): build it when ``nvcc`` is found (PATH or $CUDA_HOME/bin); a failed build is an
  error (CI relies on this compile check); without nvcc, install the pure-Python package.

The CPU entropy coder ``kvkernels._codec_cpu`` (g++ only) is built in every mode unless
``KVKERNELS_BUILD_CODEC_CPU=0`` (optional: a failed build leaves the reference coders).

``MAX_JOBS`` caps the parallel compile jobs; ``KVK_CUDA_ARCHS`` (e.g. ``90-real``) overrides the
default architectures "80-real;90-real;90-virtual".

    pip install -e . --no-build-isolation
    python setup.py build_ext --inplace
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_plan():
    """(nvcc path or None, reason for not building or None)."""
    mode = os.environ.get("KVKERNELS_BUILD_CUDA", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return None, "KVKERNELS_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if nvcc is None:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError("kvkernels: KVKERNELS_BUILD_CUDA=1 but nvcc was not found (PATH, $CUDA_HOME/bin)")
        return None, "nvcc not found"
    return nvcc, None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt so that the module lands where setuptools expects it."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cfg = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
               f"-DPython_EXECUTABLE={sys.executable}", f"-DKVK_OUTPUT_DIR={out_dir}",
               f"-DCMAKE_CUDA_COMPILER={NVCC}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            cfg += ["-G", "Ninja"]
        archs = os.environ.get("KVK_CUDA_ARCHS")
        if archs:
            cfg.append(f"-DKVK_CUDA_ARCHS={archs}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        build = ["cmake", "--build", build_dir, "-j", jobs]
        for cmd in (cfg, build):
            print("kvkernels:", " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise RuntimeError(f"kvkernels: building the CUDA extension failed ({e}); "
                                   "set KVKERNELS_BUILD_CUDA=0 to install without it") from e


def _codec_cpu_ext():
    """kvkernels._codec_cpu: the CPU entropy coders, g++ only (built with or without nvcc);
    optional: a failed build leaves the pure-Python reference coders in charge."""
    if os.environ.get("KVKERNELS_BUILD_CODEC_CPU", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    try:
        import pybind11
    except ImportError:
        print("kvkernels: pybind11 not found, building without kvkernels._codec_cpu", flush=True)
        return []
    return [Extension("kvkernels._codec_cpu", sources=["csrc/codec_cpu.cpp", "python/codec_cpu.cpp"],
                      include_dirs=[pybind11.get_include(), "csrc"], language="c++", optional=True,
                      extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off"])]


NVCC, SKIP_REASON = _cuda_plan()
if SKIP_REASON:
    print(f"kvkernels: building without the CUDA extension ({SKIP_REASON})", flush=True)

setup(
    ext_modules=_codec_cpu_ext() + ([] if SKIP_REASON else [CMakeExtension("kvkernels._C")]),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
