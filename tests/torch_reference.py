"""A PyTorch reference of the published Projected Pooling Loss, for tests only.

Written for topojax from the semantics in the design notes (§1), not copied:
channels-first like the published code, ``(N, C, X, Y, Z)`` or ``(N, C, X, Y)``,
built from ``torch.nn.functional`` max pooling, whose backward sends each
window's gradient to its first maximum.
"""

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
