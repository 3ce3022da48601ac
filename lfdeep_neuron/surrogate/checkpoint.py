"""Surrogate checkpoints: one ``torch.save`` dict with everything needed to use a model on its own.

Contents (docs/ARCHITECTURE.md, "Checkpoint contents")::

    format        "lfdeep-neuron-surrogate"        version   1
    arch          "mh" | "mmoe" | "mmoeex"          config    SurrogateConfig as a dict
    state_dict    network weights (CPU)             normalization  {"v_mean", "v_std", "v_rest" [S] mV,
                                                                    ("imem_mean", "imem_std" [S] nA)}
    segments      segment table (keys of a record's segments/ group)
    synapses      channel table (keys of a record's synapses/ group)
    dt_ms         surrogate step (ms)               provenance  data, NEURON version, code, training
    metrics       measured accuracy (free-form dict of numbers)
    (spike_waveform) optional: the per-segment action-potential waveform added at emitted spikes
                  (:meth:`~lfdeep_neuron.surrogate.waveform.SpikeWaveform.to_payload`; absent = none;
                  ``lfdeep-neuron waveform`` writes it, :func:`write_spike_waveform`)
    (train_state) optimizer / step / RNG, only in the ``CKPT.last`` files written during training

Tables are stored as tensors (numeric columns) and lists of str (string columns), so the file loads with
``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code.

:func:`load_surrogate` checks all of it and raises a :class:`CheckpointError` subclass naming what is
wrong: :class:`CorruptCheckpointError` (unreadable, truncated, not a surrogate checkpoint, missing keys),
:class:`ArchitectureError` (unknown arch, weights that do not fit the arch/config),
:class:`SegmentMismatchError` (segment counts or names disagree), :class:`ChannelMismatchError`,
:class:`NormalizationError` (missing or malformed normalisation).
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from lfdeep_neuron import resources
from lfdeep_neuron.errors import InputError
from lfdeep_neuron.surrogate.mtl import ARCHS, Surrogate, SurrogateConfig
from lfdeep_neuron.surrogate.waveform import SpikeWaveform

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "load_surrogate", "CheckpointError",
           "CorruptCheckpointError", "ArchitectureError", "SegmentMismatchError", "ChannelMismatchError",
           "NormalizationError", "NoBundledModelError", "atomic_torch_save", "bundled_checkpoint", "MODELS_DIR",
           "write_spike_waveform", "resolve_checkpoint", "checkpoint_argument"]

#: Bundled checkpoints: ``lfdeep_neuron/models`` of an installed wheel, else ``models/`` at the top of the
#: checkout (editable install); ``DEFAULT`` in it names the recommended one.
MODELS_DIR = resources.find("models") or resources.candidates("models")[0]

FORMAT = "lfdeep-neuron-surrogate"
VERSION = 1
REQUIRED_KEYS = ("arch", "config", "state_dict", "normalization", "segments", "synapses", "dt_ms")


class CheckpointError(InputError):
    """A surrogate checkpoint cannot be used; the message names the file and the problem."""


class CorruptCheckpointError(CheckpointError):
    """Unreadable, truncated, or not an lfdeep-neuron surrogate checkpoint."""


class ArchitectureError(CheckpointError):
    """Unknown architecture, or weights that do not fit the stated architecture/configuration."""


class SegmentMismatchError(CheckpointError):
    """Segment counts or names disagree (config, weights, segment table, normalisation, expected cell)."""


class ChannelMismatchError(CheckpointError):
    """Input channel count disagrees between the config and the channel table."""


class NormalizationError(CheckpointError):
    """Normalisation missing, incomplete or invalid."""


class NoBundledModelError(CheckpointError):
    """No bundled checkpoint is installed where :func:`bundled_checkpoint` looked."""


# ---------------------------------------------------------------------------------------------------------
# Plain, weights_only-loadable payloads
# ---------------------------------------------------------------------------------------------------------
def _table_to_storable(table) -> dict:
    out = {}
    for k, v in dict(table).items():
        a = np.asarray(v)
        if a.dtype.kind in "US":
            out[k] = [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1).tolist()]
        elif a.dtype.kind == "O":
            out[k] = [str(x) for x in a.reshape(-1).tolist()]
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(a).copy())
    return out


def _table_from_storable(table) -> dict:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else np.array(v, dtype=str)) for k, v in table.items()}


def _plain(obj):
    """Numbers, strings, lists, dicts, tensors only (numpy scalars/arrays converted)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.kind in "USO" else torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, torch.Tensor):
        return obj
    for t in (bool, int, float, str):   # also downcasts subclasses (e.g. torch's TorchVersion str)
        if isinstance(obj, t):
            return t(obj)
    return str(obj)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_payload(model: Surrogate, *, segments, synapses, normalization=None, dt_ms: float = 1.0,
                       provenance=None, metrics=None, spike_waveform: SpikeWaveform | None = None) -> dict:
    """The checkpoint dict (see the module docstring) for ``model``."""
    if model.arch not in ARCHS:
        raise ValueError(f"model has unknown arch {model.arch!r}")
    norm = model.normalization() if normalization is None else normalization
    norm = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32).reshape(-1).clone() for k, v in norm.items()}
    raw = model.module if hasattr(model, "module") else model
    payload = {
        "format": FORMAT, "version": VERSION,
        "arch": raw.arch, "config": raw.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()},
        "normalization": norm,
        "segments": _table_to_storable(segments), "synapses": _table_to_storable(synapses),
        "dt_ms": float(dt_ms),
        "provenance": _plain(provenance or {}), "metrics": _plain(metrics or {}),
    }
    if spike_waveform is not None:
        payload["spike_waveform"] = _waveform_payload(spike_waveform, raw.n_segments)
    return payload


