"""topojax: topology-aware 3D medical image segmentation in JAX/Flax.

Built around the Projected Pooling Loss of Fu et al., SPIE Medical Imaging
2023. Arrays are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.
"""

from topojax.losses import DEFAULT_KERNEL_SIZES
from topojax.losses import max_pool_2d
from topojax.losses import project
from topojax.losses import projected_pooling_loss
from topojax.losses import topo_dice_loss

__version__ = "0.1.0"
