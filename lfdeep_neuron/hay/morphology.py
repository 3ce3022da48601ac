"""Morphology of the Hay L5PC: Neurolucida import, structure checks, placement in space.

The cell is read with NEURON's own Neurolucida-v3 reader (Import3d), exactly as the original
template does (BIOPHYSICS.md §1.1), into a Python object: the reader creates the section arrays
``soma``, ``dend``, ``apic``, ``axon`` and the list ``all`` as attributes of that object, and NEURON
names the sections ``<owner>.soma[0]`` etc., so several cells coexist in one process.

Placement (for networks and LFP) is a rigid motion of the 3-D points about the soma centre::

    p' = R (p - c) + c + position_um

with ``c`` the soma centre (soma(0.5)) in the file's coordinates. Rotation and translation preserve
lengths; the only change to the electrical geometry is NEURON's float32 storage of the moved points
(relative changes of L and area below 1e-6, see the tests).

Units: µm throughout.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from lfdeep_neuron.errors import InputError

__all__ = [
    "MorphologyError",
    "check_morphology",
    "resolve_morphology_path",
    "import_neurolucida",
    "rotation_matrix",
    "place_points",
    "EXPECTED_SECTIONS",
]

#: Section arrays the Hay morphology file yields (before the axon is replaced), BIOPHYSICS.md §1.1.
EXPECTED_SECTIONS = {"soma": 1, "dend": 84, "apic": 109}

MORPHOLOGY_ENV = "LFDEEP_HAY_MORPHOLOGY"


class MorphologyError(InputError):
    """The morphology file is missing, unreadable or not the Hay L5PC; the message says which."""


def resolve_morphology_path(morphology=None) -> Path:
    """Return the morphology path from the argument or ``$LFDEEP_HAY_MORPHOLOGY``.

    Raises
    ------
    MorphologyError
        No path given and the variable unset, the file missing, a directory, or unreadable.
    """
    if morphology is None:
        env = os.environ.get(MORPHOLOGY_ENV)
        if not env:
            raise MorphologyError(
                "no Hay morphology given: pass HayL5PC(morphology='.../cell1.asc') or set "
                f"${MORPHOLOGY_ENV} (the file is third-party data and is not in the repository)")
        morphology = env
    path = Path(morphology).expanduser()
    if not path.exists():
        raise MorphologyError(f"morphology file {path} does not exist")
    if not path.is_file():
        raise MorphologyError(f"morphology path {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise MorphologyError(f"morphology file {path} cannot be read: {exc.strerror or exc}") from exc
    if not head.strip():
        raise MorphologyError(f"morphology file {path} is empty")
    if b"\x00" in head:
        raise MorphologyError(f"morphology file {path} is binary, not a Neurolucida ASCII (.asc) file")
    return path


@contextlib.contextmanager
def _captured_stdout():
    """Capture what C code (hoc's printf) writes to fd 1; yields a callable returning the text."""
    sys.stdout.flush()
    saved = os.dup(1)
    buf = tempfile.TemporaryFile(mode="w+b")
    text = []
    try:
        os.dup2(buf.fileno(), 1)
        yield lambda: "".join(text)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        buf.seek(0)
        text.append(buf.read().decode("utf-8", "replace"))
        buf.close()


def import_neurolucida(owner, path: Path) -> None:
    """Read a Neurolucida v3 ASCII file with Import3d into ``owner``.

    Afterwards ``owner`` has the attributes ``soma``, ``dend``, ``apic``, ``axon`` (lists of
    sections) and ``all``. The reader's complaints are captured and put into the error message.

    Raises
    ------
    MorphologyError
        The reader fails, or the result lacks the Hay structure (1 soma, 84 dend, 109 apic sections
        and at least one axon section).
    """
    from neuron import h

    h.load_file("import3d.hoc")
    with _captured_stdout() as output:
        try:
            reader = h.Import3d_Neurolucida3()
            reader.quiet = 1
            reader.input(str(path))
            gui = h.Import3d_GUI(reader, 0)
            gui.instantiate(owner)
            error = None
        except RuntimeError as exc:  # hoc errors surface as RuntimeError
            error = exc
    messages = output().strip()
    detail = f"; reader output: {messages[:500]}" if messages else ""
    if error is not None:
        raise MorphologyError(f"morphology file {path} could not be read by NEURON's Neurolucida "
                              f"reader ({error}){detail}")
    counts = {name: len(getattr(owner, name, []) or []) for name in ("soma", "dend", "apic", "axon")}
    wrong = {k: (counts[k], n) for k, n in EXPECTED_SECTIONS.items() if counts[k] != n}
    if wrong or counts["axon"] < 1:
        got = ", ".join(f"{counts[k]} {k}" for k in counts)
        want = ", ".join(f"{n} {k}" for k, n in EXPECTED_SECTIONS.items()) + ", >=1 axon"
        raise MorphologyError(
            f"morphology file {path} does not have the Hay L5PC structure: NEURON's Neurolucida reader "
            f"made {got} sections, expected {want} (is it Hay's cell1.asc?){detail}")


def check_morphology(morphology) -> Path:
    """Resolve and read a morphology with :func:`import_neurolucida` into a throwaway owner (no mechanisms
    needed), raising :class:`MorphologyError` as building the cell would; its sections are freed again."""

    class _Owner:
        pass

    path = resolve_morphology_path(morphology)
    owner = _Owner()
    import_neurolucida(owner, path)
    del owner
    return path


def rotation_matrix(rotation) -> np.ndarray:
    """A 3x3 rotation matrix from ``rotation``.

    Parameters
    ----------
    rotation : None, (3, 3) array-like or 3 angles (rad)
        None: identity. Three numbers ``(rx, ry, rz)``: rotations about the x, then y, then z axis
        (``R = Rz @ Ry @ Rx``). A 3x3 matrix is used as given after checking it is a proper rotation.
    """
    if rotation is None:
        return np.eye(3)
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape == (3,):
        cx, cy, cz = np.cos(r)
        sx, sy, sz = np.sin(r)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        return rz @ ry @ rx
    if r.shape == (3, 3):
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-9) or not np.isclose(np.linalg.det(r), 1.0, atol=1e-9):
            raise ValueError("rotation: a 3x3 matrix must be orthonormal with determinant +1")
        return r
    raise ValueError(f"rotation must be None, 3 angles (rad) or a 3x3 matrix, got shape {r.shape}")


def place_points(xyz_um, centre_um, position_um=(0.0, 0.0, 0.0), rotation=None) -> np.ndarray:
    """Apply the cell placement ``p' = R (p - c) + c + position_um`` to points ``xyz_um`` [..., 3].

    NaN rows (e.g. the axon stubs, which have no 3-D points) stay NaN.
    """
    xyz = np.asarray(xyz_um, dtype=np.float64)
    c = np.asarray(centre_um, dtype=np.float64)
    pos = np.asarray(position_um, dtype=np.float64)
    if pos.shape != (3,):
        raise ValueError(f"position_um must be 3 numbers (µm), got {position_um!r}")
    return (xyz - c) @ rotation_matrix(rotation).T + c + pos
