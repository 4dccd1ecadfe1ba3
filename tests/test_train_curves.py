"""Tests for topojax/train/curves.py: a phase's log drawn as a PNG."""

from topojax import train


def test_plot_curves_writes_a_png(tmp_path):
  log = [{"epoch": e, "train_loss": 1 / e, "val_dice": 0.2 * e,
          "val_topo": 10.0 - e} for e in (1, 2, 3)]
  path = train.plot_curves(log, tmp_path / "curves.png", best_epoch=3,
                           title="tiny")
  assert path == tmp_path / "curves.png"
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
