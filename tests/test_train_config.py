"""Tests for topojax/train/config.py: configuration files and loss names."""

import json

import pytest

from topojax import train

import train_fixtures  # tests/ is on sys.path under pytest

CONFIG = train_fixtures.CONFIG
ROOT = train_fixtures.ROOT


def test_load_config_round_trip(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(CONFIG.to_json()))
  assert train.load_config(path) == CONFIG


@pytest.mark.parametrize("change, match", [
    ({"phase1": {"loss": "dice", "epochs": 1, "learning_rate": 1e-3,
                 "momentum": 0.9}}, r"unknown keys \['phase1.momentum'\]"),
    ({"lr": 1e-3}, r"unknown keys \['lr'\]"),
    ({"shape": [16, 16, 12], "depth": 4}, "multiple of 2"),
    ({"kernel_sizes": [4, 20]}, "must be positive, non-empty and fit"),
    ({"phase2": {"loss": "tversky", "epochs": 1, "learning_rate": 1e-3}},
     "loss must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
])
def test_load_config_rejects_bad_files(tmp_path, change, match):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**CONFIG.to_json(), **change}))
  with pytest.raises(ValueError, match=match):
    train.load_config(path)


def test_load_config_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file"):
    train.load_config(tmp_path / "nope.json")


# DESIGN.md §3 and the paper's §3.1.
PAPER_SHAPES = {"spleen": (160, 160, 128), "heart": (160, 160, 128),
                "hippocampus": (64, 64, 48)}


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_paper_configs_hold_the_papers_values(name):
  config = train.load_config(ROOT / "experiments" / "configs" / f"{name}.json")
  assert config.shape == PAPER_SHAPES[name]
  assert (config.phase1.loss, config.phase1.epochs,
          config.phase1.learning_rate) == ("dice", 150, 1e-3)
  assert (config.phase2.loss, config.phase2.epochs,
          config.phase2.learning_rate) == ("ppl", 150, 1e-4)
  assert config.dice_weight == 1.0
  assert config.kernel_sizes == (4, 5, 8, 10, 20)


def test_synthetic_config_loads():
  config = train.load_config(ROOT / "experiments" / "configs" /
                             "synthetic.json")
  assert config.phase1.loss == "dice" and config.phase2.loss == "ppl"


def test_configs_with_the_older_loss_name_still_load(tmp_path):
  path = tmp_path / "config.json"
  spec = CONFIG.to_json()
  spec["phase2"]["loss"] = "topo_dice"
  path.write_text(json.dumps({**spec, "normalize": True}))
  config = train.load_config(path)
  assert train.resolve_loss(config.phase2.loss,
                            normalize=config.normalize) == "ppl_norm"


# nnU-Net's protocol: patches of cases in their own shapes.
PATCHES = {**CONFIG.to_json(), "shape": None, "patch_size": [16, 16, 8],
           "spacing": [1.0, 1.0, 2.5]}


def test_a_patch_config_round_trips_with_a_null_shape(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(PATCHES))
  config = train.load_config(path)
  assert config.shape is None and config.patch_size == (16, 16, 8)
  assert config.spacing == (1.0, 1.0, 2.5)
  assert config.preprocess_config().spacing == (1.0, 1.0, 2.5)
  assert config.foreground_fraction == pytest.approx(1 / 3)


def test_the_validation_overlap_round_trips_and_defaults_to_none(tmp_path):
  path = tmp_path / "config.json"
  spec = {**PATCHES, "overlap": 0.25, "validation_overlap": 0.0}
  path.write_text(json.dumps(spec))
  config = train.load_config(path)
  assert (config.overlap, config.validation_overlap) == (0.25, 0.0)
  path.write_text(json.dumps(config.to_json()))
  assert train.load_config(path) == config
  # A config written before the field loads with None: overlap's.
  older = {k: v for k, v in spec.items() if k != "validation_overlap"}
  path.write_text(json.dumps(older))
  assert train.load_config(path).validation_overlap is None


@pytest.mark.parametrize("change, match", [
    ({"patch_size": None}, "shape may be null only with a patch_size"),
    ({"patch_size": [16, 16, 9]}, "patch_size: .*multiple of 2"),
    ({"patch_size": [16, 16]}, "patch_size"),
    ({"patch_size": [16, 0, 8]}, "patch_size"),
    ({"shape": [16, 16, 16], "spacing": None, "patch_size": [32, 16, 16]},
     r"patch_size \(32, 16, 16\) is larger than the shape"),
    ({"spacing": [1.0, 0.0, 2.5]}, "spacing must be three positive"),
    ({"spacing": [1.0, -1.0, 2.5]}, "spacing must be three positive"),
    ({"spacing": [1.0, 1.0]}, "spacing must be three positive"),
    ({"shape": [16, 16, 16]}, "shape .* and spacing .* both set the grid"),
    ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
    ({"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
    ({"validation_overlap": 1.0},
     r": validation_overlap must be in \[0, 1\)"),
    ({"validation_overlap": -0.5},
     r": validation_overlap must be in \[0, 1\)"),
    ({"foreground_fraction": 1.5}, r"foreground_fraction must be in"),
    ({"patches_per_case": 0}, "patches_per_case must be a positive int"),
    ({"kernel_sizes": [2, 12]}, "fit in every projected plane"),
])
def test_bad_patch_settings_name_themselves(tmp_path, change, match):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**PATCHES, **change}))
  with pytest.raises(ValueError, match=match):
    train.load_config(path)
