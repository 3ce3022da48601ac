"""Where the package's data folders are: ``mod/`` (NMODL) and ``models/`` (bundled checkpoints).

The repository keeps both at its top level; a wheel or ``pip install .`` maps them into the
package (``lfdeep_neuron/mod``, ``lfdeep_neuron/models``; see ``setup.py``). An editable install
(``pip install -e .``) and a plain checkout use the top-level folders.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["candidates", "find"]

_PACKAGE = Path(__file__).resolve().parent


def candidates(name: str) -> list[Path]:
    """The folders searched for data folder ``name``, in order: installed package, then checkout."""
    return [_PACKAGE / name, _PACKAGE.parent / name]


def find(name: str, pattern: str = "*") -> Path | None:
    """The first of :func:`candidates` holding a file matching ``pattern``; None if there is none."""
    for folder in candidates(name):
        if folder.is_dir() and any(folder.glob(pattern)):
            return folder
    return None
