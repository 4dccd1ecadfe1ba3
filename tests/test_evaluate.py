"""Tests for topojax/evaluate.py and `topojax evaluate`."""

import ast
import csv
import json
import math
import pathlib

import nibabel as nib
import numpy as np
import pytest

from topojax import cli
from topojax import evaluate
from topojax.evaluate import Case

SHAPE = (10, 10, 6)
SPACING = (0.8, 0.8, 2.5)
AFFINE = np.diag([*SPACING, 1.0])
VOXEL_MM3 = 0.8 * 0.8 * 2.5


def _cube(start, size, value=1, shape=SHAPE):
  volume = np.zeros(shape, np.uint8)
  volume[tuple(slice(s, s + size) for s in start)] = value
  return volume


# Ground truth: a 4-voxel cube (64 voxels). Predictions with known overlap:
# the same cube (Dice 1), and the cube shifted by 2 along X (32 of 64 shared,
# Dice 0.5).
GT = _cube((2, 2, 1), 4)
SAME = GT.copy()
SHIFTED = _cube((4, 2, 1), 4)


def test_evaluate_cases_rows_and_means_by_hand():
  rows, summary = evaluate.evaluate_cases(
      [Case("a", GT, SAME, SPACING), Case("b", GT, SHIFTED, SPACING)])
  assert [(row["case"], row["class"], row["status"]) for row in rows] == [
      ("a", 1, "ok"), ("b", 1, "ok")]
  assert [row["dice"] for row in rows] == [1.0, 0.5]
  stats = summary[1]
  assert (stats["cases"], stats["evaluated"], stats["missing"]) == (2, 2, [])
  assert stats["metrics"]["dice"] == {"mean": 0.75, "std": 0.25, "n": 2,
                                      "n_inf": 0}
  assert stats["metrics"]["precision"]["mean"] == 0.75
  assert rows[1]["volume_gt_mm3"] == pytest.approx(64 * VOXEL_MM3)
  # Both predictions have the ground truth's volume, which never varies.
  assert math.isnan(stats["pearson_r"])


def test_breaks_missed_and_spurious_per_case():
  # The cube cut in two by an empty plane, plus a speck far from it: one
  # break and one spurious component; an empty prediction misses the cube.
  cut = GT.copy()
  cut[4] = 0
  cut[9, 9, 5] = 1
  rows, summary = evaluate.evaluate_cases(
      [Case("cut", GT, cut, SPACING),
       Case("none", GT, np.zeros_like(GT), SPACING)])
  assert [(r["breaks"], r["missed"], r["spurious"]) for r in rows] == [
      (1, 0, 1), (0, 1, 0)]
  assert summary[1]["metrics"]["breaks"]["mean"] == 0.5
  assert "| Breaks | Missed | Spurious |" in evaluate.markdown_table(
      {"run": summary})


def test_pearson_r_is_over_the_cases_volumes():
  gts = [_cube((0, 0, 0), size) for size in (2, 3, 4)]
  preds = [_cube((0, 0, 0), size) for size in (3, 3, 5)]
  _, summary = evaluate.evaluate_cases(
      [Case(str(i), g, p, SPACING) for i, (g, p) in enumerate(zip(gts, preds))])
  # Volumes 8, 27, 64 against 27, 27, 125 voxels (times one voxel's mm^3,
  # which r ignores).
  expected = np.corrcoef([8, 27, 64], [27, 27, 125])[0, 1]
  assert summary[1]["pearson_r"] == pytest.approx(expected)


def test_missing_and_infinite_cases_are_counted_not_dropped():
  empty = np.zeros(SHAPE, np.uint8)
  rows, summary = evaluate.evaluate_cases([
      Case("a", GT, SAME, SPACING),
      Case("b", GT, None, SPACING),
      Case("c", GT, empty, SPACING),
  ])
  assert [row["status"] for row in rows] == ["ok", "missing", "ok"]
  assert set(rows[1]) == {"case", "class", "status"}
  stats = summary[1]
  assert (stats["cases"], stats["evaluated"], stats["missing"]) == (3, 2, ["b"])
  # Dice: 1 and 0. 95HD: 0 and +inf, the mean over the finite one only.
  assert stats["metrics"]["dice"]["mean"] == 0.5
  assert stats["metrics"]["hd95_mm"] == {"mean": 0.0, "std": 0.0, "n": 1,
                                         "n_inf": 1}
  table = evaluate.markdown_table({"run": summary})
  # clDice beside Dice: 1 and 0 as well.
  assert ("| run | 2/3 | 0.500 ± 0.500 | 0.500 ± 0.500 | 0.000 ± 0.000 "
          "(+1 inf) |") in table
  assert "- run: no prediction for b." in table


