"""Builds topojax's optional native part: oneDNN convolutions (topojax/conv.py).

Everything else is in pyproject.toml. The build needs a C++17 compiler and the
``onednn-devel-cpu-gomp`` and ``jax`` wheels (build requirements); where it
fails, the install goes on without it and topojax uses XLA's convolutions.
"""

import importlib.metadata
import pathlib
import platform
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext


def _onednn_dirs() -> tuple[str, str]:
  """oneDNN's include and library directories, where pip put the wheels."""
  headers = importlib.metadata.distribution("onednn-devel-cpu-gomp")
  library = importlib.metadata.distribution("onednn-cpu-gomp")
  header = next(f for f in headers.files
                if f.as_posix().endswith("include/oneapi/dnnl/dnnl.hpp"))
  shared = next(f for f in library.files if f.name == "libdnnl.so.3")
  include = pathlib.Path(headers.locate_file(header)).resolve().parents[2]
  return str(include), str(pathlib.Path(library.locate_file(shared)).parent)


class OptionalBuildExt(build_ext):
  """``build_ext`` that skips, with one line on stderr, what cannot build."""

  def build_extensions(self):
    built = []
    for ext in self.extensions:
      try:
        if sys.platform != "linux" or platform.machine() != "x86_64":
          raise RuntimeError(f"no oneDNN wheel for {sys.platform} "
                             f"{platform.machine()}")
        import jax.ffi  # pylint: disable=import-outside-toplevel
        include, library = _onednn_dirs()
        ext.include_dirs += [include, jax.ffi.include_dir()]
        ext.library_dirs.append(library)
        self.build_extension(ext)
        built.append(ext)
      except Exception as error:  # pylint: disable=broad-except
        # Any failure (no compiler, no wheel, a compile error) leaves
        # topojax on XLA's convolutions rather than failing the install.
        print(f"topojax: the oneDNN convolutions were not built ({error}); "
              "topojax will use XLA's convolutions", file=sys.stderr)
    # What did not build is neither copied in place nor packaged.
    self.extensions = built


setup(
    ext_modules=[Extension(
        "topojax._onednn_conv", sources=["topojax/_onednn_conv.cc"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden",
                            "-fopenmp"],
        # libgomp: the OpenMP runtime that oneDNN's wheel runs on too.
        extra_link_args=["-l:libdnnl.so.3", "-fopenmp"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
