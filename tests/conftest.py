"""Shared test fixtures: JAX backends, the published reference values."""

import json
import pathlib

import jax
import numpy as np
import pytest

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
