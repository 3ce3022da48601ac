"""Shared fixtures: where the third-party Hay material lives.

The Hay morphology is third-party data and is not part of the repository.
Tests find it at ``../shared/hay/cell1.asc`` (next to the checkout) or at
``$LFDEEP_HAY_MORPHOLOGY``, and skip with that reason when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_HAY = REPO.parent / "shared" / "hay"

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _morphology_path() -> Path | None:
    env = os.environ.get("LFDEEP_HAY_MORPHOLOGY")
    for cand in ([Path(env)] if env else []) + [SHARED_HAY / "cell1.asc"]:
        if cand.is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def morphology() -> Path:
    path = _morphology_path()
    if path is None:
        pytest.skip("Hay morphology cell1.asc not found (third-party data, not in the repo): "
                    "expected at ../shared/hay/cell1.asc or $LFDEEP_HAY_MORPHOLOGY")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    d = SHARED_HAY / "reference"
    if not d.is_dir():
        pytest.skip("reference recordings not found at ../shared/hay/reference "
                    "(made by the original Hay implementation; not in the repo)")
    return d
