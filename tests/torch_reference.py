"""PyTorch references of the published losses, for tests only.

Written for topojax from the published descriptions, not copied; channels-first
like the published code, ``(N, C, X, Y, Z)`` or ``(N, C, X, Y)``, built from
``torch.nn.functional`` max pooling, whose backward sends each window's
gradient to its first maximum:

* the Projected Pooling Loss (Fu et al. 2023), from the design notes (§1);
* clDice (Shit et al. 2021), after the authors' ``soft_skeleton.py`` (2D and
  3D) and ``topolosses``' reduction;
* Hu et al.'s persistent-homology loss (2019) as ``topolosses`` computes it,
  with the diagrams from cripser and the matching from gudhi.
* Skeleton Recall (Kirchhoff et al. 2024) as the authors' nnU-Net code
  computes it: the tubed skeleton of an integer label map, then minus the
  soft recall;
* cbDice (Shi et al. 2024) as the authors' ``SoftcbDiceLoss`` computes it
  (PengchengShi1220/cbDice, ``loss/cbdice_loss.py``: soft skeletons, MONAI's
  distance transform, linear inverse weights), in any float dtype.
"""

import importlib
import importlib.util
import pathlib
import sys
import types

import cripser
from gudhi import wasserstein
import numpy as np
import torch
import torch.nn.functional as F


def projections(volume: torch.Tensor) -> list[torch.Tensor]:
  """Axial (max over Z), sagittal (max over X), coronal (max over Y) planes."""
  _, _, x, y, z = volume.shape
  axial = F.max_pool3d(volume, kernel_size=(1, 1, z)).squeeze(4)
  sagittal = F.max_pool3d(volume, kernel_size=(x, 1, 1)).squeeze(2)
  coronal = F.max_pool3d(volume, kernel_size=(1, y, 1)).squeeze(3)
  return [axial, sagittal, coronal]


def projected_pooling_loss(pred, target, *, kernel_sizes=(4, 5, 8, 10, 20),
                           strides=None, start_channel=1, normalize=False):
  """The published loss. ``normalize=True`` (a topojax option, not in the
  published code) divides each term by the cell count of its pooled plane."""
  strides = kernel_sizes if strides is None else strides
  if pred.dim() == 5:
    pred_planes, target_planes = projections(pred), projections(target)
  else:
    pred_planes, target_planes = [pred], [target]
  per_kernel = []
  for k, s in zip(kernel_sizes, strides):
    per_plane = []
    for p, t in zip(pred_planes, target_planes):
      p_pooled = F.max_pool2d(p, k, s)[:, start_channel:]
      t_pooled = F.max_pool2d(t, k, s)[:, start_channel:]
      term = (p_pooled.sum(dim=(2, 3)) - t_pooled.sum(dim=(2, 3))).abs()
      if normalize:
        term = term / (p_pooled.shape[2] * p_pooled.shape[3])
      per_plane.append(term.mean())
    per_kernel.append(torch.stack(per_plane).mean())
  return torch.stack(per_kernel).mean()


