"""topojax's 3D U-Net transcribed in PyTorch, for benchmarks side by side.

The architecture of ``topojax.unet.UNet`` with GroupNorm, channels-first:
two bias-free ``3×3×3`` convolutions per level, each followed by GroupNorm
(at most 8 groups) and a ReLU, ``2×2×2`` max pooling down, ``2×2×2``
stride-2 transposed convolutions up, skip connections by concatenation, a
``1×1×1`` head. The weights are PyTorch's own initialisation: benchmarks
compare speed, not outputs.
"""

from __future__ import annotations

import math


def torch_unet(*, base: int, depth: int, in_channels: int = 1,
               out_channels: int = 1):
  """A ``torch.nn.Module`` of the architecture above."""
  import torch
  from torch import nn

  def block(c_in, c_out):
    layers = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
      layers += [nn.Conv3d(a, b, 3, padding=1, bias=False),
                 nn.GroupNorm(math.gcd(b, 8), b), nn.ReLU()]
    return nn.Sequential(*layers)

  class UNet(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [base * 2 ** level for level in range(depth)]
      self.encoder = nn.ModuleList(
          block(a, b) for a, b in zip([in_channels] + widths[:-1], widths))
      self.up = nn.ModuleList(
          nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
          for level in range(depth - 1))
      self.decoder = nn.ModuleList(block(2 * widths[level], widths[level])
                                   for level in range(depth - 1))
      self.head = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, x):
      skips = []
      for level, encode in enumerate(self.encoder):
        x = encode(x)
        if level < len(self.encoder) - 1:
          skips.append(x)
          x = nn.functional.max_pool3d(x, 2)
      for level in reversed(range(len(self.up))):
        x = self.decoder[level](torch.cat([self.up[level](x), skips[level]],
                                          1))
      return self.head(x)

  return UNet()