def test_multi_class_rows_per_class():
  label = GT + _cube((0, 0, 0), 2, value=2)
  pred = SHIFTED + _cube((0, 0, 0), 2, value=2)
  rows, summary = evaluate.evaluate_cases([Case("a", label, pred, SPACING)],
                                          classes=(1, 2))
  assert [(row["class"], row["dice"]) for row in rows] == [(1, 0.5), (2, 1.0)]
  assert sorted(summary) == [1, 2]
  table = evaluate.markdown_table({"run": summary})
  assert "| run, class 1 |" in table and "| run, class 2 |" in table


def test_keep_largest_removes_a_spurious_blob_before_measuring():
  pred = SAME.copy()
  pred[9, 9, 5] = 1
  case = Case("a", GT, pred, SPACING)
  (raw,), _ = evaluate.evaluate_cases([case])
  (cleaned,), summary = evaluate.evaluate_cases([case], keep_largest=1)
  assert (raw["cce_3d"], cleaned["cce_3d"]) == (1, 0)
  assert cleaned["dice"] == 1.0
  assert summary[1]["keep_largest"] == 1
  assert "kept the 1 largest components" in evaluate.markdown_table(
      {"run": summary})


@pytest.mark.parametrize("pred, label, message", [
    (SAME * 2, GT, "case 'x': the prediction has values \\[2\\]"),
    (SAME, GT.astype(float) * 0.5, "case 'x': the label has values \\[0.5\\]"),
    (SAME[:5], GT, "case 'x': prediction \\(5, 10, 6\\) and label"),
    (SAME[..., 0], GT[..., 0], "case 'x': prediction .* same 3D shape"),
])
def test_bad_case_names_the_case(pred, label, message):
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate_cases([Case("x", label, pred, SPACING)])


def test_bad_spacing_names_the_case():
  with pytest.raises(ValueError, match="case 'x': spacing must be 3"):
    evaluate.evaluate_cases([Case("x", GT, SAME, (1.0, 1.0))])


@pytest.mark.parametrize("options, message", [
    ({"classes": ()}, "classes must be distinct positive"),
    ({"classes": (0, 1)}, "classes must be distinct positive"),
    ({"classes": (1, 1)}, "classes must be distinct positive"),
    ({"keep_largest": 0}, "keep_largest must be None or a positive"),
])
def test_bad_options_fail_before_any_case_is_read(options, message):
  def cases():
    raise AssertionError("a case was read")
    yield
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate_cases(cases(), **options)


def _write(folder, case_id, volume, affine=AFFINE, suffix=".nii.gz"):
  folder.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(volume, affine), folder / f"{case_id}{suffix}")


@pytest.fixture
def task(tmp_path):
  """Labels for cases a, b, c; run one predicts a and b, run two a, b, c."""
  labels, one, two = (tmp_path / name for name in ("labels", "one", "two"))
  for case_id in "abc":
    _write(labels, case_id, GT)
  _write(one, "a", SAME)
  _write(one, "b", SHIFTED, suffix=".nii")
  for case_id in "abc":
    _write(two, case_id, SAME)
  # A macOS metadata file as found in the MSD archives: not a case.
  (two / "._a.nii.gz").write_bytes(b"\0\0")
  return tmp_path


def test_evaluate_runs_side_by_side(task):
  results = evaluate.evaluate_runs(
      {"Dice 150": task / "one", "PPL 150+150": task / "two"},
      task / "labels")
  one_rows, one_summary = results["Dice 150"]
  assert [(row["case"], row["status"]) for row in one_rows] == [
      ("a", "ok"), ("b", "ok"), ("c", "missing")]
  assert [row["dice"] for row in one_rows[:2]] == [1.0, 0.5]
  # The spacing comes from the label's header.
  assert one_rows[0]["volume_gt_mm3"] == pytest.approx(64 * VOXEL_MM3)
  assert one_summary[1]["missing"] == ["c"]
  two_rows, _ = results["PPL 150+150"]
  assert [row["dice"] for row in two_rows] == [1.0, 1.0, 1.0]