def _min_pool_along(x, axis):
  """3-tap min pooling along spatial axis ``axis`` (0-based), stride 1."""
  spatial = x.dim() - 2
  kernel = [1] * spatial
  kernel[axis] = 3
  padding = [k // 2 for k in kernel]
  pool = F.max_pool3d if spatial == 3 else F.max_pool2d
  return -pool(-x, kernel, 1, padding)


def soft_erode(x):
  eroded = _min_pool_along(x, 0)
  for axis in range(1, x.dim() - 2):
    eroded = torch.min(eroded, _min_pool_along(x, axis))
  return eroded


def soft_dilate(x):
  pool = F.max_pool3d if x.dim() == 5 else F.max_pool2d
  return pool(x, 3, 1, 1)


def soft_skeleton(x, iterations):
  skeleton = F.relu(x - soft_dilate(soft_erode(x)))
  for _ in range(iterations):
    x = soft_erode(x)
    delta = F.relu(x - soft_dilate(soft_erode(x)))
    skeleton = skeleton + F.relu(delta - skeleton * delta)
  return skeleton


def cldice_loss(pred, target, *, iterations=3, smooth=1e-5, start_channel=0):
  pred, target = pred[:, start_channel:], target[:, start_channel:]
  spatial = tuple(range(2, pred.dim()))
  pred_skeleton = soft_skeleton(pred, iterations)
  target_skeleton = soft_skeleton(target, iterations)
  precision = (((pred_skeleton * target).sum(spatial) + smooth)
               / (pred_skeleton.sum(spatial) + smooth))
  sensitivity = (((target_skeleton * pred).sum(spatial) + smooth)
                 / (target_skeleton.sum(spatial) + smooth))
  return torch.mean(1 - 2 * precision * sensitivity
                    / (precision + sensitivity))


def _finite_diagrams(f):
  """Per dimension, ``(P, 2)`` birth and death voxel coordinates (finite)."""
  table = cripser.computePH(f.detach().cpu().numpy().astype(np.float64),
                            maxdim=f.dim() - 1)
  table = table[table[:, 2] < 1e300]
  rank = f.dim()
  return [(table[table[:, 0] == dim][:, 3:3 + rank].astype(np.int64),
           table[table[:, 0] == dim][:, 6:6 + rank].astype(np.int64))
          for dim in range(rank)]


def _points(f, births, deaths):
  """``(P, 2)`` values of ``f`` at the birth and death voxels, differentiable."""
  return torch.stack([f[tuple(torch.from_numpy(c.T))] for c in
                      (births, deaths)], dim=1)


def hutopo_loss(pred, target, *, start_channel=0):
  """Superlevel persistence, 2-Wasserstein matching, squared costs."""
  f_pred = (1 - pred[:, start_channel:]).flatten(0, 1)
  f_target = (1 - target[:, start_channel:]).flatten(0, 1)
  per_item = []
  for fp, ft in zip(f_pred, f_target):
    total = fp.new_zeros(())
    for (pb, pd), (tb, td) in zip(_finite_diagrams(fp), _finite_diagrams(ft)):
      p_points, t_points = _points(fp, pb, pd), _points(ft, tb, td)
      _, matching = wasserstein.wasserstein_distance(
          p_points.detach().cpu().numpy(), t_points.detach().cpu().numpy(),
          matching=True, order=2, internal_p=2, keep_essential_parts=False)
      matching = np.asarray(matching, np.int64).reshape(-1, 2)
      for i, j in matching:
        if i >= 0 and j >= 0:
          total = total + ((p_points[i] - t_points[j])**2).sum()
        elif i >= 0:
          total = total + (p_points[i, 0] - p_points[i, 1])**2 / 2
        else:
          total = total + (t_points[j, 0] - t_points[j, 1])**2 / 2
    per_item.append(total)
  return torch.stack(per_item).mean()


TOPOLOSSES = {
    "CLDiceLoss": "cldice.src.cldice_loss",
    "HutopoLoss": "hutopo.src.hutopo_loss",
    "BettiMatchingLoss": "betti_matching.src.betti_matching_loss",
}


def topolosses_class(name):
  """A loss class of the ``topolosses`` package, or ``None`` if not installed.

  ``topolosses.losses`` imports all of its losses, one of which needs a
  torchvision that fails to load beside the CPU build of torch; the losses
  used here need neither, so their modules are imported without running that
  package's ``__init__``.
  """
  spec = importlib.util.find_spec("topolosses")
  if spec is None:
    return None
  package = types.ModuleType("topolosses.losses")
  package.__path__ = [str(pathlib.Path(spec.origin).parent / "losses")]
  sys.modules.setdefault("topolosses.losses", package)
  module = importlib.import_module(f"topolosses.losses.{TOPOLOSSES[name]}")
  return getattr(module, name)


def value_and_grad(loss, pred, target, *, dtype=torch.float64, **kwargs):
  """A torch loss's value and gradient, channels-last NumPy in and out."""
  p = torch.tensor(np.moveaxis(pred, -1, 1), dtype=dtype, requires_grad=True)
  t = torch.tensor(np.moveaxis(target, -1, 1), dtype=dtype)
  value = loss(p, t, **kwargs)
  value.backward()
  return value.item(), np.moveaxis(p.grad.numpy(), 1, -1)


def numpy_dice_loss(probs, target):
  """Soft Dice loss, 1 − (I + 1)/((ΣP + ΣT)/2 + 1), per sample and class."""
  axes = tuple(range(1, probs.ndim - 1))
  inter = (probs * target).sum(axes)
  coeff = (inter + 1.0) / ((probs.sum(axes) + target.sum(axes)) / 2 + 1.0)
  return float(np.mean(1.0 - coeff))


def tubed_skeleton_label_map(seg, *, do_tube=True):
  """The authors' tube of an integer label map ``(N, 1, X, Y[, Z])``.

  Per sample: skeleton of ``seg > 0``, two grey dilations by scikit-image's
  default (face-connected) footprint, times the label map, so that each tube
  voxel carries its class and none lies in the background.
  """
  from skimage.morphology import dilation, skeletonize
  tubes = np.zeros(seg.shape, np.int16)
  for n in range(seg.shape[0]):
    foreground = seg[n, 0] > 0
    if not foreground.any():
      continue
    skeleton = skeletonize(foreground).astype(np.int16)
    if do_tube:
      skeleton = dilation(dilation(skeleton))
    tubes[n, 0] = skeleton * seg[n, 0].astype(np.int16)
  return tubes


def skeleton_recall_loss(pred, skeleton, *, smooth=1e-5, start_channel=1,
                         batch_dice=False):
  """The authors' ``SoftSkeletonRecallLoss`` on probabilities: minus the mean
  recall of ``pred`` on the tube.

  ``skeleton``: the tube, one-hot of ``pred``'s shape, or a label map
  ``(N, 1, ...)`` that is one-hot encoded here (as the authors do). The
  authors always drop channel 0; ``start_channel`` generalises that to a
  single sigmoid channel (0).
  """
  spatial = tuple(range(2, pred.dim()))
  with torch.no_grad():
    if skeleton.shape != pred.shape:
      one_hot = torch.zeros(pred.shape, dtype=pred.dtype)
      one_hot.scatter_(1, skeleton.long(), 1)
      skeleton = one_hot
    skeleton = skeleton[:, start_channel:]
    total = skeleton.sum(spatial)
  covered = (pred[:, start_channel:] * skeleton).sum(spatial)
  if batch_dice:
    covered, total = covered.sum(0), total.sum(0)
  recall = (covered + smooth) / torch.clip(total + smooth, 1e-8)
  return -recall.mean()


def _cbdice_maps(mask, skeleton, dims):
  """The authors' ``get_weights`` normalisation of one binary ``mask`` and
  its binary ``skeleton``, ``(B, *spatial)``: the distances clipped to and
  divided by the largest skeleton radius of each sample, the skeleton radii
  divided by it, and the linear inverse weight on the skeleton."""
  from monai.transforms import distance_transform_edt
  distances = distance_transform_edt(mask).to(mask.dtype)
  distances = torch.where(mask == 0, 0, distances)
  radius = torch.where(skeleton == 1, distances, 0)
  distance_norm, radius_norm, inverse = (torch.zeros_like(distances)
                                         for _ in range(3))
  for i in range(radius.shape[0]):
    largest = max(radius[i].max(), 1)
    smallest = max(radius[i].min(), 1)
    distance_norm[i] = torch.clamp(distances[i], max=largest) / largest
    radius_norm[i] = radius[i] / largest
    inverse[i] = ((largest - radius[i] + smallest) / largest)**(dims - 1)
  inverse = torch.where(skeleton == 0, 0, inverse)
  return distance_norm, radius_norm, inverse


def _cbdice_pick(own, other, weight):
  """``weight`` times ``own`` where only ``own`` is non-zero, else ``other``."""
  return torch.where((own != 0) & (other == 0), own * weight, other * weight)


def authors_cbdice(prob, label, *, iterations=10, smooth=1.0,
                   label_skeleton=None):
  """``SoftcbDiceLoss.forward`` from the foreground probability map on:
  ``prob`` and ``label`` ``(B, *spatial)``, sums over the whole batch, minus
  the harmonic mean. ``label_skeleton`` replaces the label's soft skeleton
  (their ``t_skeletonize_flage`` on the label side)."""
  dims = prob.dim() - 1
  with torch.no_grad():
    label = (label > 0).to(prob.dtype)
    hard = (prob > 0.5).to(prob.dtype)
    pred_skeleton = soft_skeleton(hard.unsqueeze(1), iterations).squeeze(1)
    if label_skeleton is None:
      label_skeleton = soft_skeleton(label.unsqueeze(1),
                                     iterations).squeeze(1)
  soft_pred_skeleton = pred_skeleton * prob
  label_distance, label_radius, label_inverse = _cbdice_maps(
      label, label_skeleton, dims)
  pred_distance, pred_radius, pred_inverse = _cbdice_maps(
      hard, (soft_pred_skeleton > 0.5).to(prob.dtype), dims)
  q_vl, q_slvl = label_distance * label, label_radius * label
  q_sl = label_inverse * label_skeleton
  q_vp, q_spvp = pred_distance * prob, pred_radius * prob
  q_sp = pred_inverse * soft_pred_skeleton
  precision = (((q_sp * q_vl).sum() + smooth)
               / (_cbdice_pick(q_spvp, q_slvl, q_sp).sum() + smooth))
  sensitivity = (((q_sl * q_vp).sum() + smooth)
                 / (_cbdice_pick(q_slvl, q_spvp, q_sl).sum() + smooth))
  return -2 * precision * sensitivity / (precision + sensitivity)


def cbdice_loss(pred, target, *, iterations=10, smooth=1.0, start_channel=0,
                skeleton=None):
  """topojax's reduction of ``authors_cbdice``: one plus it per sample and
  channel from ``start_channel`` on (channels-first), then the mean."""
  terms = []
  for n in range(pred.shape[0]):
    for c in range(start_channel, pred.shape[1]):
      terms.append(1 + authors_cbdice(
          pred[n:n + 1, c], target[n:n + 1, c] > 0.5, iterations=iterations,
          smooth=smooth, label_skeleton=None if skeleton is None
          else (skeleton[n:n + 1, c] > 0.5).to(pred.dtype)))
  return torch.stack(terms).mean()
