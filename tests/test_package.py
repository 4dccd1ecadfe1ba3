"""Tests for topojax/__init__.py: the public names and their lazy imports."""

import subprocess
import sys

import pytest

import topojax


@pytest.mark.parametrize("name", topojax.__all__)
def test_every_public_name_resolves(name):
  value = getattr(topojax, name)
  assert getattr(value, "__name__", name) == name or not callable(value)


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_thing"):
    topojax.no_such_thing  # noqa: B018


@pytest.mark.parametrize("module", ["topojax.data", "topojax.metrics",
                                    "topojax.evaluate", "topojax.synthetic"])
def test_numpy_only_modules_do_not_load_jax(module):
  # DESIGN §2: data and evaluation never need JAX; the package's re-exports
  # must not drag it in either.
  code = f"import sys, {module}; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "False"