def _waveform_payload(wf: SpikeWaveform, n_segments: int) -> dict:
    if not isinstance(wf, SpikeWaveform):
        raise TypeError(f"spike_waveform must be a SpikeWaveform, got {type(wf).__name__}")
    if wf.n_segments != n_segments:
        raise ValueError(f"the spike waveform has {wf.n_segments} segments; the model {n_segments}")
    out = wf.to_payload()
    out["info"] = _plain(out["info"])
    return out


def save_checkpoint(path, model: Surrogate, *, segments, synapses, normalization=None, dt_ms: float = 1.0,
                    provenance=None, metrics=None, extra: dict | None = None,
                    spike_waveform: SpikeWaveform | None = None) -> Path:
    """Write a surrogate checkpoint atomically.

    Parameters
    ----------
    path : str or Path
    model : Surrogate
    segments, synapses : dict of array-like
        Segment and channel tables (keys of a record's ``segments/`` and ``synapses/`` groups).
    normalization : dict, optional
        ``v_mean``, ``v_std``, ``v_rest`` [S] (mV) (+ ``imem_mean``, ``imem_std`` [S] nA); default: the model's.
    dt_ms : float
        Surrogate step (ms).
    provenance, metrics : dict, optional
        Free-form (numbers, strings, lists, dicts); e.g. data set, NEURON version, measured RMSE.
    extra : dict, optional
        More top-level keys (the trainer stores ``train_state`` here).
    spike_waveform : SpikeWaveform, optional
        Action-potential waveform added at emitted spikes (:mod:`~lfdeep_neuron.surrogate.waveform`).
    """
    payload = checkpoint_payload(model, segments=segments, synapses=synapses, normalization=normalization,
                                 dt_ms=dt_ms, provenance=provenance, metrics=metrics,
                                 spike_waveform=spike_waveform)
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------
#: A pointer file (``models/DEFAULT``) is one short line; larger files are never read as one.
_POINTER_MAX_BYTES = 1024


def _file_kind(path: Path) -> str:
    """What a path that exists but is not a regular file is, in words."""
    import stat

    mode = path.stat().st_mode
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a file"


