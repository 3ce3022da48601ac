"""One simulation record per HDF5 file: the layout of ``shared/hay/reference/*.h5``.

Layout (see docs/ARCHITECTURE.md, "Record files")::

    /segments/<col>          [S, ...]  segment table (``name``, ``x``, ``xyz_mid`` [S,3] µm, ..., ``mech/<param>``)
    /sections/<col>          [n_sec]   section table (``name``, ``L``, ``nseg``, ``parent``, ...)
    /synapses/<col>          [C]       channel table (``syn_idx``, ``seg_idx``, ``type``, ``type_str``, ``dead``)
    /input/syn_idx           int32     generated events: channel of each event
    /input/t_ms              float64   generated events: time of each event (ms)
    /input_effective/...     same      events that can act (dead synapses dropped, BIOPHYSICS §6.4)
    /v_1ms                   float32 [S, T]  point samples at t = 0, 1, ..., T-1 ms (mV)
    /t_1ms, /v_soma_0p1ms, /t_0p1ms, /soma_spike_times_ms, /imem_mean_1ms [S, T] (nA), ...
    root attributes          protocol, duration_ms, v_init_mV, celsius, integrator, seed, ...

Tables are plain dicts of numpy arrays keyed by the dataset path inside their group (a nested group
becomes ``"mech/<param>"``). Strings are stored as fixed-length bytes in HDF5 and returned as numpy
``str`` arrays. :func:`write_record` writes atomically (temporary name in the same directory, fsync,
``os.replace``), so a file at the final name is always whole; :func:`read_record` checks the layout and
raises :class:`RecordFormatError` naming the file and what is missing or mis-shaped.

Example
-------
>>> rec = read_record("shared/hay/reference/synaptic_seed1.h5", require=("input_effective",))
>>> rec["v_1ms"].shape, rec.attrs["protocol"]
((642, 3000), 'synaptic_beniaguev')
>>> write_record("copy.h5", **rec.write_kwargs())
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from lfdeep_neuron.errors import InputError

__all__ = [
    "RecordFormatError",
    "Record",
    "to_float16",
    "write_record",
    "read_record",
    "open_record",
    "validate_record",
    "read_group",
    "record_values_sha256",
    "TABLE_GROUPS",
    "EVENT_GROUPS",
    "DEFAULT_REQUIRE",
]

#: Groups holding per-row tables.
TABLE_GROUPS = ("segments", "sections", "synapses")
#: Groups holding event lists (``syn_idx`` int32, ``t_ms`` float64).
EVENT_GROUPS = ("input", "input_effective")
#: What :func:`read_record` requires unless told otherwise.
DEFAULT_REQUIRE = ("segments", "v_1ms")

# Per-segment traces: [S, T] arrays that must agree with the segment table and with each other.
_SEGMENT_TRACES = ("v_1ms", "imem_mean_1ms", "v_mean_1ms")
# Datasets at least this many elements long are chunked and compressed.
_COMPRESS_MIN_ELEMENTS = 1024
# Time length of one chunk of an [S, T] trace (all segments in one chunk: a training window reads
# every segment over a contiguous time range).
TRACE_CHUNK_MS = 128
_GZIP_LEVEL = 4


class RecordFormatError(InputError):
    """An HDF5 file is not a simulation record of the expected layout; the message says why."""


class Record(dict):
    """A simulation record in memory: a dict keyed by the names at the root of the file.

    Groups are dicts of numpy arrays keyed by their path inside the group (``rec["segments"]["mech/cm"]``,
    ``rec["input_effective"]["t_ms"]``); root datasets are numpy arrays (``rec["v_1ms"]``).

    Attributes
    ----------
    path : pathlib.Path or None
        The file it was read from.
    attrs : dict
        Root attributes (``protocol``, ``duration_ms``, ``seed``, ...).
    group_attrs : dict
        ``{group path: {name: value}}`` for groups carrying attributes (e.g. ``"segments/mech"``).
    dataset_attrs : dict
        ``{dataset path: {name: value}}`` for datasets carrying attributes.
    """

    def __init__(self, *args, path=None, attrs=None, group_attrs=None, dataset_attrs=None, **kw):
        super().__init__(*args, **kw)
        self.path = Path(path) if path is not None else None
        self.attrs = dict(attrs or {})
        self.group_attrs = dict(group_attrs or {})
        self.dataset_attrs = dict(dataset_attrs or {})

    @property
    def n_segments(self) -> int:
        return int(len(self["segments"]["name"]))

    @property
    def n_steps(self) -> int:
        """Number of 1-ms samples T of ``v_1ms``."""
        return int(self["v_1ms"].shape[1])

    def write_kwargs(self) -> dict:
        """Keyword arguments for :func:`write_record` that rewrite this record unchanged."""
        known = set(TABLE_GROUPS) | set(EVENT_GROUPS)
        traces = {k: v for k, v in self.items() if k not in known and isinstance(v, np.ndarray)}
        extra = {k: v for k, v in self.items() if k not in known and not isinstance(v, np.ndarray)}
        return dict(
            segments=self.get("segments"),
            sections=self.get("sections"),
            synapses=self.get("synapses"),
            traces=traces,
            attrs=self.attrs,
            inputs=self.get("input"),
            inputs_effective=self.get("input_effective"),
            extra=extra or None,
            group_attrs=self.group_attrs or None,
            dataset_attrs=self.dataset_attrs or None,
        )


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------

def to_float16(x, mantissa_bits: int = 10) -> np.ndarray:
    """``x`` as float16, rounded to nearest with only ``mantissa_bits`` of the 10 mantissa bits kept.

    The dropped bits are zero, which byte-shuffled gzip compresses well: storage for quantities that
    need a relative precision (e.g. membrane currents for the LFP), not a fixed absolute one. The
    relative error is at most 2^-(mantissa_bits+1) + 2^-11 (two roundings) for normal numbers. Values beyond float16's range (|x| > 65504) become ±inf: check before storing.
    """
    if not 1 <= int(mantissa_bits) <= 10:
        raise ValueError(f"mantissa_bits must lie in 1..10, got {mantissa_bits}")
    h = np.asarray(x, dtype=np.float16)
    drop = 10 - int(mantissa_bits)
    if drop == 0:
        return h
    bits = h.view(np.uint16).astype(np.uint32)
    sign = bits & 0x8000
    mag = ((bits & 0x7FFF) + (1 << (drop - 1))) >> drop << drop     # a carry into the exponent rounds up
    mag = np.minimum(mag, 0x7C00)                                    # ... but never past inf into NaN
    mag = np.where((bits & 0x7C00) == 0x7C00, bits & 0x7FFF, mag)   # inf and NaN stay as they were
    return (sign | mag).astype(np.uint16).view(np.float16)


def _to_storable(name: str, value) -> np.ndarray:
    """Array ready for h5py: str -> fixed-length bytes, everything else as a numpy array."""
    arr = np.asarray(value)
    if arr.dtype.kind == "U":
        arr = np.char.encode(arr, "utf-8") if arr.size else arr.astype("S1")
    elif arr.dtype.kind == "O":
        try:
            arr = np.array([s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in arr.ravel()]
                           ).reshape(arr.shape)
        except TypeError as exc:
            raise TypeError(f"dataset {name!r}: object arrays must hold strings or bytes") from exc
    if arr.dtype.kind not in "biufSc":
        raise TypeError(f"dataset {name!r}: cannot store dtype {arr.dtype}")
    return arr


def _chunks_for(arr: np.ndarray):
    if arr.ndim == 2 and arr.shape[1] > 1:
        # [rows, time]: every row of a time slab in one chunk (window reads are contiguous in time).
        return (arr.shape[0], min(arr.shape[1], TRACE_CHUNK_MS))
    if arr.ndim == 1:
        return (min(arr.shape[0], 16384),)
    return True


def _create_dataset(group: h5py.Group, name: str, value, compression) -> h5py.Dataset:
    arr = _to_storable(name, value)
    kw = {}
    if compression and arr.size >= _COMPRESS_MIN_ELEMENTS and arr.dtype.kind != "S":
        kw = dict(chunks=_chunks_for(arr), compression=compression, shuffle=True)
        if compression == "gzip":
            kw["compression_opts"] = _GZIP_LEVEL
    return group.create_dataset(name, data=arr, **kw)


def _set_attrs(obj, attrs: Mapping | None, where: str) -> None:
    for key, val in (attrs or {}).items():
        if val is None:
            raise TypeError(f"attribute {key!r} of {where}: None cannot be stored")
        if isinstance(val, Mapping):
            val = json.dumps(val, sort_keys=True)
        elif isinstance(val, (list, tuple)):
            val = np.asarray(val)
        if isinstance(val, np.ndarray) and val.dtype.kind == "U":
            val = np.char.encode(val, "utf-8")
        obj.attrs[key] = val


def _write_table(parent: h5py.Group, gname: str, table: Mapping, compression) -> None:
    group = parent.require_group(gname)
    for key in table:  # keep the caller's order (dicts are ordered); nested paths create subgroups
        _create_dataset(group, key, table[key], compression)


def _events_dict(events, which: str) -> dict:
    if isinstance(events, Mapping):
        missing = {"syn_idx", "t_ms"} - set(events)
        if missing:
            raise KeyError(f"{which}: missing {sorted(missing)} (need syn_idx and t_ms)")
        syn, t = events["syn_idx"], events["t_ms"]
    else:
        syn, t = events
    syn = np.asarray(syn)
    t = np.asarray(t, dtype=np.float64)
    if syn.shape != t.shape or syn.ndim != 1:
        raise ValueError(f"{which}: syn_idx {syn.shape} and t_ms {t.shape} must be 1-D of equal length")
    if syn.size and not np.issubdtype(syn.dtype, np.integer):
        raise ValueError(f"{which}: syn_idx must be integers, got {syn.dtype}")
    out = {"syn_idx": syn.astype(np.int32), "t_ms": t}
    if isinstance(events, Mapping):  # keep any further columns (e.g. weight)
        out.update({k: np.asarray(v) for k, v in events.items() if k not in out})
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_record(path, *, segments, sections=None, synapses=None, traces, attrs,
                 inputs=None, inputs_effective=None, extra=None, compression="gzip",
                 group_attrs=None, dataset_attrs=None) -> Path:
    """Write one simulation record atomically; return its path.

    Parameters
    ----------
    path : str or Path
        Destination. The data go to a unique temporary file in the same directory, which is flushed,
        fsync'ed and renamed onto ``path``: a file at ``path`` is never half-written.
    segments, sections, synapses : dict of array-like
        Tables (keys = dataset paths inside the group, e.g. ``"mech/g_pas"``). ``str`` columns are
        stored as bytes. ``sections`` and ``synapses`` may be None (omitted).
    traces : dict of array-like
        Datasets at the root (``v_1ms`` [S, T] float32 mV, ``t_1ms``, ``v_soma_0p1ms``,
        ``soma_spike_times_ms``, ``imem_mean_1ms`` [S, T] nA, ...). Dtypes are kept as given.
    attrs : dict
        Root attributes; written last. dict values are stored as JSON strings.
    inputs, inputs_effective : dict or (syn_idx, t_ms), optional
        Event lists for ``/input`` and ``/input_effective`` (syn_idx int32, t_ms float64).
    extra : dict, optional
        Further root entries: arrays become datasets, dicts become groups of datasets.
    compression : {"gzip", "lzf", None}
        Filter for datasets of at least 1024 numeric elements (with byte shuffling). [S, T] traces are
        chunked as (S, 128 ms).
    group_attrs, dataset_attrs : dict, optional
        ``{path: {name: value}}`` attributes of groups / datasets (e.g. ``{"segments": {"dist_note": ...}}``).
    """
    path = Path(path)
    if segments is None or "name" not in segments:
        raise ValueError("write_record: segments must be a table with at least a 'name' column")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        # track_order stays off and h5py does not store creation times by default: the same content
        # gives the same bytes (tests rely on byte-identical reruns).
        with h5py.File(tmp, "w") as f:
            _write_table(f, "segments", segments, compression)
            for gname, table in (("sections", sections), ("synapses", synapses)):
                if table is not None:
                    _write_table(f, gname, table, compression)
            for gname, events in (("input", inputs), ("input_effective", inputs_effective)):
                if events is not None:
                    _write_table(f, gname, _events_dict(events, gname), compression)
            for name, value in traces.items():
                _create_dataset(f, name, value, compression)
            for name, value in (extra or {}).items():
                if isinstance(value, Mapping):
                    _write_table(f, name, value, compression)
                else:
                    _create_dataset(f, name, value, compression)
            for gpath, gattrs in (group_attrs or {}).items():
                _set_attrs(f.require_group(gpath), gattrs, f"group {gpath!r}")
            for dpath, dattrs in (dataset_attrs or {}).items():
                if dpath not in f:
                    raise KeyError(f"dataset_attrs: no dataset {dpath!r} in the record")
                _set_attrs(f[dpath], dattrs, f"dataset {dpath!r}")
            _set_attrs(f, attrs, "the root")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


# --------------------------------------------------------------------------------------------------
# reading and validation
# --------------------------------------------------------------------------------------------------

def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.dtype.kind == "S":
        return np.char.decode(v, "utf-8")
    return v


def _read_dataset(ds: h5py.Dataset) -> np.ndarray:
    arr = ds[()]
    if isinstance(arr, np.ndarray) and arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    if isinstance(arr, bytes):
        return np.array(arr.decode("utf-8"))
    return np.asarray(arr)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_record(f: h5py.File, require: Iterable[str] = DEFAULT_REQUIRE, *, name=None) -> None:
    """Check the layout of an open record; raise :class:`RecordFormatError` naming what is wrong.

    ``require`` lists paths that must exist (``"segments"``, ``"v_1ms"``, ``"input_effective"``,
    ``"synapses/dead"``, ...); a root attribute is required with ``"@name"``. Whatever is present is
    checked for consistency: [S, T] traces against the segment table and against ``t_1ms``, table
    columns against each other, event lists (1-D ``syn_idx``/``t_ms`` of equal length, channels in
    range of the synapse table).
    """
    fname = name or f.filename
    problems: list[str] = []
    for req in require:
        if req.startswith("@"):
            if req[1:] not in f.attrs:
                problems.append(f"missing root attribute {req[1:]!r}")
        elif req not in f:
            what = "group" if req in TABLE_GROUPS + EVENT_GROUPS else "dataset"
            problems.append(f"missing {what} '/{req}'")
    if problems:
        raise RecordFormatError(f"{fname}: not a simulation record of the expected layout: "
                                + "; ".join(problems))

    def table_rows(gname: str, key_col: str) -> int | None:
        if gname not in f:
            return None
        g = f[gname]
        if not isinstance(g, h5py.Group):
            problems.append(f"'/{gname}' is a dataset, expected a group")
            return None
        if key_col not in g:
            problems.append(f"group '/{gname}' has no '{key_col}' column")
            return None
        n = g[key_col].shape[0] if g[key_col].ndim else -1
        cols = []
        g.visititems(lambda p, o: cols.append((p, o)) if isinstance(o, h5py.Dataset) else None)
        for p, ds in cols:
            if ds.ndim == 0 or ds.shape[0] != n:
                problems.append(f"{gname}/{p} has shape {_shape_str(ds.shape)}, expected "
                                f"({n}, ...) like {gname}/{key_col}")
        return n

    n_seg = table_rows("segments", "name")
    table_rows("sections", "name")
    n_syn = table_rows("synapses", "syn_idx")

    T = None
    for tr in _SEGMENT_TRACES:
        if tr not in f:
            continue
        ds = f[tr]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
            problems.append(f"{tr} has shape {_shape_str(getattr(ds, 'shape', ()))}, expected (S, T)")
            continue
        if n_seg is not None and ds.shape[0] != n_seg:
            problems.append(f"{tr} has shape {_shape_str(ds.shape)}, expected (S={n_seg}, T)")
        if T is None:
            T = ds.shape[1]
        elif ds.shape[1] != T:
            problems.append(f"{tr} has shape {_shape_str(ds.shape)}, expected T={T} like the other traces")
        if ds.dtype.kind != "f":
            problems.append(f"{tr} has dtype {ds.dtype}, expected floating point")
    for tname, ref in (("t_1ms", T), ("t_0p1ms", f["v_soma_0p1ms"].shape[0] if "v_soma_0p1ms" in f else None)):
        if tname in f and ref is not None and f[tname].shape != (ref,):
            problems.append(f"{tname} has shape {_shape_str(f[tname].shape)}, expected ({ref},)")

    for gname in EVENT_GROUPS:
        if gname not in f:
            continue
        g = f[gname]
        if not isinstance(g, h5py.Group) or "syn_idx" not in g or "t_ms" not in g:
            problems.append(f"'/{gname}' must be a group with datasets syn_idx and t_ms")
            continue
        s, t = g["syn_idx"], g["t_ms"]
        if s.ndim != 1 or t.ndim != 1 or s.shape != t.shape:
            problems.append(f"{gname}/syn_idx {_shape_str(s.shape)} and {gname}/t_ms {_shape_str(t.shape)} "
                            "must be 1-D of equal length")
            continue
        if s.dtype.kind not in "iu":
            problems.append(f"{gname}/syn_idx has dtype {s.dtype}, expected integers")
            continue
        if n_syn is not None and s.shape[0]:
            idx = s[()]
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n_syn:
                problems.append(f"{gname}/syn_idx spans [{lo}, {hi}], outside the {n_syn} channels of /synapses")
    if problems:
        raise RecordFormatError(f"{fname}: " + "; ".join(problems))


def read_group(f: h5py.File, name: str) -> dict:
    """A group of an open record as a table: ``{path inside the group: array}`` (strings as ``str``)."""
    if name not in f or not isinstance(f[name], h5py.Group):
        raise RecordFormatError(f"{f.filename}: missing group '/{name}'")
    table: dict[str, np.ndarray] = {}
    f[name].visititems(lambda p, o: table.__setitem__(p, _read_dataset(o)) if isinstance(o, h5py.Dataset) else None)
    return table


@contextlib.contextmanager
def open_record(path, require: Iterable[str] = DEFAULT_REQUIRE):
    """Open a record read-only for lazy access (``with open_record(p) as f: f["v_1ms"][:, a:b]``).

    The layout is validated first; non-HDF5 or foreign files raise :class:`RecordFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such record file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RecordFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        validate_record(f, require, name=str(path))
        yield f
    finally:
        f.close()


def record_values_sha256(path) -> str:
    """SHA-256 of the numbers a record holds, independent of how the file lays them out.

    Every dataset contributes its path, dtype, shape and little-endian C-order bytes, in path order.
    Attributes (descriptive text, the NEURON version) and the file's byte layout (HDF5 version,
    compression filter, chunking) are left out: two records with the same digest hold the same values.

    Parameters
    ----------
    path : str or Path
        A record written by :func:`write_record`.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RecordFormatError(f"{path}: not a readable HDF5 record ({exc})") from None
    with f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            arr = np.asarray(f[name][()])
            if arr.dtype.kind == "O":                  # variable-length strings
                arr = np.array([x if isinstance(x, bytes) else str(x).encode() for x in arr.ravel()],
                               dtype="S").reshape(arr.shape)
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def read_record(path, require: Iterable[str] = DEFAULT_REQUIRE) -> Record:
    """Read a whole record into memory (see :class:`Record`), after checking its layout.

    Parameters
    ----------
    path : str or Path
    require : iterable of str
        Paths that must be present (default: ``segments`` and ``v_1ms``); ``"@attr"`` for a root
        attribute. Use ``require=()`` to accept a record without traces (e.g. an inputs-only file).

    Raises
    ------
    FileNotFoundError, RecordFormatError
    """
    with open_record(path, require) as f:
        rec = Record(path=path, attrs={k: _attr_value(v) for k, v in f.attrs.items()})
        for key, obj in f.items():
            if isinstance(obj, h5py.Dataset):
                rec[key] = _read_dataset(obj)
                if obj.attrs:
                    rec.dataset_attrs[key] = {k: _attr_value(v) for k, v in obj.attrs.items()}
                continue
            table: dict[str, np.ndarray] = {}
            if obj.attrs:
                rec.group_attrs[key] = {k: _attr_value(v) for k, v in obj.attrs.items()}

            def visit(sub, o, key=key, table=table):
                full = f"{key}/{sub}"
                if isinstance(o, h5py.Dataset):
                    table[sub] = _read_dataset(o)
                    if o.attrs:
                        rec.dataset_attrs[full] = {k: _attr_value(v) for k, v in o.attrs.items()}
                elif o.attrs:
                    rec.group_attrs[full] = {k: _attr_value(v) for k, v in o.attrs.items()}

            obj.visititems(visit)
            rec[key] = table
    return rec
