"""The files a benchmark writes, never replaced without ``--overwrite``."""

from __future__ import annotations

from collections.abc import Sequence
import pathlib


def claim(paths: Sequence[pathlib.Path], *, overwrite: bool) -> None:
  """Makes the folders of ``paths``; raises ``FileExistsError`` naming those
  that exist unless ``overwrite``, before anything is measured."""
  existing = [str(p) for p in paths if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f"{', '.join(existing)} already exist; pass --overwrite to replace "
        "them or --out for another folder")
  for folder in {pathlib.Path(p).parent for p in paths}:
    folder.mkdir(parents=True, exist_ok=True)
