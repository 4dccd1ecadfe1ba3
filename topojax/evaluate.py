"""Evaluation of predictions against labels, and the Table-2 report.

Pairs predicted label maps with ground-truth label maps (in memory, or NIfTI
folders), checks them, computes `topojax.metrics.case_metrics` per case and
class, and aggregates as in Table 2 of Fu et al., SPIE Medical Imaging 2023
(§3.2): means over cases, MVER/MAVER, Pearson's r of the volumes, with
centerline Dice (clDice) beside Dice. Reports are
a per-case CSV, a JSON summary, a markdown table with one row per run and a
PNG of the per-case values. NumPy, SciPy, scikit-image and nibabel only: no
JAX, no model.

How the means stay honest:

- A case with a label but no prediction is a row with status ``missing``; the
  summaries give ``evaluated`` out of ``cases`` and list the missing ids.
- An infinite per-case value (95HD or VER when one mask is empty, see
  `topojax.metrics`) is counted in ``n_inf`` and left out of the mean, which
  is over the ``n`` finite values; the table shows ``(+k inf)`` beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import csv
import dataclasses
import json
import math
import os
import pathlib

import nibabel as nib
import numpy as np
from tqdm import tqdm

from topojax import metrics
from topojax.postprocess import keep_largest_components

# Table 2's columns in the paper's order, then the Betti-number errors; keys
# are those of `metrics.case_metrics` plus the cross-case ``pearson_r``.
TABLE_COLUMNS = (
    ("dice", "Dice"),
    ("hd95_mm", "95HD (mm)"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("ver", "MVER"),
    ("aver", "MAVER"),
    ("pearson_r", "Pearson's r"),
    ("cce_2d", "2D CCE"),
    ("cce_3d", "3D CCE"),
    ("betti0_error", r"\|Δβ0\|"),
    ("betti1_error", r"\|Δβ1\|"),
    ("betti2_error", r"\|Δβ2\|"),
)
# The report's columns: Table 2's, with centerline Dice (Shit et al., CVPR
# 2021) beside Dice, then what |Δβ0| mixes, counted apart
# (`metrics.component_errors`). TABLE_COLUMNS stays the paper's alone,
# because experiments/reproduce.py prints Table 2 from it.
REPORT_COLUMNS = (TABLE_COLUMNS[:1] + (("cldice", "clDice"),)
                  + TABLE_COLUMNS[1:]
                  + (("breaks", "Breaks"), ("missed", "Missed"),
                     ("spurious", "Spurious")))
REPORT_FILES = ("cases.csv", "summary.json", "table.md", "cases.png")
# Predictions are written from the image's affine, so they should agree with
# the label's to float32 rounding; this is far below any voxel size.
AFFINE_TOLERANCE_MM = 1e-3
_PLOTTED = (("dice", "Dice"), ("hd95_mm", "95HD (mm)"), ("cce_2d", "2D CCE"),
            ("cce_3d", "3D CCE"), ("betti1_error", "|Δβ1|"),
            ("betti2_error", "|Δβ2|"))


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One case to evaluate.

  Attributes:
    case_id: the case's name, e.g. its label file's name without ``.nii.gz``.
    label: ground-truth label map ``(X, Y, Z)`` with values 0 and the classes.
    pred: predicted label map of the same shape and values, or None when the
      case has no prediction; it is then reported as missing.
    spacing: voxel size in mm along X, Y, Z.
  """

  case_id: str
  label: np.ndarray
  pred: np.ndarray | None
  spacing: Sequence[float]


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
  classes = tuple(classes)
  if (not classes or len(set(classes)) != len(classes)
      or not all(isinstance(k, (int, np.integer)) and k > 0 for k in classes)):
    raise ValueError(
        "classes must be distinct positive label values, e.g. (1,) for "
        f"binary masks, got {classes!r}")
  return tuple(int(k) for k in classes)


def _as_label_map(array, classes: tuple[int, ...], name: str) -> np.ndarray:
  array = np.asarray(array)
  allowed = (0, *classes)
  valid = np.isin(array, allowed)
  if not valid.all():
    found = np.unique(array[~valid])[:5].tolist()
    kind = "binary masks" if classes == (1,) else f"label values {allowed}"
    raise ValueError(
        f"{name} has values {found} outside {allowed}: {kind} expected (pass "
        "classes to evaluate other label values)")
  return array.astype(np.min_scalar_type(max(classes)), copy=False)