def _pointer_target(path: Path) -> Path | None:
    """The checkpoint a pointer file names (one line: a file name relative to its folder), else None."""
    if path.stat().st_size > _POINTER_MAX_BYTES or zipfile.is_zipfile(path):
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        return None
    if len(lines) != 1 or any(not c.isprintable() for c in lines[0]):
        return None
    target = path.parent / lines[0]
    if target.is_file():
        return target
    if lines[0].endswith(".pt"):                  # meant as a pointer, to a file that is not there
        raise FileNotFoundError(f"{path} names the surrogate checkpoint {lines[0]!r}, which does not exist "
                                f"({target})")
    return None


def resolve_checkpoint(path) -> Path:
    """The checkpoint file ``path`` stands for: ``path`` itself, or the file a pointer file names.

    A pointer file (such as ``models/DEFAULT``) holds one line, the name of a checkpoint relative to the
    pointer's folder (or an absolute path); pointers to pointers are followed. Raises
    ``FileNotFoundError`` ("does not exist") for a missing path or a pointer to a missing ``.pt`` file, and
    :class:`CheckpointError` ("is not a regular file") for a directory, a device (``/dev/null``) and the
    like. Whether the file is a readable checkpoint is :func:`load_checkpoint`'s to say.
    """
    path, seen = Path(path), []
    while True:
        if not path.exists():
            raise FileNotFoundError(f"surrogate checkpoint {path} does not exist")
        if not path.is_file():
            raise CheckpointError(f"surrogate checkpoint {path} is not a regular file ({_file_kind(path)})")
        target = _pointer_target(path)
        if target is None:
            return path
        seen.append(path.resolve())
        if target.resolve() in seen:
            raise CheckpointError(f"{seen[0]}: pointer files name each other in a loop ({target})")
        path = target


