"""Voxel and topology metrics on binary masks (paper, §3.2; Table 2).

Every function takes NumPy masks of one structure, bool or with values in
``{0, 1}``, of shape ``(X, Y, Z)`` (one class of one case; channels do not
appear here), and returns a Python number. Nothing here needs JAX or the model.

Connectivity is full, as in the paper and ``skimage.measure.label``'s default:
26 neighbours in 3D, 8 in a 2D slice. The Betti numbers go one step past the
paper: β0 counts components, β1 tunnels (handles), β2 cavities, so a hole
punched through a structure or a bubble inside it shows up even when the
component count is right.

Empty masks have these answers (``P`` prediction, ``G`` ground truth):

=================  ===========  =================  =================
metric             both empty   P empty, G not     G empty, P not
=================  ===========  =================  =================
Dice               1            0                  0
clDice             1            0                  0
Precision          1            0                  0
Recall             1            0                  0
VER                0            -1                 +inf
95HD               0            +inf               +inf
2D CCE             0            defined            defined
3D CCE, Betti      0            defined            defined
component_errors   0            missed = β0(G)     spurious = β0(P)
=================  ===========  =================  =================

Infinite values are not errors: they say a structure is entirely missed or
entirely invented, and `topojax.evaluate` counts them separately instead of
folding them into a mean.
"""

from __future__ import annotations

from collections.abc import Sequence
import itertools
import math

import numpy as np
from scipy import ndimage
from scipy import spatial
from scipy import stats

from topojax import skeleton