def evaluate_cases(
    cases: Iterable[Case],
    *,
    classes: Sequence[int] = (1,),
    keep_largest: int | None = None,
) -> tuple[list[dict], dict[int, dict]]:
  """Evaluates in-memory cases: per-case rows and the per-class summary.

  Args:
    cases: the cases, consumed once and one at a time, so a generator that
      reads each case from disk keeps only one in memory.
    classes: the label values to evaluate, each as a binary mask; ``(1,)``
      (the default) means binary masks, and any other value is an error.
    keep_largest: if given, keep only this many largest connected components
      of each class of the prediction before measuring
      (`topojax.postprocess.keep_largest_components`).

  Returns:
    ``(rows, summary)``. ``rows`` has one dict per case and class, in input
    order: ``case``, ``class``, ``status`` (``ok`` or ``missing``) and, when
    ok, the values of `topojax.metrics.case_metrics`. ``summary`` maps each
    class to a dict with ``cases``, ``evaluated``, ``missing`` (case ids),
    ``keep_largest``, ``pearson_r`` (of the volumes over evaluated cases) and
    ``metrics``: for each per-case metric a dict with ``mean`` and ``std``
    (population) over its ``n`` finite values and ``n_inf``, the count of
    infinite ones. A mean with no finite value is NaN.

  Raises:
    ValueError: a bad ``classes`` or ``keep_largest`` (before any case is
      read), or a case whose masks do not fit; the message names the case.
  """
  classes = _check_classes(classes)
  if keep_largest is not None and (
      isinstance(keep_largest, bool)
      or not isinstance(keep_largest, (int, np.integer)) or keep_largest < 1):
    raise ValueError(
        "keep_largest must be None or a positive integer, got "
        f"{keep_largest!r}")
  rows = []
  for case in cases:
    if case.pred is None:
      rows.extend({"case": case.case_id, "class": k, "status": "missing"}
                  for k in classes)
      continue
    try:
      label = _as_label_map(case.label, classes, "the label")
      pred = _as_label_map(case.pred, classes, "the prediction")
      if label.ndim != 3 or pred.shape != label.shape:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must have the "
            "same 3D shape (X, Y, Z)")
      if keep_largest is not None:
        pred = keep_largest_components(pred, n=keep_largest)
      for k in classes:
        rows.append({"case": case.case_id, "class": k, "status": "ok",
                     **metrics.case_metrics(pred == k, label == k,
                                            spacing=case.spacing)})
    except ValueError as err:
      raise ValueError(f"case {case.case_id!r}: {err}") from err
  return rows, _summarize(rows, classes, keep_largest)


def _summarize(rows: list[dict], classes: tuple[int, ...],
               keep_largest: int | None) -> dict[int, dict]:
  summary = {}
  for k in classes:
    of_class = [row for row in rows if row["class"] == k]
    done = [row for row in of_class if row["status"] == "ok"]
    stats = {}
    for key, _ in REPORT_COLUMNS:
      if key == "pearson_r":
        continue
      values = np.array([row[key] for row in done], float)
      finite = values[np.isfinite(values)]
      stats[key] = {
          "mean": float(finite.mean()) if finite.size else math.nan,
          "std": float(finite.std()) if finite.size else math.nan,
          "n": int(finite.size),
          "n_inf": int(values.size - finite.size),
      }
    summary[k] = {
        "cases": len(of_class),
        "evaluated": len(done),
        "missing": [row["case"] for row in of_class
                    if row["status"] == "missing"],
        "keep_largest": keep_largest,
        "pearson_r": metrics.pearson_r(
            [row["volume_pred_mm3"] for row in done],
            [row["volume_gt_mm3"] for row in done]),
        "metrics": stats,
    }
  return summary


def _nifti_files(folder: pathlib.Path,
                 argument: str) -> dict[str, pathlib.Path]:
  if not folder.is_dir():
    raise FileNotFoundError(f"{argument}: no such folder: {folder}")
  files = {}
  for path in sorted(folder.iterdir()):
    # The MSD archives carry macOS '._<case>.nii.gz' files beside the images.
    if path.name.startswith("."):
      continue
    for suffix in (".nii.gz", ".nii"):
      if path.name.endswith(suffix):
        case_id = path.name[:-len(suffix)]
        if case_id in files:
          raise ValueError(
              f"{argument}: case {case_id!r} has two files in {folder}: "
              f"{files[case_id].name} and {path.name}")
        files[case_id] = path
  return files


