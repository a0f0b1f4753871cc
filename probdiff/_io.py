"""File-system helpers: output folders that never silently overwrite what a user saved."""

from __future__ import annotations

import json
import os
from pathlib import Path


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not asked for."""


def prepare_out_dir(path, filenames, *, overwrite: bool = False) -> Path:
    """Create ``path`` if needed and check that none of ``filenames`` exists in it.

    Only the named files are ever written; other files in the folder are left alone.

    Raises:
        OutputExistsError: a file to be written exists and ``overwrite`` is False.
        NotADirectoryError: ``path`` exists and is not a folder.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    clashes = [name for name in filenames if (out / name).exists()]
    if clashes and not overwrite:
        raise OutputExistsError(
            f"output folder {out} already holds {', '.join(clashes)}; choose another folder "
            "with --out, or pass --overwrite to replace these files"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
