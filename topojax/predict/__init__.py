"""Predictions of a trained run, as arrays or NIfTI files in image space.

One model and one preprocessing, the training one (each channel resampled
to the run's grid and min-max normalised,
``topojax.data.preprocess_image``), three ways in:

* ``Segmenter.from_run(run_dir)``: the run's best model in Python; called on
  an image (an array or a NIfTI file) it gives the mask in that image's own
  voxel grid, and the probabilities if asked for.
* ``predict_images(run_dir, images, out_dir)``: NIfTI files, or folders of
  them, each written as ``<out_dir>/<name>.nii.gz`` in its own shape, affine
  and header (``topojax predict --images``).
* ``predict_run(run_dir, task_dir, out_dir)``: the test cases of the run's
  split, from the task's preprocessing cache, written as
  ``<case_id>.nii.gz`` as ``topojax evaluate`` expects (``topojax predict
  --data``).

A run trained on whole volumes segments every image whole at its training
shape, the paper's fixed-shape protocol (§3.1), and its label map
(optionally only the largest connected components of each class) is resized
back by nearest neighbour. A run trained on patches segments every image on
its own grid (at the run's target spacing, if any) by sliding windows
(``topojax.sliding_window``), and its probabilities are resampled back to the
image's grid before they become labels, as nnU-Net exports them. One image
at a time, either way: the forward pass compiles once, and memory does not
grow with the number of images. Masks are written with
``topojax.data.write_prediction``.

A phase folder's ``model.json`` (written by ``topojax.train``) names the
network's input channels (the modalities, in training order), the task's
modalities and its labels. For runs made before that file, the channel
counts are read from the checkpoint and images must have exactly the
network's input channels.

One module per step, each readable top to bottom:

* :mod:`~topojax.predict.runs`: a run's phase folder, configuration, model
  description (``model.json``) and best checkpoint;
* :mod:`~topojax.predict.segmenter`: ``Segmenter`` and ``segment``, the
  compiled forward pass, and the label map of its probabilities;
* :mod:`~topojax.predict.images`: ``predict_images``, finding the files and
  checking the outputs before any work;
* :mod:`~topojax.predict.cases`: ``predict_run``, a run's test cases;
"""

from topojax.predict.cases import predict_run
from topojax.predict.images import predict_images
from topojax.predict.runs import MODEL_FILE
from topojax.predict.runs import phase_dir
from topojax.predict.runs import restore_best
from topojax.predict.segmenter import NIFTI_SUFFIXES
from topojax.predict.segmenter import Segmenter
from topojax.predict.segmenter import segment

__all__ = (
    "MODEL_FILE", "NIFTI_SUFFIXES", "Segmenter", "phase_dir", "predict_images",
    "predict_run", "restore_best", "segment")
