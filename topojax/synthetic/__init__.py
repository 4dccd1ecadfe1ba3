"""A synthetic segmentation task with known topology, in the MSD layout.

The default task runs anywhere: small volumes that a 3D U-Net trains on in
minutes on a CPU, yet hard in the way the paper cares about (Fu et al., SPIE
Medical Imaging 2023, §1). Each case holds

* ``num_objects`` labelled objects (smooth star-shaped blobs, ellipsoids,
  tori, rings: thin tori with a narrow neck, branches: trees of thin tubes,
  or vessels: trees whose finest branches are thinner than a voxel and whose
  image fades at stenoses), at random orientations, separate from each
  other, so the label has exactly that many 26-connected components, one
  tunnel per torus or ring and no cavity;
* ``num_distractors`` unlabelled bright spheres a little smaller and dimmer
  than the objects (beside branches and vessels, thin straight tube
  fragments instead):
  locally they look like object, so a network trained with Dice alone tends
  to keep bits of them as small spurious components;
* partial-volume blur, a smooth multiplicative bias field and heavy Gaussian
  noise.

Sizes are fractions of the smallest side of the volume, so a task at another
``shape`` looks the same, only finer. Case ``i`` is drawn from its own
generator seeded by ``(seed, i)``: the same config gives the same files, and
more cases only add files.

Four tasks are built in (``TASKS``): ``"components"``, the default, where
the difficulty is spurious components, ``"loops"``, rings whose narrow
neck a network readily breaks (a lost tunnel) and whose hole it may fill,
``"branches"``, thin branching trees among unlabelled tube fragments,
whose thin tips a network breaks off or loses and whose fragments it keeps,
and ``"vessels"``, vessel trees in 96³ volumes (larger than a network's
input), which a network breaks where the image drops at a stenosis or a
branch fades below a voxel's width.

``generate_task(out_dir, config)`` writes ``dataset.json``, ``imagesTr/``
(float32) and ``labelsTr/`` (uint8, label 1 = object) with an anisotropic,
rotated affine; ``dataset.json`` also records the config and each case's
``num_objects``. ``save_preview(task_dir, path)`` draws the first cases.
"""

from topojax.synthetic.cases import make_case
from topojax.synthetic.config import KINDS
from topojax.synthetic.config import SynthConfig
from topojax.synthetic.config import TASKS
from topojax.synthetic.config import affine
from topojax.synthetic.folders import generate_task
from topojax.synthetic.folders import save_preview

__all__ = ("KINDS", "SynthConfig", "TASKS", "affine", "generate_task",
           "make_case", "save_preview")
