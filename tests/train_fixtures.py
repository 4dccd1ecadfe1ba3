"""The tiny run shared by the training tests (tests/ is on sys.path).

Only values and helpers: each test file makes its own module-scoped
fixtures from them, so that no training run is repeated across files.
"""

import pathlib

from topojax import synthetic
from topojax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 12 cases: 8 train (2 batches of 4), 2 validation (one padded batch), 2 test.
CONFIG = train.TrainConfig(
    shape=(16, 16, 16), base_channels=4, depth=2, batch_size=4,
    flip_axes=(0,), kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=3, learning_rate=1e-2),
    phase2=train.PhaseConfig(loss="ppl", epochs=2, learning_rate=1e-3))


def make_task(tmp_path_factory):
  """A 12-case synthetic task of 16³ volumes, in a new temporary folder."""
  root = tmp_path_factory.mktemp("data") / "Task00_Tiny"
  synthetic.generate_task(
      root, synthetic.SynthConfig(shape=(16, 16, 16), num_cases=12, seed=0),
      progress=False)
  return root