def test_case_ids_restrict_the_expected_cases(task):
  results = evaluate.evaluate_runs({"one": task / "one"}, task / "labels",
                                   case_ids=["b"])
  rows, summary = results["one"]
  assert [row["case"] for row in rows] == ["b"]
  assert summary[1]["missing"] == []


def test_report_files(task):
  out = task / "report"
  evaluate.evaluate_runs({"Dice 150": task / "one", "PPL": task / "two"},
                         task / "labels", out_dir=out)
  assert sorted(p.name for p in out.iterdir()) == sorted(
      evaluate.REPORT_FILES)
  with open(out / "cases.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(row["run"], row["case"], row["status"]) for row in rows] == [
      ("Dice 150", "a", "ok"), ("Dice 150", "b", "ok"),
      ("Dice 150", "c", "missing"),
      ("PPL", "a", "ok"), ("PPL", "b", "ok"), ("PPL", "c", "ok")]
  assert float(rows[1]["dice"]) == 0.5 and rows[2]["dice"] == ""

  def reject(token):
    raise AssertionError(f"non-standard JSON token {token}")
  summary = json.loads((out / "summary.json").read_text(),
                       parse_constant=reject)
  assert summary["Dice 150"]["1"]["metrics"]["dice"]["mean"] == 0.75
  assert summary["PPL"]["1"]["pearson_r"] is None  # constant volumes
  table = (out / "table.md").read_text()
  assert table.index("| Dice 150 | 2/3 |") < table.index("| PPL | 3/3 |")
  assert (out / "cases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_columns_follow_table_2():
  _, summary = evaluate.evaluate_cases([Case("a", GT, SAME, SPACING)])
  header = evaluate.markdown_table({"run": summary}).splitlines()[0]
  assert [cell.strip() for cell in header.strip("|").split(" | ")] == [
      "Run", "n", "Dice", "clDice", "95HD (mm)", "Precision", "Recall",
      "MVER", "MAVER", "Pearson's r", "2D CCE", "3D CCE", r"\|Δβ0\|",
      r"\|Δβ1\|", r"\|Δβ2\|", "Breaks", "Missed", "Spurious"]
  # Table 2 itself (experiments/reproduce.py prints it) keeps the paper's
  # columns: clDice is the report's addition only.
  assert [title for _, title in evaluate.TABLE_COLUMNS] == [
      "Dice", "95HD (mm)", "Precision", "Recall", "MVER", "MAVER",
      "Pearson's r", "2D CCE", "3D CCE", r"\|Δβ0\|", r"\|Δβ1\|",
      r"\|Δβ2\|"]
  assert summary[1]["metrics"]["cldice"] == {
      "mean": 1.0, "std": 0.0, "n": 1, "n_inf": 0}


def test_report_refuses_to_overwrite_before_any_work(task):
  out = task / "report"
  out.mkdir()
  (out / "table.md").write_text("mine")
  with pytest.raises(FileExistsError, match="table.md"):
    # The prediction folder does not exist: the overwrite check comes first.
    evaluate.evaluate_runs({"x": task / "nowhere"}, task / "labels",
                           out_dir=out)
  assert (out / "table.md").read_text() == "mine"
  evaluate.evaluate_runs({"x": task / "one"}, task / "labels", out_dir=out,
                         overwrite=True)
  assert "| x | 2/3 |" in (out / "table.md").read_text()


def test_prediction_without_label_names_the_case(task):
  _write(task / "one", "d", SAME)
  with pytest.raises(ValueError, match=r"no label .*\['d'\]"):
    evaluate.evaluate_runs({"one": task / "one"}, task / "labels")


def test_shape_mismatch_names_the_case_before_reading_voxels(task):
  _write(task / "two", "b", SAME[:, :, :5])
  with pytest.raises(ValueError, match=r"case 'b': prediction .* shape"):
    # Run "one" is fine, but nothing is computed before all runs pair up.
    evaluate.evaluate_runs({"one": task / "one", "two": task / "two"},
                           task / "labels")


@pytest.mark.parametrize("shift_mm, fails", [(1e-5, False), (0.1, True)])
def test_affine_tolerance(task, shift_mm, fails):
  affine = AFFINE.copy()
  affine[0, 3] += shift_mm
  _write(task / "one", "a", SAME, affine=affine)
  if fails:
    with pytest.raises(ValueError, match="case 'a': the affines"):
      evaluate.evaluate_runs({"one": task / "one"}, task / "labels")
  else:
    evaluate.evaluate_runs({"one": task / "one"}, task / "labels")


@pytest.mark.parametrize("folders, error, message", [
    ({"x": "nowhere"}, FileNotFoundError, "pred_dir: no such folder"),
    ({"x": "empty"}, FileNotFoundError, "pred_dir: no .nii"),
    ({}, ValueError, "give at least one run"),
])
def test_bad_folders(task, folders, error, message):
  (task / "empty").mkdir()
  with pytest.raises(error, match=message):
    evaluate.evaluate_runs({k: task / v for k, v in folders.items()},
                           task / "labels")


def test_unknown_case_id(task):
  with pytest.raises(FileNotFoundError, match=r"case_ids: .*\['zz'\]"):
    evaluate.evaluate_runs({"one": task / "one"}, task / "labels",
                           case_ids=["a", "zz"])


def test_cli_evaluate(task, capsys):
  split = task / "split.json"
  split.write_text(json.dumps(
      {"train": ["c"], "val": [], "test": ["a", "b"], "seed": 0}))
  status = cli.main([
      "evaluate", "--pred", f"Dice 150={task / 'one'}",
      "--pred", str(task / "two"), "--labels", str(task / "labels"),
      "--split", str(split), "--keep-largest", "1", "--out",
      str(task / "report")])
  out = capsys.readouterr().out
  assert status == 0
  assert "| Dice 150 | 2/2 |" in out
  assert f"| {task / 'two'} | 2/2 |" in out
  assert (task / "report" / "table.md").exists()
  # A second run into the same folder is refused, in one line.
  status = cli.main(["evaluate", "--pred", str(task / "one"), "--labels",
                     str(task / "labels"), "--out", str(task / "report")])
  assert status == 2
  assert "error: --out" in capsys.readouterr().err


def test_cli_never_replaces_a_report_silently(task, capsys):
  report = task / "report"
  first = ["evaluate", "--pred", f"first={task / 'one'}", "--labels",
           str(task / "labels"), "--out", str(report)]
  assert cli.main(first) == 0
  before = {p.name: p.read_bytes() for p in report.iterdir()}
  assert sorted(before) == sorted(evaluate.REPORT_FILES)
  capsys.readouterr()
  second = ["evaluate", "--pred", f"second={task / 'two'}", "--labels",
            str(task / "labels"), "--out", str(report)]
  assert cli.main(second) == 2
  captured = capsys.readouterr()
  # One line naming the options to use, and no evaluation was run.
  assert captured.err.count("\n") == 1
  assert "--out" in captured.err and "--overwrite" in captured.err
  assert "out_dir" not in captured.err
  assert "second" not in captured.out
  assert {p.name: p.read_bytes() for p in report.iterdir()} == before
  assert cli.main(second + ["--overwrite"]) == 0
  table = (report / "table.md").read_text()
  assert "| second | 3/3 |" in table and "first" not in table


def test_cli_rejects_two_runs_with_one_name(task, capsys):
  status = cli.main(["evaluate", "--pred", f"a={task / 'one'}",
                     "--pred", f"a={task / 'two'}",
                     "--labels", str(task / "labels")])
  assert status == 2
  assert "two runs are named 'a'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["metrics", "postprocess", "evaluate"])
def test_evaluation_needs_neither_jax_nor_the_model(module):
  # DESIGN.md §2: evaluation works on NumPy masks with SciPy (and
  # topojax's own thinning, NumPy and numba, for clDice's skeletons).
  path = pathlib.Path(evaluate.__file__).with_name(f"{module}.py")
  imported = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module)
      if node.module == "topojax":
        imported.update(f"topojax.{alias.name}" for alias in node.names)
  roots = {name.split(".")[0] for name in imported}
  assert not roots & {"jax", "flax", "optax", "orbax", "torch"}
  assert {name for name in imported if name.startswith("topojax.")} <= {
      "topojax.metrics", "topojax.postprocess", "topojax.skeleton"}
