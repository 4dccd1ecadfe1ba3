"""Topology losses for segmentation, in JAX, on one set of conventions.

One module per loss, each readable top to bottom:

* :mod:`~topojax.losses.projected_pooling`: the Projected Pooling Loss of
  Fu et al. (SPIE MI 2023), max projections and multi-scale max pooling;
* :mod:`~topojax.losses.cldice`: clDice of Shit et al. (CVPR 2021), soft
  skeletons;
* :mod:`~topojax.losses.persistent_homology`: the loss of Hu et al.
  (NeurIPS 2019), persistence diagrams matched on the host;
* :mod:`~topojax.losses.betti_matching`: the Betti matching loss of
  Stucki et al. (ICML 2023; 3D 2024), barcodes matched through the
  comparison image by topojax's compiled host kernel;
* :mod:`~topojax.losses.skeleton_recall`: Skeleton Recall of Kirchhoff et
  al. (ECCV 2024), soft recall on a tubed label skeleton made on the host;
* :mod:`~topojax.losses.cbdice`: cbDice of Shi et al. (MICCAI 2024), clDice
  with each skeleton voxel weighted by the vessel's radius there (distance
  transforms on the host);
* :mod:`~topojax.losses.dice`: the Dice loss and ``L_topo + λ·L_dice`` for
  any of them.

All take probabilities and a label of the same channels-last shape, 3D
``(N, X, Y, Z, C)`` or 2D ``(N, X, Y, C)``; skip channel 0 (the background)
when ``C > 1`` unless told otherwise (``start_channel``); return a scalar
averaged over samples and channels; and check their arguments before
tracing, raising a ``ValueError`` that names the argument.
"""

from topojax.losses.betti_matching import betti_matching_loss
from topojax.losses.cbdice import cbdice_loss
from topojax.losses.cldice import cldice_loss
from topojax.losses.cldice import soft_skeleton
from topojax.losses.dice import dice_loss
from topojax.losses.dice import probabilities
from topojax.losses.dice import with_dice_loss
from topojax.losses.persistent_homology import hutopo_loss
from topojax.losses.projected_pooling import DEFAULT_KERNEL_SIZES
from topojax.losses.projected_pooling import PLANES
from topojax.losses.projected_pooling import TargetFeatures
from topojax.losses.projected_pooling import max_pool_2d
from topojax.losses.projected_pooling import pooled_target_features
from topojax.losses.projected_pooling import project
from topojax.losses.projected_pooling import projected_pooling_loss
from topojax.losses.projected_pooling import topo_dice_loss
from topojax.losses.skeleton_recall import skeleton_recall_loss
from topojax.losses.skeleton_recall import tubed_skeleton

__all__ = (
    "DEFAULT_KERNEL_SIZES", "PLANES", "TargetFeatures", "cldice_loss",
    "dice_loss", "hutopo_loss", "max_pool_2d", "pooled_target_features",
    "probabilities", "project", "projected_pooling_loss", "soft_skeleton",
    "topo_dice_loss", "with_dice_loss",
    "skeleton_recall_loss", "tubed_skeleton", "betti_matching_loss",
    "cbdice_loss",
)
