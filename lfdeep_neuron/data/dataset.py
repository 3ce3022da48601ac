"""Training sequences for PyTorch from a directory of simulation records.

:class:`SimulationDataset` reads the records written by ``lfdeep-neuron generate`` (or any records of the
reference layout) lazily: each item opens its file with h5py and reads only its time window, so a
dataset larger than RAM works. An item is a dict::

    x_syn   float32 [1278, W]  input channels per 1-ms bin: the sum of the weights of the events with
                               ceil(t) = bin (step k consumes (k-1, k] ms; an event at 0 ms is in bin 0)
    v       float32 [S, W]     voltage of every segment at t = bin ms (point samples = v_1ms), mV
    imem    float32 [S, W]     bin-mean membrane current of every segment (imem_mean_1ms), nA
    spike   float32 [W]        1 where a somatic spike time s has ceil(s) = bin, else 0
    sim_index  int64 []        which simulation
    t0_ms      int64 []        time of the window's first bin (ms)

Splits are by simulation (from ``meta.json``, else :func:`~lfdeep_neuron.data.simulate.assign_splits`),
never by time. Normalisation statistics (:attr:`SimulationDataset.stats`) are computed once over the
train split and cached in the directory (``stats.npz``, keyed by the train records); each record's moments are
kept beside it (``.stats_parts/``), so that when a corpus grows only its new records are read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from lfdeep_neuron.data.records import RecordFormatError, read_group, validate_record
from lfdeep_neuron.errors import InputError
from lfdeep_neuron.data.simulate import META_NAME, assign_splits, read_meta

__all__ = ["SimulationDataset", "bin_events", "spike_indicator", "compute_stats", "record_moments", "combine_moments",
           "STATS_NAME", "STATS_PARTS_DIR"]

STATS_NAME = "stats.npz"
FIELDS = ("x_syn", "v", "imem", "spike")
_FIELD_DATASET = {"v": "v_1ms", "imem": "imem_mean_1ms", "spike": "soma_spike_times_ms"}
# Floors applied to the standard deviations in ``stats`` so that z-scoring never divides by ~0.
V_STD_FLOOR_MV = 1e-2
IMEM_STD_FLOOR_NA = 1e-6
_STATS_CHUNK_MS = 1024
_STATS_VERSION = 2  # bump when the statistics' keys or meaning change (invalidates stats.npz caches)
_MAX_OPEN_FILES = 32


# --------------------------------------------------------------------------------------------------
# binning
# --------------------------------------------------------------------------------------------------

def bin_events(syn_idx, t_ms, n_channels: int, t0_ms: int, n_bins: int, weights=None) -> np.ndarray:
    """Sum event weights into 1-ms bins: bin k of the result is absolute bin ``t0_ms + k``.

    An event at time t belongs to bin ``ceil(t)`` (bin k collects (k-1, k] ms). Events outside the
    window are ignored.

    Returns
    -------
    ndarray float32 [n_channels, n_bins]
    """
    syn_idx = np.asarray(syn_idx, dtype=np.int64)
    b = np.ceil(np.asarray(t_ms, dtype=np.float64)).astype(np.int64) - int(t0_ms)
    keep = (b >= 0) & (b < n_bins)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[keep]
    flat = np.bincount(syn_idx[keep] * n_bins + b[keep], weights=w, minlength=n_channels * n_bins)
    return flat.reshape(n_channels, n_bins).astype(np.float32)


def spike_indicator(spike_times_ms, t0_ms: int, n_bins: int) -> np.ndarray:
    """float32 [n_bins]: 1 in bin ``ceil(s) - t0_ms`` for every spike time s in the window."""
    b = np.ceil(np.asarray(spike_times_ms, dtype=np.float64)).astype(np.int64) - int(t0_ms)
    out = np.zeros(n_bins, dtype=np.float32)
    out[b[(b >= 0) & (b < n_bins)]] = 1.0
    return out


# --------------------------------------------------------------------------------------------------
# the directory
# --------------------------------------------------------------------------------------------------

@dataclass
class _RecordInfo:
    index: int
    path: Path
    n_steps: int
    spike_times_ms: np.ndarray
    events_sorted: bool


#: Simulation ``i`` of the ``k``-th directory of a multi-directory dataset gets index ``k * stride + i``.
DATASET_INDEX_STRIDE = 1_000_000

_FIRST_RE = re.compile(r"^(?P<folder>.+):first=(?P<n>[0-9]+)$")


def parse_folder_spec(spec) -> tuple[Path, int | None]:
    """``(folder, first)`` of a dataset folder named as ``DIR`` or ``DIR:first=N``.

    ``DIR:first=N`` stands for the folder's first N simulations in generation order (indices 0 ... N-1), so a
    folder that is still being generated (or that ``generate`` will extend later) can be trained on with a
    fixed, rebuildable set of simulations. ``first`` is None for a plain ``DIR``.
    """
    m = _FIRST_RE.match(str(spec))
    if m is None:
        return Path(spec), None
    return Path(m.group("folder")), int(m.group("n"))


def _first_only(found, meta, folder: Path, first: int) -> tuple[list, dict]:
    """``found`` and ``meta`` of one folder cut to simulations 0 ... first-1, each keeping the split it has in
    the whole folder; InputError unless all of them are there."""
    if first < 1:
        raise InputError(f"{folder}:first={first}: N must be >= 1")
    kept = [(i, p) for i, p in found if i < first]
    if len(kept) < first:
        raise InputError(f"{folder}:first={first}: only {len(kept)} of its simulations 0..{first - 1} are "
                         "complete; generate the rest first (rerun its `generate` command) or ask for fewer")
    idx = {i for i, _ in kept}
    splits = {name: sorted(idx & _split_indices(found, meta, name)) for name in ("train", "val", "test")}
    return kept, {**(meta or {}), "splits": splits, "first": first}


def _discover(root) -> tuple[list[tuple[int, Path]], dict | None]:
    """Records of a dataset: ``[(sim index, path)]`` and the directory's meta (if any).

    A list of directories is one dataset: each keeps its own splits, and simulation ``i`` of the
    ``k``-th directory is numbered ``k * DATASET_INDEX_STRIDE + i``.
    """
    if isinstance(root, (list, tuple)):
        specs = [parse_folder_spec(p) for p in root]
        paths = [d for d, _ in specs]
        if paths and all(p.is_dir() for p in paths):
            found, splits = [], {"train": [], "val": [], "test": []}
            metas = []
            for k, (d, first) in enumerate(specs):
                f_k, m_k = _discover(d)
                if first is not None:
                    f_k, m_k = _first_only(f_k, m_k, d, first)
                off = k * DATASET_INDEX_STRIDE
                found += [(i + off, p) for i, p in f_k]
                for name in splits:
                    splits[name] += sorted(i + off for i in _split_indices(f_k, m_k, name))
                metas.append((m_k or {}).get("generation"))
            return found, {"splits": splits, "datasets": [str(p) for p in root], "generation": metas}
        return list(enumerate(paths)), None
    root = Path(root)
    if root.is_file():
        return [(0, root)], None
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset directory or record file")
    meta = read_meta(root)
    if meta is not None and meta.get("records"):
        found = [(int(r["index"]), root / r["file"]) for r in meta["records"]]
        missing = [str(p) for _, p in found if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{root / META_NAME} lists records that are missing: {', '.join(missing[:5])}"
                                    + (" ..." if len(missing) > 5 else ""))
        return found, meta
    files = sorted(p for p in root.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{root}: no simulation records (*.h5) found")
    from lfdeep_neuron.data.simulate import _RECORD_RE

    parsed = [_RECORD_RE.match(p.name) for p in files]
    if all(parsed):
        return [(int(m.group(1)), p) for m, p in zip(parsed, files)], meta
    return list(enumerate(files)), meta


def _split_indices(found, meta, split) -> set[int]:
    all_idx = [i for i, _ in found]
    if split in (None, "all"):
        return set(all_idx)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val', 'test' or None, got {split!r}")
    if meta is not None and "splits" in meta:
        return set(meta["splits"][split])
    gen = (meta or {}).get("generation", {})
    return set(assign_splits(all_idx, gen.get("seed", 0), gen.get("split_fractions"))[split])


def _open_cached(cache: OrderedDict, path: Path) -> h5py.File:
    f = cache.get(path)
    if f is None:
        f = h5py.File(path, "r")
        cache[path] = f
        if len(cache) > _MAX_OPEN_FILES:
            cache.popitem(last=False)[1].close()
    else:
        cache.move_to_end(path)
    return f


class SimulationDataset(torch.utils.data.Dataset):
    """Windows (or whole simulations) of a simulation dataset as dicts of tensors.

    Parameters
    ----------
    root : str, Path, or list of paths
        A dataset directory (``meta.json`` + ``sim_*.h5``, or any ``*.h5`` records), one record file,
        or a list of record files.
    split : {"train", "val", "test", None}
        Which simulations; None = all of them (use None with a single file or a list of files).
    window_ms : int, optional
        Window length W in 1-ms bins; None gives one item per simulation (its whole length).
    stride_ms : int, optional
        Step between window starts (default: ``window_ms``, non-overlapping).
    spike_balance : float, optional
        Fraction of items drawn (with replacement) from windows holding a somatic spike; the rest from
        windows without. None keeps every window once. The draw is fixed by ``seed`` and
        :meth:`set_epoch`.
    seed : int
        Seed of the spike-balanced draw.
    fields : tuple of str
        Subset of ``("x_syn", "v", "imem", "spike")`` to read.
    events : {"input_effective", "input"}
        Which event list feeds ``x_syn`` (default: the events that act on the cell).
    cache_dir : str or Path, optional
        Read windows from uncompressed, memory-mapped copies of the records' datasets kept in this folder
        (:class:`~lfdeep_neuron.data.cache.DecompressedCache`; built on first use, same values): windows
        then cost a copy instead of decompressing their chunks.

    Attributes
    ----------
    segments, synapses : dict of ndarray
        Segment and channel tables of the records.
    meta : dict or None
        The directory's ``meta.json``.
    n_segments, n_channels : int
    """

    def __init__(self, root, split: str | None = "train", window_ms: int | None = None,
                 stride_ms: int | None = None, spike_balance: float | None = None, seed: int = 0,
                 fields=FIELDS, events: str = "input_effective", cache_dir=None):
        if not isinstance(root, (list, tuple)) and parse_folder_spec(root)[1] is not None:
            root = [str(root)]                  # DIR:first=N: a one-folder list (its own splits and stats)
        self.root = root if isinstance(root, (list, tuple)) else Path(root)
        self.cache, self._cached_names = None, {}
        if cache_dir is not None:
            from lfdeep_neuron.data.cache import DecompressedCache
            self.cache = DecompressedCache(cache_dir)
        self.split = split
        bad = set(fields) - set(FIELDS)
        if bad:
            raise ValueError(f"unknown fields {sorted(bad)}; choose from {FIELDS}")
        self.fields = tuple(fields)
        if events not in ("input_effective", "input"):
            raise ValueError(f"events must be 'input_effective' or 'input', got {events!r}")
        self.events = events
        if window_ms is not None and int(window_ms) < 1:
            raise ValueError(f"window_ms must be >= 1, got {window_ms}")
        self.window_ms = None if window_ms is None else int(window_ms)
        self.stride_ms = int(stride_ms) if stride_ms is not None else self.window_ms
        if self.stride_ms is not None and self.stride_ms < 1:
            raise ValueError(f"stride_ms must be >= 1, got {stride_ms}")
        if spike_balance is not None:
            if self.window_ms is None:
                raise ValueError("spike_balance needs window_ms (it balances windows)")
            if not 0.0 <= float(spike_balance) <= 1.0:
                raise ValueError(f"spike_balance must lie in [0, 1], got {spike_balance}")
        self.spike_balance = spike_balance
        self.seed = int(seed)

        found, self.meta = _discover(root)
        self._all_records = found
        chosen = _split_indices(found, self.meta, split)
        if not chosen:
            raise InputError(f"split {split!r} of {self._where()} holds no simulations ({len(found)} in total)")
        self._required = ["segments", "v_1ms"] + [_FIELD_DATASET[k] for k in self.fields if k in _FIELD_DATASET]
        if "x_syn" in self.fields:
            self._required += [self.events, "synapses"]
        self.records = [self._inspect(i, p) for i, p in found if i in chosen]
        self._files: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self._stats = None
        self._build_windows()
        self.set_epoch(0)

    # ---------------------------------------------------------------- records
    def _inspect(self, index: int, path: Path) -> _RecordInfo:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: record file not found")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise RecordFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc
        with f:
            validate_record(f, self._required, name=str(path))
            names = f["segments/name"][()]
            if not hasattr(self, "segments"):
                self._first_attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                self.segments = read_group(f, "segments")
                self.synapses = read_group(f, "synapses") if "synapses" in f else None
                self._seg_names = names
                self.n_segments = int(names.shape[0])
                self.n_channels = int(f["synapses/syn_idx"].shape[0]) if "synapses" in f else 1278
            elif names.shape != self._seg_names.shape or not np.array_equal(names, self._seg_names):
                raise RecordFormatError(f"{path}: its segment table differs from the other records' "
                                        f"({names.shape[0]} vs {self._seg_names.shape[0]} segments)")
            if "synapses" in f and f["synapses/syn_idx"].shape[0] != self.n_channels:
                raise RecordFormatError(f"{path}: {f['synapses/syn_idx'].shape[0]} channels, expected "
                                        f"{self.n_channels} like the other records")
            spikes = f["soma_spike_times_ms"][()] if "soma_spike_times_ms" in f else np.zeros(0)
            sorted_ev = True
            if "x_syn" in self.fields:
                t = f[f"{self.events}/t_ms"][()]
                sorted_ev = bool(np.all(np.diff(t) >= 0))
            n_steps = int(f["v_1ms"].shape[1])
        if self.window_ms is not None and n_steps < self.window_ms:
            raise ValueError(f"{path}: {n_steps} ms is shorter than window_ms={self.window_ms}")
        return _RecordInfo(index, path, n_steps, np.asarray(spikes, dtype=np.float64), sorted_ev)

    def _source(self, path: Path):
        """What :meth:`read` indexes by HDF5 dataset path: the open record, or (``cache_dir``) a dict of its
        memory-mapped uncompressed datasets."""
        if self.cache is None:
            return self._file(path)
        names = self._cached_names.get(path)
        if names is None:
            names = [d for k, d in (("v", "v_1ms"), ("imem", "imem_mean_1ms")) if k in self.fields]
            if "x_syn" in self.fields:
                names += [f"{self.events}/{n}" for n in ("t_ms", "syn_idx", "weight")
                          if f"{self.events}/{n}" in self._file(path)]
            self._cached_names[path] = names
        return self.cache.arrays(path, names)

    def _file(self, path: Path) -> h5py.File:
        if os.getpid() != self._pid:  # a DataLoader worker: never share handles across processes
            self._files = OrderedDict()
            self._pid = os.getpid()
        return _open_cached(self._files, path)

    def __getstate__(self):  # DataLoader workers started by spawn/forkserver: h5py handles stay behind
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self):
        try:
            if os.getpid() == self._pid:
                self.close()
        except Exception:
            pass

    @property
    def provenance(self) -> dict:
        """Where the data come from (for checkpoints): root, split, records, generation settings."""
        a = self._first_attrs
        plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731
        return {
            "root": str(self.root) if isinstance(self.root, Path) else [str(p) for p in self.root],
            "split": self.split,
            "n_sims": len(self.records),
            "sim_indices": [int(r.index) for r in self.records],
            "simulated_s": float(sum(r.n_steps for r in self.records) / 1000.0),
            "events": self.events,
            "generation": (self.meta or {}).get("generation"),
            **{k: plain(a[k]) for k in ("protocol", "neuron_version", "integrator", "celsius", "v_init_mV",
                                        "morphology_sha256") if k in a},
        }

    # ---------------------------------------------------------------- windows
    def _build_windows(self) -> None:
        rec_pos, t0s, spiking = [], [], []
        for k, r in enumerate(self.records):
            if self.window_ms is None:
                starts = np.array([0])
                W = r.n_steps
            else:
                W = self.window_ms
                starts = np.arange(0, r.n_steps - W + 1, self.stride_ms)
            bins = np.ceil(r.spike_times_ms).astype(np.int64)
            # windows [t0, t0 + W) holding at least one spike bin
            n_in = np.searchsorted(np.sort(bins), starts + W) - np.searchsorted(np.sort(bins), starts)
            rec_pos.append(np.full(starts.size, k))
            t0s.append(starts)
            spiking.append(n_in > 0)
        self._win_rec = np.concatenate(rec_pos)
        self._win_t0 = np.concatenate(t0s)
        self._win_spiking = np.concatenate(spiking)

    def _where(self) -> str:
        """The dataset as messages name it: its directory, its directories as DIR1,DIR2, or 'the given files'."""
        if isinstance(self.root, Path):
            return str(self.root)
        paths = [parse_folder_spec(p)[0] for p in self.root]
        return (",".join(map(str, self.root)) if paths and all(p.is_dir() for p in paths)
                else "the given files")

    def restrict(self, simulated_s: float) -> None:
        """Keep only the first simulations, in generation order, that hold ``simulated_s`` seconds.

        The order is each folder's generation order (simulation 0, 1, ... -- each drawn from its own seed, so
        any prefix is a random sample), alternating between the folders of a multi-folder dataset (the i-th
        simulation of this split of every folder before the (i+1)-th of any). The subset is the shortest prefix reaching
        ``simulated_s``: a smaller budget keeps a subset of a larger one (nested training sets for
        data-scaling experiments), and a subset stays the same while the corpus grows, so a training resumed
        on a larger corpus continues on the same data. Normalisation ``stats`` stay those of the whole train
        split.
        """
        if not simulated_s > 0:
            raise InputError(f"simulated_s must be > 0, got {simulated_s}")
        folder = [r.index // DATASET_INDEX_STRIDE for r in self.records]
        rank = np.zeros(len(self.records), dtype=np.int64)       # position within its folder's records
        for k in set(folder):
            mine = sorted((j for j in range(len(self.records)) if folder[j] == k), key=lambda j: self.records[j].index)
            rank[mine] = np.arange(len(mine))
        order = sorted(range(len(self.records)), key=lambda j: (rank[j], folder[j]))
        total_s = np.cumsum([self.records[i].n_steps / 1000.0 for i in order])
        n = int(np.searchsorted(total_s, simulated_s - 1e-9) + 1)
        if total_s[-1] < simulated_s - 1e-9:
            raise InputError(f"{self._where()}: split {self.split!r} holds {total_s[-1]:.1f} simulated s, "
                             f"fewer than the {simulated_s:g} s asked for")
        self.records = [self.records[i] for i in sorted(order[:n])]
        self._build_windows()
        self.set_epoch(0)

    @property
    def simulated_s(self) -> float:
        """Simulated seconds of the simulations this dataset holds."""
        return float(sum(r.n_steps for r in self.records) / 1000.0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the spike-balanced sample for this epoch (no effect without ``spike_balance``)."""
        n = self._win_rec.size
        if self.spike_balance is None:
            self._order = np.arange(n)
            return
        spk, non = np.flatnonzero(self._win_spiking), np.flatnonzero(~self._win_spiking)
        n_spk = int(round(self.spike_balance * n))
        if n_spk and not spk.size:
            raise ValueError(f"spike_balance={self.spike_balance}: no window of split {self.split!r} holds a "
                             "somatic spike")
        if n - n_spk and not non.size:
            raise ValueError(f"spike_balance={self.spike_balance}: every window of split {self.split!r} holds "
                             "a somatic spike")
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = np.concatenate([rng.choice(spk, n_spk) if n_spk else np.zeros(0, np.int64),
                                rng.choice(non, n - n_spk) if n - n_spk else np.zeros(0, np.int64)])
        self._order = rng.permutation(order)

    @property
    def spiking_fraction(self) -> float:
        """Fraction of the current items whose window holds a somatic spike."""
        return float(self._win_spiking[self._order].mean()) if self._order.size else 0.0

    def __len__(self) -> int:
        return int(self._order.size)

    # ---------------------------------------------------------------- items
    def read(self, sim_pos: int, t0_ms: int, n_bins: int) -> dict:
        """Read bins [t0_ms, t0_ms + n_bins) of the ``sim_pos``-th record of this split as numpy arrays."""
        r = self.records[sim_pos]
        if t0_ms < 0 or t0_ms + n_bins > r.n_steps:
            raise IndexError(f"window [{t0_ms}, {t0_ms + n_bins}) outside the {r.n_steps} ms of {r.path}")
        src = self._source(r.path)
        out = {}
        sl = slice(t0_ms, t0_ms + n_bins)
        if "x_syn" in self.fields:
            ev = self.events
            t = src[f"{ev}/t_ms"][()]
            if r.events_sorted:  # bins ceil(t) in [t0, t0+W)  <=>  t in (t0 - 1, t0 + W - 1]
                lo = np.searchsorted(t, t0_ms - 1, side="right")
                hi = np.searchsorted(t, t0_ms + n_bins - 1, side="right")
            else:
                lo, hi = 0, t.size
            syn = src[f"{ev}/syn_idx"][lo:hi]
            w = src[f"{ev}/weight"][lo:hi] if f"{ev}/weight" in src else None
            out["x_syn"] = bin_events(syn, t[lo:hi], self.n_channels, t0_ms, n_bins, w)
        if "v" in self.fields:
            out["v"] = np.array(src["v_1ms"][:, sl], dtype=np.float32)     # a copy: never a view of a memmap
        if "imem" in self.fields:
            out["imem"] = np.array(src["imem_mean_1ms"][:, sl], dtype=np.float32)
        if "spike" in self.fields:
            out["spike"] = spike_indicator(r.spike_times_ms, t0_ms, n_bins)
        return out

    def __getitem__(self, item: int) -> dict:
        if not -len(self) <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} items")
        w = self._order[item]
        pos, t0 = int(self._win_rec[w]), int(self._win_t0[w])
        n_bins = self.window_ms or self.records[pos].n_steps
        out = {k: torch.from_numpy(v) for k, v in self.read(pos, t0, n_bins).items()}
        out["sim_index"] = torch.tensor(self.records[pos].index, dtype=torch.int64)
        out["t0_ms"] = torch.tensor(t0, dtype=torch.int64)
        return out

    # ---------------------------------------------------------------- statistics
    @property
    def stats(self) -> dict:
        """Per-segment / per-channel normalisation statistics of the train split (cached on disk).

        Keys: ``v_mean``, ``v_std`` [S] (mV), ``v0`` [S] (mean voltage at t = 0, mV), ``imem_mean``,
        ``imem_std`` [S] (nA; absent if the records have no ``imem_mean_1ms``), ``x_rate`` [C] (mean channel
        value per 1-ms bin), ``spike_rate`` (somatic spikes per bin), ``n_bins`` (train bins used). Standard deviations are floored at
        0.01 mV and 1e-6 nA.
        """
        if self._stats is None:
            self._stats = self._load_or_compute_stats()
        return self._stats

    def _load_or_compute_stats(self) -> dict:
        multi = self.meta is not None and "datasets" in self.meta     # a list of dataset directories
        if not multi and (not isinstance(self.root, Path) or not self.root.is_dir()):
            return compute_stats([p for _, p in self._all_records], self.n_channels, self.events)
        train = sorted(_split_indices(self._all_records, self.meta, "train"))
        paths = dict(self._all_records)
        if not train:
            raise InputError(f"{self.root}: the train split is empty; statistics need train simulations")
        files = [paths[i] for i in train]
        key = hashlib.sha256(json.dumps([_STATS_VERSION] + [[str(p) if multi else p.name, p.stat().st_size,
                                                              int(p.stat().st_mtime_ns)]
                                                             for p in files]).encode()).hexdigest()
        # one directory: its stats.npz; several: a file named by their set, in the first of them
        if multi:
            tag = hashlib.sha256(json.dumps(self.meta["datasets"]).encode()).hexdigest()[:8]
            cache = parse_folder_spec(self.meta["datasets"][0])[0] / f"stats_{tag}.npz"
        else:
            cache = self.root / STATS_NAME
        if cache.is_file():
            with np.load(cache) as z:
                if str(z["key"]) == key and str(z["events"]) == self.events:
                    return {k: z[k] for k in z.files if k not in ("key", "events")}
        stats = compute_stats(files, self.n_channels, self.events, cache=True)
        _savez_if_writable(cache, key=np.array(key), events=np.array(self.events), **stats)
        return stats


