"""The optional C kernel: one pass over each float32 activation instead of five or six (see
modelcheck/kernel.py). Everything else about the package is in pyproject.toml.

Without a C compiler the install goes on and the statistics use PyTorch's operations. A
compiler without OpenMP (Apple's clang, for one) builds the kernel single-threaded.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError

OPENMP = "-fopenmp"

KERNEL = Extension(
    "modelcheck._kernel",
    sources=["modelcheck/_kernel.c"],
    extra_compile_args=["-O3", OPENMP],
    extra_link_args=[OPENMP],
    optional=True,
)


class BuildKernel(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except CCompilerError:  # compiling or linking failed
            if OPENMP not in ext.extra_compile_args:
                raise
            print(f"modelcheck: building {ext.name} without OpenMP: one thread per reduction")
            flags = ext.extra_compile_args
            ext.extra_compile_args = ["-fopenmp-simd" if f == OPENMP else f for f in flags]
            ext.extra_link_args = [f for f in ext.extra_link_args if f != OPENMP]
            super().build_extension(ext)


setup(ext_modules=[KERNEL], cmdclass={"build_ext": BuildKernel})