def checkpoint_argument(text: str) -> str:
    """argparse ``type=`` of checkpoint options: the real checkpoint path (pointer files resolved), or an
    argparse error with :func:`resolve_checkpoint`'s message."""
    import argparse

    try:
        return str(resolve_checkpoint(text))
    except (OSError, InputError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def load_checkpoint(path, map_location=None) -> dict:
    """Read a checkpoint dict (no validation beyond "is this one of ours"); see :func:`load_surrogate`.

    ``path`` may be a pointer file such as ``models/DEFAULT`` (:func:`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path)
    if not zipfile.is_zipfile(path):     # torch.save writes a zip archive; its directory is at the end
        raise CorruptCheckpointError(f"{path} is not a readable torch checkpoint (corrupt or truncated file?): "
                                     f"not a complete zip archive, {path.stat().st_size} bytes")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # zip/pickle/EOF errors all mean the same thing to the user
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(
            f"{path} is not a readable torch checkpoint (corrupt or truncated file?): {type(err).__name__}: "
            f"{first}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = f"a dict with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CorruptCheckpointError(f"{path} is not an lfdeep-neuron surrogate checkpoint "
                                     f"(expected format {FORMAT!r}; found {what})")
    if ckpt.get("version", 0) > VERSION:
        raise CorruptCheckpointError(f"{path} has checkpoint version {ckpt['version']}; this code reads "
                                     f"up to {VERSION}: update lfdeep-neuron")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        if "normalization" in missing and len(missing) == 1:
            raise NormalizationError(f"{path} has no normalization (per-segment v_mean / v_std): the model's "
                                     "z-scored outputs cannot be converted to mV")
        raise CorruptCheckpointError(f"{path} lacks required keys {missing}")
    return ckpt


def _state_segments(state_dict: dict, imem_tasks: bool):
    """Segments implied by the tower weights: n_tasks = S + 1 (+ S with imem tasks)."""
    b2 = state_dict.get("towers.b2")
    if b2 is None:
        return None
    n_tasks = int(b2.shape[0])
    return (n_tasks - 1) // 2 if imem_tasks else n_tasks - 1


def _expected_names(expected):
    """``expected_segments`` -> (count, names or None)."""
    if isinstance(expected, (int, np.integer)):
        return int(expected), None
    if isinstance(expected, dict):
        names = expected.get("name")
        if names is None:
            raise TypeError("expected_segments as a dict must be a segment table with a 'name' column")
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(names).tolist()]
        return len(names), names
    names = [x.decode() if isinstance(x, bytes) else str(x) for x in list(expected)]
    return len(names), names


def validate_checkpoint(ckpt: dict, path="checkpoint", expected_segments=None) -> SurrogateConfig:
    """Check a checkpoint dict; return its :class:`SurrogateConfig`. Raises :class:`CheckpointError`s."""
    arch = ckpt["arch"]
    if arch not in ARCHS:
        raise ArchitectureError(f"{path}: unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    try:
        cfg = SurrogateConfig(**ckpt["config"])
    except (TypeError, ValueError) as err:
        raise ArchitectureError(f"{path}: invalid config for arch {arch!r}: {err}") from err

    # Segment counts from every place that has one.
    counts = {"config n_segments": cfg.n_segments}
    s_state = _state_segments(ckpt["state_dict"], cfg.imem_tasks)
    if s_state is not None:
        counts["weights (towers)"] = s_state
    seg_names = ckpt["segments"].get("name")
    if seg_names is None:
        raise SegmentMismatchError(f"{path}: the segment table has no 'name' column")
    counts["segment table"] = len(seg_names)
    for k, v in ckpt["normalization"].items():
        counts[f"normalization {k}"] = int(torch.as_tensor(v).numel())
    if expected_segments is not None:
        n_exp, names_exp = _expected_names(expected_segments)
        counts["expected"] = n_exp
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise SegmentMismatchError(f"{path}: segment counts disagree ({detail})")
    if expected_segments is not None and names_exp is not None:
        names = [str(x) for x in seg_names]
        bad = [i for i, (a, b) in enumerate(zip(names, names_exp)) if a != b]
        if bad:
            i = bad[0]
            raise SegmentMismatchError(f"{path}: segment order differs from the expected cell at {len(bad)} "
                                       f"positions; first at index {i}: checkpoint {names[i]!r}, "
                                       f"expected {names_exp[i]!r}")

    syn_idx = ckpt["synapses"].get("syn_idx")
    n_syn = None if syn_idx is None else len(syn_idx)
    if n_syn is not None and n_syn != cfg.n_channels:
        raise ChannelMismatchError(f"{path}: config has {cfg.n_channels} input channels but the channel table "
                                   f"has {n_syn} rows")

    norm = ckpt["normalization"]
    need = ["v_mean", "v_std"] + (["imem_mean", "imem_std"] if cfg.imem_tasks else [])
    lacking = [k for k in need if k not in norm]
    if lacking:
        raise NormalizationError(f"{path}: normalization lacks {lacking} (has {sorted(norm)})")
    for k, v in norm.items():
        t = torch.as_tensor(v)
        if not torch.isfinite(t).all():
            raise NormalizationError(f"{path}: normalization {k} contains non-finite values")
        if k.endswith("_std") and (t <= 0).any():
            raise NormalizationError(f"{path}: normalization {k} has non-positive entries")

    dt = ckpt["dt_ms"]
    if not isinstance(dt, (int, float)) or not dt > 0:
        raise CheckpointError(f"{path}: dt_ms must be a positive number, got {dt!r}")
    spike_waveform_of(ckpt, path, cfg.n_segments)
    return cfg


def spike_waveform_of(ckpt: dict, path="checkpoint", n_segments: int | None = None) -> SpikeWaveform | None:
    """The checkpoint's :class:`SpikeWaveform` (None when it has none); :class:`CheckpointError` if malformed."""
    payload = ckpt.get("spike_waveform")
    if payload is None:
        return None
    try:
        wf = SpikeWaveform.from_payload(payload, where=str(path))
    except InputError as err:
        raise CheckpointError(str(err)) from err
    if n_segments is not None and wf.n_segments != n_segments:
        raise SegmentMismatchError(f"{path}: the spike waveform has {wf.n_segments} segments; the model "
                                   f"{n_segments}")
    if wf.kernel_i_nA is not None and not ckpt["config"].get("imem_tasks", False):
        raise CheckpointError(f"{path}: the spike waveform has a current kernel but the model predicts no currents")
    return wf


def write_spike_waveform(path, waveform: SpikeWaveform | None, out=None) -> Path:
    """Store ``waveform`` (None: remove it) in the checkpoint ``path``, written atomically to ``out``
    (default ``path``, in place); everything else is kept as it is. Returns the written path."""
    path = resolve_checkpoint(path)                 # a pointer file: write into the checkpoint it names
    ckpt = load_checkpoint(path)
    cfg = validate_checkpoint(ckpt, path)
    ckpt.pop("spike_waveform", None)
    if waveform is not None:
        if waveform.kernel_i_nA is not None and not cfg.imem_tasks:
            raise CheckpointError(f"{path}: the model predicts no currents; the waveform has a current kernel")
        try:
            ckpt["spike_waveform"] = _waveform_payload(waveform, cfg.n_segments)
        except ValueError as err:
            raise SegmentMismatchError(f"{path}: {err}") from err
    out = Path(path if out is None else out)
    atomic_torch_save(ckpt, out)
    return out


def load_surrogate(path, map_location=None, expected_segments=None) -> Surrogate:
    """Load, validate and build a surrogate in eval mode.

    Parameters
    ----------
    path : str or Path
    map_location : optional
        Device for the model (default CPU).
    expected_segments : int, segment table (dict with ``name``) or list of names, optional
        The cell the model will stand in for: its segment count (and order, when names are given) must match.

    Returns
    -------
    Surrogate
        In eval mode, with ``model.meta`` = dict(segments, synapses, dt_ms, provenance, metrics, path, ...,
        ``spike_waveform``: a :class:`~lfdeep_neuron.surrogate.waveform.SpikeWaveform` or None).
    """
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, map_location=None)
    cfg = validate_checkpoint(ckpt, path, expected_segments)
    model = ARCHS[ckpt["arch"]](cfg)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ArchitectureError(f"{path}: the weights do not fit arch {ckpt['arch']!r} with its config "
                                f"(wrong arch label or edited config?): {err}") from err
    norm = ckpt["normalization"]
    model.set_normalization(norm["v_mean"], norm["v_std"], norm.get("v_rest"), norm.get("imem_mean"),
                            norm.get("imem_std"))
    model.meta = {
        "segments": _table_from_storable(ckpt["segments"]),
        "synapses": _table_from_storable(ckpt["synapses"]),
        "dt_ms": float(ckpt["dt_ms"]), "provenance": ckpt.get("provenance", {}),
        "metrics": ckpt.get("metrics", {}), "path": str(path), "arch": ckpt["arch"],
        "config": ckpt["config"], "spike_waveform": spike_waveform_of(ckpt, path),
    }
    if map_location is not None:
        model.to(map_location)
    return model.eval()


