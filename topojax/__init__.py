"""topojax: topology-aware 3D medical image segmentation in JAX/Flax.

Built around the Projected Pooling Loss of Fu et al., SPIE Medical Imaging
2023, beside clDice, the persistent-homology losses of Hu et al. and of
Betti matching, Skeleton Recall and cbDice, on the same conventions.
Arrays are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.

The public names below are imported on first use (PEP 562), so that the
NumPy-only parts (data, metrics, evaluation) load without JAX.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "topojax.losses": (
        "DEFAULT_KERNEL_SIZES", "TargetFeatures", "cldice_loss", "dice_loss",
        "hutopo_loss", "max_pool_2d", "pooled_target_features", "project",
        "projected_pooling_loss", "soft_skeleton", "topo_dice_loss",
        "skeleton_recall_loss", "tubed_skeleton", "betti_matching_loss",
        "cbdice_loss", "with_dice_loss"),
    "topojax.metrics": (
        "betti_numbers", "case_metrics", "cldice", "component_errors",
        "connected_component_error_2d",
        "connected_component_error_3d", "dice", "euler_characteristic",
        "hausdorff_distance_95", "pearson_r", "precision", "recall",
        "volume_error_rate"),
    "topojax.data": (
        "PAPER_TASKS", "CaseMeta", "Dataset", "PreprocessConfig", "Split",
        "TaskProtocol", "default_split", "iterate_batches", "load_case",
        "load_dataset", "make_split", "preprocess_image", "read_task",
        "write_prediction"),
    "topojax.skeleton": ("skeletonize", "skeletonize_batch"),
    "topojax.synthetic": ("SynthConfig", "generate_task"),
    "topojax.unet": ("UNet", "count_parameters", "probabilities"),
    "topojax.train": (
        "PhaseConfig", "PhaseResult", "TrainConfig", "load_config",
        "train_phase"),
    "topojax.predict": ("Segmenter", "predict_images", "predict_run"),
    "topojax.windows": ("sliding_window",),
    "topojax.postprocess": ("keep_largest_components",),
    "topojax.evaluate": (
        "evaluate_cases", "evaluate_runs", "markdown_table", "write_report"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items()
              for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
  if name not in _MODULE_OF:
    raise AttributeError(f"module 'topojax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_MODULE_OF[name]), name)
  globals()[name] = value  # Later lookups skip __getattr__.
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