def _pair_folders(
    pred_dir, label_dir, case_ids: Sequence[str] | None,
) -> list[tuple[str, pathlib.Path | None, pathlib.Path]]:
  """Matches files by case id and checks shapes and affines from headers."""
  preds = _nifti_files(pathlib.Path(pred_dir), "pred_dir")
  labels = _nifti_files(pathlib.Path(label_dir), "label_dir")
  if not preds:
    raise FileNotFoundError(
        f"pred_dir: no .nii or .nii.gz predictions in {pred_dir}")
  orphans = sorted(set(preds) - set(labels))
  if orphans:
    raise ValueError(
        f"pred_dir: predictions in {pred_dir} with no label in {label_dir}: "
        f"{orphans}")
  expected = sorted(labels) if case_ids is None else list(case_ids)
  if len(set(expected)) != len(expected):
    raise ValueError(f"case_ids: a case is listed twice in {expected}")
  unknown = [case_id for case_id in expected if case_id not in labels]
  if unknown:
    raise FileNotFoundError(f"case_ids: no label in {label_dir} for {unknown}")
  pairs = []
  for case_id in expected:
    pred_path = preds.get(case_id)
    if pred_path is not None:
      # Headers only: nibabel reads the voxels when they are first used.
      pred, label = nib.load(pred_path), nib.load(labels[case_id])
      if pred.shape != label.shape:
        raise ValueError(
            f"case {case_id!r}: prediction {pred_path} has shape {pred.shape},"
            f" its label {label.shape}")
      if not np.allclose(pred.affine, label.affine, rtol=0,
                         atol=AFFINE_TOLERANCE_MM):
        raise ValueError(
            f"case {case_id!r}: the affines of prediction {pred_path} and its "
            f"label differ by more than {AFFINE_TOLERANCE_MM} mm:\n"
            f"{pred.affine}\nvs\n{label.affine}")
    pairs.append((case_id, pred_path, labels[case_id]))
  return pairs


def _read_case(case_id: str, pred_path: pathlib.Path | None,
               label_path: pathlib.Path) -> Case:
  label = nib.load(label_path)
  return Case(
      case_id=case_id,
      label=np.asanyarray(label.dataobj),
      pred=(None if pred_path is None
            else np.asanyarray(nib.load(pred_path).dataobj)),
      spacing=label.header.get_zooms()[:3],
  )


def evaluate_runs(
    pred_dirs: Mapping[str, str | os.PathLike],
    label_dir: str | os.PathLike,
    *,
    case_ids: Sequence[str] | None = None,
    classes: Sequence[int] = (1,),
    keep_largest: int | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, tuple[list[dict], dict[int, dict]]]:
  """Evaluates folders of NIfTI predictions, one folder per run, side by side.

  Files pair by name: ``<pred_dir>/<case>.nii.gz`` (or ``.nii``) against
  ``<label_dir>/<case>.nii.gz``; the spacing is the label header's. Every
  file is checked from its header (a prediction without a label, a shape or
  affine mismatch) for all runs before any voxel is read.

  Args:
    pred_dirs: run name (the report's row, e.g. ``"PPL 150+150"``) to the
      folder of its predicted label maps.
    label_dir: folder of ground-truth label maps, e.g. MSD's ``labelsTr``.
    case_ids: the cases to evaluate, e.g. a run's test split; by default
      every label in ``label_dir``. A listed case without a prediction is
      reported as missing; predictions of unlisted cases are ignored.
    classes: label values to evaluate, see `evaluate_cases`.
    keep_largest: post-processing, see `evaluate_cases`.
    out_dir: if given, write the report there (`write_report`).
    overwrite: replace report files already in ``out_dir``.

  Returns:
    Run name to ``(rows, summary)`` of `evaluate_cases`.

  Raises:
    FileNotFoundError: a missing folder, no predictions, an unknown case id.
    FileExistsError: report files exist in ``out_dir`` and not ``overwrite``.
    ValueError: bad pairs or masks; the message names the case.
  """
  if not pred_dirs:
    raise ValueError("pred_dirs: give at least one run")
  if out_dir is not None:
    _report_paths(out_dir, overwrite=overwrite)
  pairs = {run: _pair_folders(folder, label_dir, case_ids)
           for run, folder in pred_dirs.items()}
  results = {}
  for run, run_pairs in pairs.items():
    cases = (_read_case(*pair) for pair in run_pairs)
    results[run] = evaluate_cases(
        tqdm(cases, total=len(run_pairs), desc=run, unit="case"),
        classes=classes, keep_largest=keep_largest)
  if out_dir is not None:
    write_report(results, out_dir, overwrite=overwrite)
  return results


def _report_paths(out_dir, *, overwrite: bool) -> dict[str, pathlib.Path]:
  paths = {name: pathlib.Path(out_dir) / name for name in REPORT_FILES}
  existing = [str(path) for path in paths.values() if path.exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f"out_dir: report files exist already: {existing}; pass overwrite "
        "(--overwrite) to replace them")
  return paths


def _row_name(run: str, k: int, summary: Mapping[int, dict]) -> str:
  return run if len(summary) == 1 else f"{run}, class {k}"


def _format_stat(stat: Mapping[str, float]) -> str:
  cell = "n/a" if stat["n"] == 0 else f"{stat['mean']:.3f} ± {stat['std']:.3f}"
  return cell + (f" (+{stat['n_inf']} inf)" if stat["n_inf"] else "")