def bundled_checkpoint(models_dir=None, *, required: bool | None = None) -> Path | None:
    """Path of the recommended bundled checkpoint.

    The file named in ``DEFAULT`` (one line: a file name in the folder), else the first ``*.pt`` in
    name order, in ``models_dir`` (default :data:`MODELS_DIR`: the models installed with the package).
    A DEFAULT that names a missing file is an error (a broken install), not a fallback.

    Parameters
    ----------
    models_dir : str or Path, optional
        Folder to look in instead of the installed models.
    required : bool, optional
        What to do when the folder holds no checkpoint: raise (True) or return None (False).
        Default: required for the installed models (a missing model is a broken install), not
        for a ``models_dir`` given explicitly (a query).

    Raises
    ------
    NoBundledModelError
        When no checkpoint is found and it is required (the message names the folders searched).
    FileNotFoundError
        When ``DEFAULT`` names a file that is not there.
    """
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    default = d / "DEFAULT"
    if default.is_file():
        name = default.read_text().strip()
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"{default} names {name!r}, which is not in {d}")
        return path
    found = sorted(d.glob("*.pt")) if d.is_dir() else []
    if found:
        return found[0]
    if not (models_dir is None if required is None else required):
        return None
    looked = [d] if models_dir is not None else resources.candidates("models")
    raise NoBundledModelError(
        f"no bundled surrogate checkpoint (DEFAULT or *.pt) in {' or '.join(str(p) for p in looked)}: "
        "pass a checkpoint explicitly (--model CKPT) or reinstall lfdeep-neuron with its models")