def _savez_if_writable(path: Path, **arrays) -> None:
    """Write ``path`` (npz) atomically -- a temporary file, then a rename -- or, where the folder is read-only or
    full, nothing at all (a cache: the caller keeps its values in memory)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):          # a half-written temporary (full disk)
            tmp.unlink(missing_ok=True)


STATS_PARTS_DIR = ".stats_parts"     # per-record moments, beside the records (a cache: safe to delete)


def record_moments(path, n_channels: int = 1278, events: str = "input_effective") -> dict:
    """Sufficient statistics of one record (streamed in 1024-ms chunks, float64).

    Returns ``n_bins``; ``v_mean``, ``v_m2`` [S] (mean and summed squared deviation, mV, mV^2); ``v0`` [S];
    ``imem_mean``, ``imem_m2`` [S] (absent without ``imem_mean_1ms``); ``x_count`` [C] (summed event weights of
    the bins); ``n_spikes``. :func:`combine_moments` pools records exactly (Chan et al.'s pairwise update)."""
    out = {}
    with h5py.File(path, "r") as f:
        v_ds = f["v_1ms"]
        S, T = v_ds.shape
        names = [("v", v_ds)] + ([("imem", f["imem_mean_1ms"])] if "imem_mean_1ms" in f else [])
        for name, ds in names:
            shift = np.asarray(ds[:, 0], dtype=np.float64)      # shifted sums: no cancellation
            if name == "v":
                out["v0"] = shift
            s1, s2 = np.zeros(S), np.zeros(S)
            for a in range(0, T, _STATS_CHUNK_MS):
                x = np.asarray(ds[:, a:a + _STATS_CHUNK_MS], dtype=np.float64) - shift[:, None]
                s1 += x.sum(1)
                s2 += (x * x).sum(1)
            out[f"{name}_mean"] = shift + s1 / T
            out[f"{name}_m2"] = np.maximum(s2 - s1 * s1 / T, 0.0)
        x_count = np.zeros(n_channels, dtype=np.float64)
        if events in f:
            syn = f[f"{events}/syn_idx"][()]
            t = f[f"{events}/t_ms"][()]
            keep = np.ceil(t) < T
            w = f[f"{events}/weight"][()][keep] if "weight" in f[events] else None
            x_count += np.bincount(syn[keep], weights=w, minlength=n_channels)
        out["x_count"] = x_count
        out["n_spikes"] = np.int64(f["soma_spike_times_ms"].shape[0]) if "soma_spike_times_ms" in f else np.int64(0)
    out["n_bins"] = np.int64(T)
    return out


def combine_moments(parts) -> dict:
    """Pool :func:`record_moments` of several records into normalisation statistics (see
    :attr:`SimulationDataset.stats`); ``imem_*`` only if every record has it."""
    parts = list(parts)
    if not parts:
        raise ValueError("compute_stats: no records")
    n = np.float64(0)
    acc = {}
    has_imem = all("imem_mean" in p for p in parts)
    for p in parts:
        m = np.float64(p["n_bins"])
        for name in ("v", "imem") if has_imem else ("v",):
            mean, m2 = p[f"{name}_mean"], p[f"{name}_m2"]
            if n == 0:
                acc[f"{name}_mean"], acc[f"{name}_m2"] = mean.copy(), m2.copy()
            else:
                delta = mean - acc[f"{name}_mean"]
                acc[f"{name}_mean"] += delta * (m / (n + m))
                acc[f"{name}_m2"] += m2 + delta * delta * (n * m / (n + m))
        n += m
    out = {
        "v_mean": acc["v_mean"].astype(np.float32),
        "v_std": np.maximum(np.sqrt(acc["v_m2"] / n), V_STD_FLOOR_MV).astype(np.float32),
        "v0": (sum(p["v0"] for p in parts) / len(parts)).astype(np.float32),
        "x_rate": (sum(p["x_count"] for p in parts) / n).astype(np.float32),
        "spike_rate": np.float32(sum(int(p["n_spikes"]) for p in parts) / n),
        "n_bins": np.int64(n),
    }
    if has_imem:
        out["imem_mean"] = acc["imem_mean"].astype(np.float32)
        out["imem_std"] = np.maximum(np.sqrt(acc["imem_m2"] / n), IMEM_STD_FLOOR_NA).astype(np.float32)
    return out


def _cached_moments(path: Path, n_channels: int, events: str) -> dict:
    """:func:`record_moments` of ``path``, kept in ``STATS_PARTS_DIR`` beside it (keyed by the record's size and
    modification time), so that a growing corpus only reads its new records; a read-only folder recomputes."""
    st = path.stat()
    key = json.dumps([_STATS_VERSION, path.name, st.st_size, int(st.st_mtime_ns), events, n_channels])
    part = path.parent / STATS_PARTS_DIR / f"{path.stem}.npz"
    if part.is_file():
        try:
            with np.load(part) as z:
                if str(z["key"]) == key:
                    return {k: z[k] for k in z.files if k != "key"}
        except (OSError, ValueError, KeyError):
            pass                                  # unreadable part: recompute it
    moments = record_moments(path, n_channels, events)
    _savez_if_writable(part, key=np.array(key), **moments)
    return moments


def compute_stats(paths, n_channels: int = 1278, events: str = "input_effective", cache: bool = False) -> dict:
    """Normalisation statistics over records (see :attr:`SimulationDataset.stats`); with ``cache`` each
    record's moments are kept beside it (``STATS_PARTS_DIR``) and reused while the record is unchanged."""
    paths = [Path(p) for p in paths]
    parts = (_cached_moments(p, n_channels, events) if cache else record_moments(p, n_channels, events)
             for p in paths)
    return combine_moments(parts)