def _as_mask(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype == bool:
    return mask
  if not np.isin(mask, (0, 1)).all():
    found = np.unique(mask[~np.isin(mask, (0, 1))])
    raise ValueError(
        f"{name} must be a binary mask (bool, or values in {{0, 1}}); found "
        f"the values {found[:5].tolist()}")
  return mask.astype(bool)


def _as_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  pred, gt = _as_mask(pred, "pred"), _as_mask(gt, "gt")
  if pred.shape != gt.shape:
    raise ValueError(
        f"pred and gt must have the same shape, got {pred.shape} and "
        f"{gt.shape}")
  return pred, gt


def _require_3d(mask: np.ndarray, name: str) -> None:
  if mask.ndim != 3:
    raise ValueError(
        f"{name} must be a 3D mask (X, Y, Z), got shape {mask.shape}")


def _full_connectivity(ndim: int) -> np.ndarray:
  return ndimage.generate_binary_structure(ndim, ndim)


def _content_box(mask: np.ndarray) -> tuple[slice, ...]:
  """The bounding box of a bool mask's voxels; one voxel for an empty mask."""
  boxes = ndimage.find_objects(mask.view(np.uint8))
  return boxes[0] if boxes else (slice(0, 1),) * mask.ndim


def dice(pred, gt) -> float:
  """Dice coefficient ``2|P∩G| / (|P| + |G|)``; 1 when both masks are empty.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The Dice coefficient in [0, 1].
  """
  pred, gt = _as_pair(pred, gt)
  total = int(pred.sum()) + int(gt.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _share_in(mask: np.ndarray, other: np.ndarray) -> float:
  """``|mask ∩ other| / |mask|``; for an empty mask, 1 if other is empty too."""
  size = int(mask.sum())
  if size == 0:
    return float(not other.any())
  return int(np.logical_and(mask, other).sum()) / size


def precision(pred, gt) -> float:
  """Precision ``|P∩G| / |P|``; for an empty P, 1 if G is empty too, else 0.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The precision in [0, 1].
  """
  return _share_in(*_as_pair(pred, gt))


def recall(pred, gt) -> float:
  """Recall (sensitivity) ``|P∩G| / |G|``; for an empty G, 1 if P is empty too.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The recall in [0, 1].
  """
  pred, gt = _as_pair(pred, gt)
  return _share_in(gt, pred)


def cldice(pred, gt) -> float:
  """Centerline Dice (clDice) of Shit et al., CVPR 2021, on binary masks.

  With ``S(M)`` the skeleton of a mask (:func:`topojax.skeletonize`: Lee's
  thinning in 2D and 3D, one voxel thick, with the mask's Betti numbers;
  the authors' scikit-image thins some parts two voxels thick away
  entirely, such as a 4×4×4 cube, leaving such a component no centre line),
  topology precision ``Tprec = |S(P)∩G| / |S(P)|`` is the share of the
  predicted centre lines inside the label, topology sensitivity
  ``Tsens = |S(G)∩P| / |S(G)|`` the share of the label's centre lines that
  the prediction covers, and clDice their harmonic mean
  ``2·Tprec·Tsens / (Tprec + Tsens)``. A tube predicted thinner than its
  label keeps clDice 1 where Dice drops; a broken tube or a spurious branch
  lowers it in proportion to the skeleton length lost or added.

  Args:
    pred: predicted mask, ``(X, Y)`` or ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    clDice in [0, 1]: 1 when both masks are empty, 0 when exactly one is,
    and 0 when neither skeleton meets the other mask.
  """
  pred, gt = _as_pair(pred, gt)
  if pred.ndim not in (2, 3):
    raise ValueError(
        f"pred and gt must be 2D (X, Y) or 3D (X, Y, Z) masks, got shape "
        f"{pred.shape}")
  if not pred.any() and not gt.any():
    return 1.0
  # An empty mask has an empty skeleton, which _share_in counts as nothing
  # covered (0) since the other mask is not empty.
  t_prec = _share_in(skeleton.skeletonize(pred), gt)
  t_sens = _share_in(skeleton.skeletonize(gt), pred)
  if t_prec + t_sens == 0:
    return 0.0
  return 2.0 * t_prec * t_sens / (t_prec + t_sens)


def volume_error_rate(pred, gt) -> float:
  """Signed volume error rate VER ``(V_P - V_G) / V_G`` (paper, §3.2).

  The voxel size cancels, so no spacing is needed. AVER is its absolute value.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    VER: -1 for an empty prediction; for an empty ground truth 0 if the
    prediction is empty too, else ``+inf``.
  """
  pred, gt = _as_pair(pred, gt)
  v_pred, v_gt = int(pred.sum()), int(gt.sum())
  if v_gt == 0:
    return 0.0 if v_pred == 0 else math.inf
  return (v_pred - v_gt) / v_gt


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
  spacing = tuple(float(s) for s in np.ravel(spacing))
  if len(spacing) != ndim or not all(math.isfinite(s) and s > 0
                                     for s in spacing):
    raise ValueError(
        f"spacing must be {ndim} positive voxel sizes in mm, one per spatial "
        f"axis, got {spacing}")
  return spacing


# A nearest-neighbour query among surface voxels costs about as much as the
# distance transform of this many voxels (measured with scipy 1.17 on a 2-core
# CPU). Segmentations have thin surfaces, so the query usually wins; noise
# that is mostly surface takes the transform, whose cost is fixed by the volume.
_QUERY_COST = 20


def _surface(mask: np.ndarray) -> np.ndarray:
  # The mask minus its erosion by the face-neighbour cross; the array's border
  # erodes too, as the outside is background.
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff_distance_95(pred, gt, *, spacing: Sequence[float]) -> float:
  """95th-percentile symmetric surface distance (95HD) in mm.

  A surface voxel is a mask voxel with a background face neighbour (6 in 3D;
  outside the array is background). Each surface voxel of P is paired with its
  distance to the nearest surface voxel of G, and each surface voxel of G with
  its distance to the nearest surface voxel of P, distances between voxel
  centres in mm. 95HD is the 95th percentile (NumPy's default linear
  interpolation) of the union of the two sets, as medpy's ``hd95`` defines it;
  MONAI takes the larger of the two directed percentiles instead.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.
    spacing: voxel size in mm along each axis, e.g. the NIfTI header's zooms.

  Returns:
    95HD in mm; 0 when both masks are empty, ``+inf`` when exactly one is.
  """
  pred, gt = _as_pair(pred, gt)
  spacing = _check_spacing(spacing, pred.ndim)
  if not pred.any() or not gt.any():
    return 0.0 if pred.any() == gt.any() else math.inf
  surfaces = _surface(pred), _surface(gt)
  # Each direction: from every surface voxel of one mask to the other surface.
  if (surfaces[0].sum() + surfaces[1].sum()) * _QUERY_COST < pred.size:
    points = [np.argwhere(s) * spacing for s in surfaces]
    distances = [spatial.KDTree(to).query(at)[0]
                 for at, to in (points, points[::-1])]
  else:
    distances = [ndimage.distance_transform_edt(~to, sampling=spacing)[at]
                 for at, to in (surfaces, surfaces[::-1])]
  distances = np.concatenate(distances)
  return float(np.percentile(distances, 95))


def count_components(mask) -> int:
  """Number of connected components with full connectivity (26 in 3D).

  Args:
    mask: bool or ``{0, 1}`` mask of any rank, e.g. ``(X, Y, Z)``.

  Returns:
    The component count, 0 for an empty mask.
  """
  mask = _as_mask(mask, "mask")
  return int(ndimage.label(mask, _full_connectivity(mask.ndim))[1])


def connected_component_error_3d(pred, gt) -> int:
  """3D CCE: ``|#components(P) - #components(G)|``, 26-connectivity (§3.2).

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The absolute difference of the component counts.
  """
  pred, gt = _as_pair(pred, gt)
  return abs(count_components(pred) - count_components(gt))


def component_errors(pred, gt) -> tuple[int, int, int]:
  """``(breaks, missed, spurious)``: what |Δβ0| mixes, counted apart.

  Components are 26-connected in 3D (full connectivity, as
  `count_components`). A predicted component *overlaps* a label component
  when they share a voxel.

  * breaks: for each label component that some predicted component
    overlaps, the number of predicted components overlapping it minus one,
    summed over the label components; 0 when every tree is one piece.
  * missed: label components that no predicted component overlaps (a lost
    tree is missed, not broken).
  * spurious: predicted components that overlap no label component.

  A predicted component that bridges two label components counts as one
  piece of each, so it adds no break and is not spurious: a merge makes no
  tree fall apart and invents no structure; it lowers β0(P), so |Δβ0| sees it
  and these counts do not. Without such bridges,
  ``β0(P) − β0(G) = breaks + spurious − missed``; with them the left side
  is smaller.

  Args:
    pred: predicted mask, ``(X, Y, Z)`` (or any rank), bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The three counts as ints; ``(0, 0, 0)`` when ``pred`` equals ``gt``.
  """
  pred, gt = _as_pair(pred, gt)
  box = _content_box(pred | gt)
  connectivity = _full_connectivity(pred.ndim)
  gt_labels, num_gt = ndimage.label(gt[box], connectivity)
  pred_labels, num_pred = ndimage.label(pred[box], connectivity)
  shared = (gt_labels > 0) & (pred_labels > 0)
  # Each overlapping (label component, predicted component) pair once.
  pairs = np.unique(gt_labels[shared].astype(np.int64) * (num_pred + 1)
                    + pred_labels[shared])
  overlapped_gt = pairs // (num_pred + 1)
  overlapped_pred = np.unique(pairs % (num_pred + 1))
  touched_gt = np.unique(overlapped_gt).size
  return (int(pairs.size - touched_gt), int(num_gt - touched_gt),
          int(num_pred - overlapped_pred.size))


def _components_per_slice(mask: np.ndarray) -> np.ndarray:
  """Component count of each slice along the last axis, ``(Z,)``."""
  # Full connectivity within a slice and none across slices: one labelling
  # pass, over the mask's bounding box only, gives every slice's components.
  in_plane = np.zeros((3, 3, 3), bool)
  in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 2)
  box = _content_box(mask)
  labels, _ = ndimage.label(mask[box], in_plane)
  first_slice = [box[2].start + found[2].start
                 for found in ndimage.find_objects(labels)]
  return np.bincount(first_slice, minlength=mask.shape[2])


def connected_component_error_2d(pred, gt) -> float:
  """2D CCE: mean slice-wise component-count error (paper, §3.2).

  The mean of ``|#components(P_z) - #components(G_z)|`` over the slices ``z``
  along the last axis in which P or G is non-empty, 8-connectivity in a slice.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.

  Returns:
    The 2D CCE; 0 when no slice qualifies (both masks empty).
  """
  pred, gt = _as_pair(pred, gt)
  _require_3d(pred, "pred")
  counted = pred.any(axis=(0, 1)) | gt.any(axis=(0, 1))
  if not counted.any():
    return 0.0
  errors = np.abs(_components_per_slice(pred) - _components_per_slice(gt))
  return float(errors[counted].mean())


def euler_characteristic(mask) -> int:
  """Euler characteristic of the union of the foreground voxels' closed cubes.

  Closed cubes touching at a corner or edge belong to one piece, so this is
  the χ that matches 26-connectivity of the foreground (and 6-connectivity of
  the background). It counts the complex's cells, ``χ = V - E + F - C``
  (vertices, edges, faces, cubes), all vectorised.

  Args:
    mask: bool or ``{0, 1}`` mask, ``(X, Y, Z)``.

  Returns:
    χ, which equals ``β0 - β1 + β2``.
  """
  mask = _as_mask(mask, "mask")
  _require_3d(mask, "mask")
  padded = np.pad(mask, 1)
  chi = 0
  # A cell is open (has extent) along some axes and sits on a lattice plane
  # along the others; it belongs to the complex when any voxel around it does,
  # i.e. either of the two voxels beside it along every axis where it is flat.
  for extent in itertools.product((False, True), repeat=3):
    cells = padded
    for axis, has_extent in enumerate(extent):
      if not has_extent:
        upper = [slice(None)] * 3
        lower = [slice(None)] * 3
        upper[axis], lower[axis] = slice(1, None), slice(None, -1)
        cells = cells[tuple(upper)] | cells[tuple(lower)]
    chi += (-1) ** sum(extent) * int(cells.sum())
  return chi


def betti_numbers(mask) -> tuple[int, int, int]:
  """Betti numbers ``(β0, β1, β2)`` of a 3D mask: components, tunnels, cavities.

  β0 counts 26-connected foreground components; β2 counts the background's
  6-connected components that do not reach the outside of the volume (the
  volume is padded with background so the outside is one component); β1
  follows from the Euler characteristic, ``β1 = β0 + β2 - χ``. A solid ball is
  (1, 0, 0), a torus (1, 1, 0), a hollow sphere (1, 0, 1).

  Args:
    mask: bool or ``{0, 1}`` mask, ``(X, Y, Z)``.

  Returns:
    ``(β0, β1, β2)`` as ints.
  """
  mask = _as_mask(mask, "mask")
  _require_3d(mask, "mask")
  # Topology ignores the empty margin; without it the labellings below run
  # on a fraction of the volume.
  mask = mask[_content_box(mask)]
  b0 = count_components(mask)
  face_connectivity = ndimage.generate_binary_structure(3, 1)
  outside_and_cavities = ndimage.label(
      np.pad(~mask, 1, constant_values=True), face_connectivity)[1]
  b2 = outside_and_cavities - 1
  return b0, b0 + b2 - euler_characteristic(mask), b2


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson's correlation coefficient, e.g. of volumes across cases (§3.2).

  Args:
    x: one value per case, e.g. predicted volumes, shape ``(n,)``.
    y: the matching values, e.g. ground-truth volumes, shape ``(n,)``.

  Returns:
    r in [-1, 1], or NaN when it is undefined: fewer than two cases, or a
    constant ``x`` or ``y``.
  """
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(
        f"x and y must be 1D with one value per case, got shapes {x.shape} "
        f"and {y.shape}")
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return math.nan
  return float(stats.pearsonr(x, y).statistic)


def case_metrics(pred, gt, *, spacing: Sequence[float]) -> dict[str, float]:
  """Every per-case metric of Table 2 plus the Betti-number errors.

  Both masks are cropped to the bounding box of their union first: no metric
  depends on the empty margin, and the distance transforms and labellings then
  run on a fraction of the volume.

  Args:
    pred: predicted mask, ``(X, Y, Z)``, bool or ``{0, 1}``.
    gt: ground-truth mask of the same shape.
    spacing: voxel size in mm along X, Y, Z.

  Returns:
    A dict with ``dice``, ``cldice`` (`cldice`), ``hd95_mm``, ``precision``,
    ``recall``, ``ver``, ``aver``, ``cce_2d``, ``cce_3d``, ``betti0_error``,
    ``betti1_error``, ``betti2_error`` (absolute differences of β0, β1, β2;
    ``betti0_error`` equals ``cce_3d`` by definition), ``breaks``,
    ``missed``, ``spurious`` (`component_errors`) and the volumes
    ``volume_pred_mm3``, ``volume_gt_mm3`` that Pearson's r is taken over.
  """
  pred, gt = _as_pair(pred, gt)
  _require_3d(pred, "pred")
  spacing = _check_spacing(spacing, 3)
  voxel_mm3 = math.prod(spacing)
  volumes = float(pred.sum()) * voxel_mm3, float(gt.sum()) * voxel_mm3
  box = _content_box(pred | gt)
  pred, gt = pred[box], gt[box]
  ver = volume_error_rate(pred, gt)
  betti_errors = [abs(p - g) for p, g in zip(betti_numbers(pred),
                                              betti_numbers(gt))]
  breaks, missed, spurious = component_errors(pred, gt)
  return {
      "dice": dice(pred, gt),
      "cldice": cldice(pred, gt),
      "hd95_mm": hausdorff_distance_95(pred, gt, spacing=spacing),
      "precision": precision(pred, gt),
      "recall": recall(pred, gt),
      "ver": ver,
      "aver": abs(ver),
      "cce_2d": connected_component_error_2d(pred, gt),
      "cce_3d": betti_errors[0],
      "betti0_error": betti_errors[0],
      "betti1_error": betti_errors[1],
      "betti2_error": betti_errors[2],
      "breaks": breaks,
      "missed": missed,
      "spurious": spurious,
      "volume_pred_mm3": volumes[0],
      "volume_gt_mm3": volumes[1],
  }
