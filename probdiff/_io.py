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


def parse_example_args(parser, argv, full: dict, tiny: dict):
    """``parser.parse_args(argv)``, every option left unset taken from ``tiny`` (with ``--tiny``) or ``full``.

    The example scripts' sizes: a flag given explicitly always wins.
    """
    args = parser.parse_args(argv)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def parse_widths(parser, text: str, flag: str = "--hidden") -> tuple[int, ...]:
    """Comma-separated positive layer widths such as ``"128,128"``; a parser error names ``flag`` otherwise."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        parser.error(f"{flag} must be comma-separated widths, e.g. 128,128; got {text!r}")
    if min(widths) < 1:
        parser.error(f"{flag} must be positive widths; got {text!r}")
    return widths
