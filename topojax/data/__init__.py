"""Medical Segmentation Decathlon tasks: reading, preprocessing, cache, splits.

Everything training and evaluation read goes through this package. It works
on NumPy arrays and NIfTI files only and knows nothing of models or losses.
One module per concern, each importing only those above it:

* :mod:`~topojax.data.msd`: the MSD task folder and its ``dataset.json``
  (``read_task -> Task``, ``Case``, ``TaskProtocol``, ``PAPER_TASKS``);
* :mod:`~topojax.data.nifti`: one case decoded from NIfTI in its original
  space (``load_case``, ``CaseMeta``);
* :mod:`~topojax.data.preprocessing`: the paper's resizing (or nnU-Net's
  resampling to a spacing) and min-max normalisation (``PreprocessConfig``,
  ``resize``, ``preprocess``, ``preprocess_image``);
* :mod:`~topojax.data.cache`: every case preprocessed once and memory-mapped
  from disk (``load_dataset -> Dataset``);
* :mod:`~topojax.data.splits`: participant-level splits (``Split``,
  ``make_split``, ``default_split``);
* :mod:`~topojax.data.batches`: shuffled, flipped batches prepared in a
  background thread (``iterate_batches``);
* :mod:`~topojax.data.patches`: nnU-Net's random and foreground-centred
  patches of cases of any shape (``iterate_patches``, ``foreground_voxels``);
* :mod:`~topojax.data.writer`: predictions back in the original space
  (``as_label_map``, ``write_prediction``).

Arrays are channels-last float32:

* images ``(num_cases, X, Y, Z, C_in)``, ``C_in`` = selected modalities;
* labels ``(num_cases, X, Y, Z, C_out)`` in {0, 1}: ``C_out = 1`` for
  ``label_mode="binary"`` (every non-zero label is foreground) and ``K`` for
  ``label_mode="onehot"`` (channel ``k`` is label ``k``, background included).

Public API:

* ``PreprocessConfig(*, shape, modalities=None, label_mode="binary",
  spacing=None)``; ``case_grid(config, shape, spacing)``, the grid a case
  is resampled to, and ``image_order(config)``, the spline order of its
  image.
* ``PAPER_TASKS``: the paper's shape and split counts per MSD task folder name.
* ``read_task(task_dir) -> Task``: parses and checks ``dataset.json``.
* ``load_case(task, case, *, modalities=None) -> (image, label, CaseMeta)``:
  one case in its original space; image ``(X, Y, Z, M)`` float32, label
  ``(X, Y, Z)`` uint8.
* ``resize(volume, shape, *, order) -> ndarray``: ``(X, Y, Z)`` to ``shape``.
* ``preprocess(image, label, config, *, num_labels) -> (image, label)``, and
  ``preprocess_image(image, shape) -> image`` for an image without a label.
* ``load_dataset(task_dir, config, *, cache_dir=None, progress=True)
  -> Dataset``: every case preprocessed, from the cache when it is valid;
  cases of different shapes (``shape=None``) as ``CaseArrays``.
* ``make_split(case_ids, *, num_val, num_test, seed) -> Split`` and
  ``default_split(task, *, seed) -> Split``; ``Split.save(path)`` and
  ``Split.load(path)`` keep it next to a run.
* ``iterate_batches(images, labels, indices, *, batch_size, seed, epoch,
  shuffle=True, flip_axes=(), drop_remainder=True)``: ``(images, labels)``
  batches ``(N, X, Y, Z, C)``, prepared in a background thread.
* ``write_prediction(mask, meta, path, *, overwrite=False)``: a mask back in
  the original image's shape, affine and header.

Every name is importable from ``topojax.data`` as it was when this package was
one module, ``_case_id``, ``_decode`` and ``_open_nifti`` included (the
prediction code reads NIfTI and names cases the same way). A test that
replaces one of them must patch the module that calls it (e.g.
``topojax.data.cache.preprocess``), not this package.
"""

from topojax.data.batches import iterate_batches
from topojax.data.cache import CaseArrays
from topojax.data.cache import Dataset
from topojax.data.cache import load_dataset
from topojax.data.msd import PAPER_TASKS
from topojax.data.msd import Case
from topojax.data.msd import Task
from topojax.data.msd import TaskProtocol
from topojax.data.msd import _case_id
from topojax.data.msd import read_task
from topojax.data.nifti import CaseMeta
from topojax.data.nifti import _decode
from topojax.data.nifti import _open_nifti
from topojax.data.nifti import load_case
from topojax.data.patches import case_foreground
from topojax.data.patches import foreground_voxels
from topojax.data.patches import iterate_patches
from topojax.data.preprocessing import LABEL_MODES
from topojax.data.preprocessing import PreprocessConfig
from topojax.data.preprocessing import case_grid
from topojax.data.preprocessing import image_order
from topojax.data.preprocessing import preprocess
from topojax.data.preprocessing import preprocess_image
from topojax.data.preprocessing import resize
from topojax.data.splits import Split
from topojax.data.splits import default_split
from topojax.data.splits import make_split
from topojax.data.writer import as_label_map
from topojax.data.writer import write_prediction

__all__ = (
    "LABEL_MODES", "PAPER_TASKS", "Case", "CaseArrays", "CaseMeta", "Dataset",
    "PreprocessConfig", "Split", "Task", "TaskProtocol", "as_label_map",
    "case_foreground", "case_grid", "default_split", "foreground_voxels",
    "image_order", "iterate_batches", "iterate_patches", "load_case",
    "load_dataset", "make_split", "preprocess", "preprocess_image", "read_task", "resize",
    "write_prediction",
)