def markdown_table(summaries: Mapping[str, Mapping[int, dict]]) -> str:
  """Table 2 and clDice as markdown: one row per run (and class), then notes.

  Args:
    summaries: run name to the ``summary`` of `evaluate_cases`.

  Returns:
    The table, a legend, and a line per run with missing cases.
  """
  header = ["Run", "n"] + [title for _, title in REPORT_COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  notes = []
  for run, summary in summaries.items():
    for k, stats in summary.items():
      name = _row_name(run, k, summary)
      cells = [name.replace("|", r"\|"),
               f"{stats['evaluated']}/{stats['cases']}"]
      for key, _ in REPORT_COLUMNS:
        if key == "pearson_r":
          r = stats["pearson_r"]
          cells.append("n/a" if math.isnan(r) else f"{r:.3f}")
        else:
          cells.append(_format_stat(stats["metrics"][key]))
      lines.append("| " + " | ".join(cells) + " |")
      if stats["missing"]:
        notes.append(
            f"- {name}: no prediction for {', '.join(stats['missing'])}.")
      if stats["keep_largest"] is not None:
        notes.append(f"- {name}: kept the {stats['keep_largest']} largest "
                     "components per class before measuring.")
  legend = (
      "n: cases evaluated / cases expected. Mean ± population standard "
      "deviation over the evaluated cases; (+k inf): k cases with an "
      "infinite value (one mask empty), left out of the mean. Pearson's r: "
      "predicted vs. ground-truth volumes. clDice: centerline Dice. "
      "|Δβi|: Betti-number errors "
      "(components, tunnels, cavities); |Δβ0| is the 3D CCE. Breaks: "
      "predicted pieces beyond one per label component; missed: label "
      "components no prediction touches; spurious: predicted components "
      "that touch no label.")
  lines += ["", legend]
  if notes:
    lines += [""] + notes
  return "\n".join(lines) + "\n"


def json_ready(value):
  """JSON-ready copy: NaN and infinities become null, keys strings."""
  if isinstance(value, dict):
    return {str(key): json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(item) for item in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _plot_cases(results, path: pathlib.Path) -> None:
  # Figure without pyplot: no global backend to set, Agg renders the PNG.
  from matplotlib.figure import Figure

  groups = [(_row_name(run, k, summary),
             [row for row in rows
              if row["class"] == k and row["status"] == "ok"])
            for run, (rows, summary) in results.items() for k in summary]
  jitter = np.random.default_rng(0).uniform(
      -0.15, 0.15, size=max((len(rows) for _, rows in groups), default=0))
  # The saved bounding box takes in every label, in 0.28 s where a
  # constrained layout takes 0.40 (once per evaluated run).
  fig = Figure(figsize=(12, 7))
  axes = fig.subplots(2, 3, gridspec_kw={"hspace": 0.4, "wspace": 0.25})
  for ax, (key, title) in zip(axes.flat, _PLOTTED):
    for i, (_, rows) in enumerate(groups):
      values = np.array([row[key] for row in rows], float)
      values = values[np.isfinite(values)]
      ax.plot(i + jitter[:values.size], values, "o", alpha=0.6)
      if values.size:
        ax.hlines(values.mean(), i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(groups)), [name for name, _ in groups],
                  rotation=20, ha="right")
    ax.set_title(title)
  fig.suptitle("Per-case values (dots) and means (bars); infinite values "
               "are not drawn")
  fig.savefig(path, dpi=110, bbox_inches="tight")


def write_report(
    results: Mapping[str, tuple[list[dict], dict[int, dict]]],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> dict[str, pathlib.Path]:
  """Writes ``cases.csv``, ``summary.json``, ``table.md`` and ``cases.png``.

  Args:
    results: run name to ``(rows, summary)`` of `evaluate_cases`.
    out_dir: the folder, created if needed.
    overwrite: replace report files already there.

  Returns:
    File name to the path written.

  Raises:
    FileExistsError: a report file exists and ``overwrite`` is False.
  """
  paths = _report_paths(out_dir, overwrite=overwrite)
  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  # Missing cases have no metric keys: take the columns from all rows.
  fields = ["run", *dict.fromkeys(
      key for rows, _ in results.values() for row in rows for key in row)]
  with open(paths["cases.csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fields, restval="")
    writer.writeheader()
    for run, (rows, _) in results.items():
      writer.writerows({"run": run, **row} for row in rows)
  summaries = {run: summary for run, (_, summary) in results.items()}
  paths["summary.json"].write_text(
      json.dumps(json_ready(summaries), indent=2, allow_nan=False) + "\n")
  paths["table.md"].write_text(markdown_table(summaries))
  _plot_cases(results, paths["cases.png"])
  return paths
