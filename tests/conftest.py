"""Shared test fixtures: JAX backends, the published reference values."""

import atexit
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

# One persistent XLA cache for the session, set before anything compiles:
# several modules train the same tiny network, and a step compiled in one is
# then read back in the next (after test_train clears its in-memory caches to
# count compilations) instead of compiled again.
_XLA_CACHE = tempfile.mkdtemp(prefix="topojax-test-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


def _has_backend(name: str) -> bool:
  try:
    return bool(jax.devices(name))
  except RuntimeError:
    return False


@pytest.fixture(params=["cpu", "gpu", "tpu"])
def backend(request):
  """Each JAX backend; those this machine lacks are skipped, saying so."""
  if not _has_backend(request.param):
    pytest.skip(f"no {request.param} backend on this machine "
                f"(jax.devices(): {jax.devices()})")
  return request.param


@pytest.fixture(scope="session")
def reference_ppl():
  """Inputs, loss and gradient of the published implementation, by case."""
  path = FIXTURES / "reference_ppl.npz"
  if not path.exists():
    pytest.skip(f"published reference values not found at {path}: they live "
                "in the developers' ../shared folder, not in a user's clone")
  arrays = np.load(path)
  meta = json.loads((FIXTURES / "reference_ppl.json").read_text())
  return {case: {"meta": m, **{key: arrays[f"{case}__{key}"]
                               for key in ("pred", "target", "loss", "grad")}}
          for case, m in meta.items()}
