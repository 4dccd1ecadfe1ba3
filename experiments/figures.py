"""The reproduction's figures (PNG, matplotlib).

(a) ``method_figure``: a prediction and its label, their axial, sagittal and
    coronal projections, and the pooled maps at each kernel size — the
    paper's Figure 1, on our data.
(b) ``qualitative_figure``: one slice of a test case, the label and each
    setting's prediction side by side — the paper's Figure 2.
(c) ``curves_figure``: training curves of both phases, phase 2 drawn after
    phase 1 for each variant.

And for the comparison of topology losses (``compare_losses``):

(d) ``projections_figure``: the label and each setting's mask of one test
    case as maximum projections, where a broken or filled ring shows whole;
(e) ``topology_time_figure``: each loss's topology errors against its
    training time, one panel per task.

Volumes are channels-last NumPy arrays ``(X, Y, Z)`` of one case and class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from topojax import losses  # noqa: E402


def method_figure(pred: np.ndarray, label: np.ndarray, path: str | os.PathLike,
                  *, kernel_sizes: Sequence[int] = losses.DEFAULT_KERNEL_SIZES
                  ) -> None:
  """Projections and pooled maps of a prediction and its label (paper, §2.1).

  Args:
    pred: probabilities ``(X, Y, Z)`` in [0, 1].
    label: binary ``(X, Y, Z)``.
    path: PNG to write.
    kernel_sizes: pooling kernels, one column each.
  """
  volumes = {"prediction": pred, "label": label}
  planes = {name: losses.project(np.asarray(v, np.float32)[None, ..., None])
            for name, v in volumes.items()}
  rows = [(name, plane) for name in volumes for plane in losses.PLANES]
  columns = 2 + len(kernel_sizes)
  # Fixed margins: a grid of 42 images has no labels to fit, and Matplotlib's
  # constrained layout takes most of the figure's second to place them.
  fig, axes = plt.subplots(len(rows), columns,
                           figsize=(1.9 * columns, 1.9 * len(rows)),
                           gridspec_kw={"left": 0.01, "right": 0.99,
                                        "bottom": 0.01, "top": 0.93,
                                        "wspace": 0.08, "hspace": 0.32})
  mid = pred.shape[2] // 2
  for r, (name, plane) in enumerate(rows):
    projection = planes[name][plane]
    if plane == "axial":
      _show(axes[r, 0], volumes[name][:, :, mid], f"{name}\nslice z={mid}")
    else:
      axes[r, 0].axis("off")
    _show(axes[r, 1], np.asarray(projection[0, ..., 0]),
          f"{plane} projection")
    for c, k in enumerate(kernel_sizes):
      pooled = np.asarray(losses.max_pool_2d(projection, k, k)[0, ..., 0])
      _show(axes[r, 2 + c], pooled, f"k={k}: Σ={pooled.sum():.1f}")
  fig.suptitle("Projected pooling: max projections, then k×k max pooling; "
               "the loss compares the sums Σ", fontsize=10)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _show(ax, image, title):
  ax.imshow(np.asarray(image).T, origin="lower", cmap="gray", vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_title(title, fontsize=8)
  ax.set_xticks([])  # Keep the frame: an all-white map must still show.
  ax.set_yticks([])


def qualitative_figure(image: np.ndarray, label: np.ndarray,
                       predictions: Mapping[str, np.ndarray],
                       path: str | os.PathLike, *, title: str = "") -> None:
  """One axial slice: the image, the label and each setting's prediction.

  The slice is the one where the settings' masks disagree most with the
  label, so spurious components, when there are any, are in view.

  Args:
    image: ``(X, Y, Z)`` intensities.
    label: binary ``(X, Y, Z)``.
    predictions: setting name → binary ``(X, Y, Z)`` mask.
    path: PNG to write.
    title: figure title, e.g. the case id.
  """
  errors = sum(np.logical_xor(p > 0, label > 0).sum(axis=(0, 1))
               for p in predictions.values())
  z = int(np.argmax(errors))
  panels = {"image": None, "label": label, **predictions}
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9),
                           constrained_layout=True)
  for ax, (name, mask) in zip(axes, panels.items()):
    ax.imshow(image[:, :, z].T, origin="lower", cmap="gray",
              interpolation="nearest")
    if mask is not None:
      overlay = np.ma.masked_equal((mask[:, :, z] > 0).T.astype(float), 0)
      ax.imshow(overlay, origin="lower", cmap="autumn", alpha=0.55,
                interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  fig.suptitle(f"{title} axial slice z={z}".strip(), fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curves_figure(phase1: Sequence[Mapping], phase2: Mapping[str, Sequence[Mapping]],
                  path: str | os.PathLike, *, title: str = "") -> None:
  """Training loss and validation Dice of phase 1, then each phase-2 variant.

  Args:
    phase1: the phase-1 log, one mapping per epoch with ``train_loss`` and
      ``val_dice``.
    phase2: variant name → its phase-2 log, same keys.
    path: PNG to write.
    title: figure title.
  """
  fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 3.6),
                                         constrained_layout=True)
  epochs1 = np.arange(1, len(phase1) + 1)
  for ax, key in ((loss_ax, "train_loss"), (dice_ax, "val_dice")):
    ax.plot(epochs1, [e[key] for e in phase1], color="k", label="phase 1 (Dice)")
    for name, log in phase2.items():
      epochs2 = len(phase1) + np.arange(1, len(log) + 1)
      ax.plot(epochs2, [e[key] for e in log], label=f"phase 2: {name}")
    ax.axvline(len(phase1) + 0.5, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
  loss_ax.set_ylabel("training loss (own objective)")
  loss_ax.set_yscale("log")
  dice_ax.set_ylabel("validation Dice")
  dice_ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def projections_figure(label: np.ndarray, predictions: Mapping[str, np.ndarray],
                       path: str | os.PathLike, *, title: str = "") -> None:
  """Maximum projections along Z of the label and each setting's mask.

  Args:
    label: binary ``(X, Y, Z)``.
    predictions: setting name → binary ``(X, Y, Z)`` mask, with a subtitle
      of its own (e.g. its Betti numbers) after a newline in the name.
    path: PNG to write.
    title: figure title, e.g. the case id.
  """
  panels = {"label": label, **predictions}
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6),
                           constrained_layout=True)
  for ax, (name, mask) in zip(axes, panels.items()):
    _show(ax, (np.asarray(mask) > 0).max(axis=2), name)
  fig.suptitle(f"{title} maximum over Z".strip(), fontsize=10)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def topology_time_figure(tasks: Mapping[str, Mapping[str, Mapping]],
                         path: str | os.PathLike) -> None:
  """Topology errors against phase-2 training time, a point per loss.

  Args:
    tasks: task name → setting name → ``{"seconds": {"mean", "std"},
      "betti0_error": {...}, "betti1_error": {...}}``, means and standard
      deviations over seeds.
    path: PNG to write.
  """
  errors = (("betti0_error", "|Δβ0|, components", "o"),
            ("betti1_error", "|Δβ1|, tunnels", "s"))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4),
                           constrained_layout=True, squeeze=False)
  for ax, (task, rows) in zip(axes[0], tasks.items()):
    for i, row in enumerate(rows.values()):
      for key, _, marker in errors:
        ax.errorbar(row["seconds"]["mean"], row[key]["mean"],
                    xerr=row["seconds"]["std"], yerr=row[key]["std"],
                    fmt=marker, color=f"C{i}", capsize=2, markersize=7,
                    markerfacecolor=f"C{i}" if marker == "o" else "none")
    ax.set_xlabel("phase-2 training time, s (steady-state epochs)")
    ax.set_ylabel("error per test case (mean ± sd over seeds)")
    ax.set_title(f"task {task!r}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
  names = list(next(iter(tasks.values())))
  handles = [plt.Line2D([], [], marker="o", color=f"C{i}", linestyle="",
                        label=name) for i, name in enumerate(names)]
  handles += [plt.Line2D([], [], marker=m, color="0.3", linestyle="",
                         markerfacecolor="0.3" if m == "o" else "none",
                         label=label) for _, label, m in errors]
  fig.legend(handles=handles, loc="outside right center", fontsize=8)
  fig.suptitle("Topology errors against training cost (lower left is "
               "better)", fontsize=10)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def intervals_figure(tasks: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
                     path: str | os.PathLike, *, baseline: str,
                     keys: Sequence[str] = ("dice", "cldice", "betti0_error",
                                            "betti1_error", "betti_error")
                     ) -> None:
  """Paired differences from ``baseline`` with their 95 % intervals.

  Args:
    tasks: task → setting → metric key → ``experiments.paired.compare``'s
      dict with ``verdict``.
    path: PNG to write.
    baseline: the setting the differences are taken from, for the title.
    keys: metrics to show, one column each.
  """
  from experiments import paired

  colours = {"better": "tab:green", "worse": "tab:red", "no evidence": "0.4"}
  fig, axes = plt.subplots(len(tasks), len(keys),
                           figsize=(2.9 * len(keys), 0.5 + 2.2 * len(tasks)),
                           constrained_layout=True, squeeze=False)
  for row, (task, settings) in zip(axes, tasks.items()):
    names = list(settings)
    for ax, key in zip(row, keys):
      for y, name in enumerate(names):
        r = settings[name][key]
        ax.errorbar(r["mean"], y, xerr=[[r["mean"] - r["low"]],
                                        [r["high"] - r["mean"]]],
                    fmt="o", color=colours[r["verdict"]], capsize=3)
      ax.axvline(0, color="k", lw=0.8)
      ax.set_yticks(range(len(names)), names if ax is row[0] else [],
                    fontsize=8)
      ax.invert_yaxis()
      title, lower = paired.METRICS[key]
      ax.set_title(f"{task}: Δ {title.replace(chr(92), '')} "
                   f"({'lower' if lower else 'higher'} is better)",
                   fontsize=8)
      ax.grid(alpha=0.3, axis="x")
  fig.suptitle(f"Difference from {baseline} per test case (mean over seeds), "
               "95 % bootstrap interval; green better, red worse, grey no "
               "evidence", fontsize=9)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def validation_curves_figure(tasks: Mapping[str, Mapping[str, np.ndarray]],
                             path: str | os.PathLike, *, phase1: str) -> None:
  """Validation Dice per epoch, mean over seeds: phase 1, then each
  phase-2 setting from phase 1's best epoch.

  Args:
    tasks: task → setting name → ``(seeds, epochs)`` validation Dice; the
      setting ``phase1`` is phase 1's.
    path: PNG to write.
    phase1: the name of phase 1's setting.
  """
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6),
                           constrained_layout=True, squeeze=False)
  for ax, (task, curves) in zip(axes[0], tasks.items()):
    first = np.asarray(curves[phase1]).mean(0)
    ax.plot(np.arange(1, first.size + 1), first, color="k", label=phase1)
    for i, (name, curve) in enumerate(
        (n, c) for n, c in curves.items() if n != phase1):
      mean = np.asarray(curve).mean(0)
      ax.plot(first.size + np.arange(1, mean.size + 1), mean, marker=".",
              color=f"C{i}", label=name)
    ax.axvline(first.size + 0.5, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (mean over seeds)")
    ax.set_title(f"task {task!r}", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7, loc="lower right")
  fig.savefig(path, dpi=100)
  plt.close(fig)
