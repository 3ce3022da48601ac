"""A cheap synthetic "neuron" with the interface of :class:`lfdeep_neuron.data.dataset.SimulationDataset`.

For tests and development of the learning code without NEURON data. The cell is a small tree of S
passive-ish compartments (segment 0 = soma, segments 1..S-1 = dendrites, each the child of an earlier one)
with conductance-based synapses, a slow NMDA-like voltage-dependent excitatory current, axial coupling,
and an integrate-and-fire soma that emits a spike (point sample +30 mV, then reset and an
after-hyperpolarisation). It has hidden state (synaptic conductances, AHP), is nonlinear, and its next
voltage depends on the previous voltages of all segments: a surrogate needs its feedback input and
closed-loop errors can grow, as with the real cell.

Conventions are those of the real data (docs/ARCHITECTURE.md): channel c < S-1 is the excitatory synapse
of dendritic segment c + 1, channel (S-1) + c the inhibitory one; step k of ``x_syn`` holds the inputs
in (k-1, k] ms, ``v[:, k]`` is the voltage *at* k ms (mV), ``imem[:, k]`` the bin-mean membrane current
over (k-1, k] (nA, arbitrary scale), ``spike[k]`` = 1 when the soma fired in (k-1, k].

>>> ds = SyntheticDataset(split="train", window_ms=200, n_segments=6)
>>> item = ds[0]; item["x_syn"].shape, item["v"].shape      # ([10, 200], [6, 200])
>>> ds.stats["v_mean"].shape                                 # (6,)
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["simulate_synthetic", "synthetic_tables", "SyntheticDataset"]

_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}

# Model constants (ms, mV, arbitrary conductance units relative to the leak).
E_L, E_EXC, E_INH, E_AHP = -70.0, 0.0, -80.0, -90.0
TAU_M, TAU_EXC, TAU_NMDA, TAU_INH, TAU_AHP = 10.0, 3.0, 40.0, 8.0, 30.0
W_EXC, W_NMDA, W_INH, W_AHP = 1.0, 0.3, 0.5, 1.5
G_AXIAL = 4.0
V_THRESH, V_PEAK, V_RESET = -58.0, 30.0, -68.0
SUBSTEPS = 4
RATE_EXC, RATE_INH = 0.08, 0.035           # events per ms per channel (mean)


def _tree(n_segments: int, seed: int) -> np.ndarray:
    """Parent of every segment (-1 for the soma): a random tree biased towards chains."""
    rng = np.random.default_rng(seed + 12345)
    parent = np.full(n_segments, -1, dtype=np.int64)
    for i in range(1, n_segments):
        parent[i] = i - 1 if rng.random() < 0.6 else rng.integers(0, i)
    return parent


def synthetic_tables(n_segments: int, seed: int = 0) -> tuple[dict, dict]:
    """Segment and channel tables (the keys of a record's ``segments/`` and ``synapses/`` groups)."""
    S = n_segments
    parent = _tree(S, seed)
    rng = np.random.default_rng(seed + 777)
    start, end = np.zeros((S, 3)), np.zeros((S, 3))
    end[0] = (0.0, 20.0, 0.0)
    dist = np.zeros(S)
    length = np.full(S, 20.0)
    for i in range(1, S):
        start[i] = end[parent[i]]
        direction = rng.normal(size=3)
        direction[1] = abs(direction[1]) + 0.5
        length[i] = 30.0 + 40.0 * rng.random()
        end[i] = start[i] + length[i] * direction / np.linalg.norm(direction)
        dist[i] = dist[parent[i]] + length[i]
    diam = np.where(np.arange(S) == 0, 20.0, 2.0)
    segments = {
        "name": np.array(["soma[0]"] + [f"dend[{i - 1}]" for i in range(1, S)]),
        "x": np.full(S, 0.5),
        "sec_type": np.array(["soma"] + ["dend"] * (S - 1)),
        "sec_index": np.concatenate([[0], np.arange(S - 1)]).astype(np.int32),
        "xyz_start": start, "xyz_mid": (start + end) / 2, "xyz_end": end,
        "diam_um": diam, "area_um2": np.pi * diam * length, "length_um": length,
        "dist_from_soma_um": dist, "parent_seg": parent.astype(np.int32),
    }
    D = S - 1
    kind = np.repeat([0, 1], D).astype(np.int8)
    synapses = {
        "syn_idx": np.arange(2 * D, dtype=np.int32),
        "seg_idx": np.tile(np.arange(1, S), 2).astype(np.int32),
        "type": kind,
        "type_str": np.where(kind == 0, "exc", "inh"),
        "dead": np.zeros(2 * D, dtype=bool),
    }
    return segments, synapses


def simulate_synthetic(n_sims: int, duration_ms: int, n_segments: int, seed: int = 0,
                       cell_seed: int = 0) -> dict:
    """Simulate ``n_sims`` trials of the synthetic cell (vectorised over trials and segments).

    Returns
    -------
    dict of numpy float32 arrays: ``x_syn [n, C, T]`` (event counts), ``v [n, S, T]`` (mV, point samples),
    ``imem [n, S, T]`` (bin means), ``spike [n, T]`` (0/1); C = 2 (S - 1). ``v[:, :, 0]`` = E_L (rest).
    """
    S, D, T, n = n_segments, n_segments - 1, int(duration_ms), n_sims
    if S < 2:
        raise ValueError("the synthetic cell needs at least 2 segments (soma + 1 dendrite)")
    rng = np.random.default_rng(seed)
    parent = _tree(S, cell_seed)
    adj = np.zeros((S, S))
    for i in range(1, S):
        adj[i, parent[i]] = adj[parent[i], i] = 1.0
    lap = adj - np.diag(adj.sum(1))                       # axial coupling: lap @ v

    # Inputs: inhomogeneous Poisson counts per channel, rates modulated slowly and differently per trial.
    t = np.arange(T)
    freqs = rng.uniform(1.0, 6.0, size=(n, 2, 3)) / 1000.0          # cycles per ms
    phases = rng.uniform(0, 2 * np.pi, size=(n, 2, 3))
    mod = np.sin(2 * np.pi * freqs[..., None] * t + phases[..., None]).mean(2)   # [n, 2, T]
    base = rng.uniform(0.6, 1.4, size=(n, 2, 1))
    rate_exc = RATE_EXC * base[:, 0] * (1 + 0.9 * mod[:, 0])            # events per ms per channel
    rate_inh = RATE_INH * base[:, 1] * (1 + 0.9 * mod[:, 1])
    lam = np.concatenate([np.repeat(rate_exc[:, None], D, 1), np.repeat(rate_inh[:, None], D, 1)], 1)
    x_syn = rng.poisson(np.clip(lam, 0, None)).astype(np.float32)   # [n, 2D, T]

    v = np.full((n, S), E_L)
    g_exc, g_nmda, g_inh, g_ahp = (np.zeros((n, S)) for _ in range(4))
    V, I, SP = (np.zeros((n, S, T), np.float32), np.zeros((n, S, T), np.float32), np.zeros((n, T), np.float32))
    V[:, :, 0] = v
    dt = 1.0 / SUBSTEPS
    for k in range(1, T):
        g_exc[:, 1:] += W_EXC * x_syn[:, :D, k]
        g_nmda[:, 1:] += W_NMDA * x_syn[:, :D, k]
        g_inh[:, 1:] += W_INH * x_syn[:, D:, k]
        i_sum = np.zeros((n, S))
        fired = np.zeros(n, dtype=bool)
        for _ in range(SUBSTEPS):
            mg = 1.0 / (1.0 + np.exp(-(v + 35.0) / 6.0))            # NMDA-like voltage dependence
            i_mem = (E_L - v) + g_exc * (E_EXC - v) + g_nmda * mg * (E_EXC - v) + g_inh * (E_INH - v) \
                + g_ahp * (E_AHP - v)
            v = v + dt / TAU_M * (i_mem + G_AXIAL * v @ lap.T)
            i_sum += i_mem
            g_exc *= np.exp(-dt / TAU_EXC); g_nmda *= np.exp(-dt / TAU_NMDA)
            g_inh *= np.exp(-dt / TAU_INH); g_ahp *= np.exp(-dt / TAU_AHP)
            hit = (v[:, 0] > V_THRESH) & ~fired
            v[hit, 0] = V_RESET
            g_ahp[hit, 0] += W_AHP
            fired |= hit
        V[:, :, k] = v
        V[fired, 0, k] = V_PEAK                                      # the point sample catches the spike
        I[:, :, k] = -i_sum / SUBSTEPS * 0.01
        SP[:, k] = fired
    return {"x_syn": x_syn, "v": V, "imem": I, "spike": SP}


class SyntheticDataset(Dataset):
    """Windows of synthetic simulations; same interface as ``SimulationDataset``.

    Parameters
    ----------
    root : ignored
        Present for signature compatibility with ``SimulationDataset(root, split, ...)``.
    split : {"train", "val", "test"}
        Different trials (seeds) of the same cell.
    window_ms, stride_ms : int
        Window length and spacing (steps of 1 ms); default stride = window. ``window_ms=None``: one item
        per trial (its whole length), as ``SimulationDataset``.
    spike_balance : float, optional
        Oversample windows that contain a somatic spike so that about this fraction of the index does.
    seed : int
        Seed of the trials (the cell's shape is fixed by ``cell_seed``).
    n_segments : int
        S; channels C = 2 (S - 1).
    n_sims : int, optional
        Trials in this split (default 8 for train, 2 otherwise).
    duration_ms : int
        Length of each trial.
    """

    def __init__(self, root=None, split: str = "train", window_ms: int | None = 200, stride_ms: int | None = None,
                 spike_balance: float | None = None, seed: int = 0, *, n_segments: int = 6,
                 n_sims: int | None = None, duration_ms: int = 2000, cell_seed: int = 0):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {list(_SPLIT_OFFSET)}, got {split!r}")
        duration_ms = int(duration_ms)
        window_ms = duration_ms if window_ms is None else int(window_ms)   # None: whole trials
        if not 1 <= window_ms <= duration_ms:
            raise ValueError(f"window_ms must be in [1, duration_ms={duration_ms}], got {window_ms}")
        self.split, self.window_ms = split, window_ms
        self.stride_ms = int(stride_ms or window_ms)
        self.seed, self.n_segments, self.duration_ms, self.cell_seed = seed, n_segments, duration_ms, cell_seed
        self.n_sims = n_sims if n_sims is not None else (8 if split == "train" else 2)
        self.data = simulate_synthetic(self.n_sims, duration_ms, n_segments, seed=self._split_seed(split),
                                       cell_seed=cell_seed)
        self.segments, self.synapses = synthetic_tables(n_segments, cell_seed)
        self.provenance = {"data": "synthetic", "n_segments": n_segments, "seed": seed, "cell_seed": cell_seed,
                           "duration_ms": duration_ms, "n_sims": self.n_sims, "split": split}
        starts = np.arange(0, duration_ms - window_ms + 1, self.stride_ms)
        self.windows = np.array([(i, s) for i in range(self.n_sims) for s in starts], dtype=np.int64)
        if spike_balance is not None:
            self.windows = self._balance(self.windows, float(spike_balance))
        self._stats = None

    def _split_seed(self, split: str) -> int:
        return 1000 * self.seed + _SPLIT_OFFSET[split]

    def _balance(self, windows: np.ndarray, fraction: float) -> np.ndarray:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"spike_balance must be in (0, 1), got {fraction}")
        has = np.array([self.data["spike"][i, s:s + self.window_ms].any() for i, s in windows])
        n_pos, n_neg = int(has.sum()), int((~has).sum())
        if n_pos == 0 or n_neg == 0:
            return windows
        reps = max(1, int(round(fraction / (1 - fraction) * n_neg / n_pos)))
        return np.concatenate([windows[~has], np.repeat(windows[has], reps, axis=0)])

    @property
    def stats(self) -> dict:
        """Normalisation statistics of the *training* split: ``v_mean``, ``v_std`` [S] (mV), ``imem_mean``,
        ``imem_std`` [S] (nA), ``x_rate`` [C] (mean channel value per ms), ``v0`` [S] (mV at t = 0),
        ``spike_rate`` (somatic spikes per 1-ms bin), ``n_bins``."""
        if self._stats is None:
            d = self.data if self.split == "train" else simulate_synthetic(
                8 if self.split != "train" else self.n_sims, self.duration_ms, self.n_segments,
                seed=self._split_seed("train"), cell_seed=self.cell_seed)
            self._stats = {
                "v_mean": d["v"].mean((0, 2)), "v_std": d["v"].std((0, 2)),
                "imem_mean": d["imem"].mean((0, 2)), "imem_std": d["imem"].std((0, 2)),
                "x_rate": d["x_syn"].mean((0, 2)), "v0": d["v"][:, :, 0].mean(0),
                "spike_rate": float(d["spike"].mean()), "n_bins": int(d["spike"].size),
            }
        return self._stats

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> dict:
        i, s = self.windows[idx]
        sl = slice(s, s + self.window_ms)
        d = self.data
        return {"x_syn": torch.from_numpy(d["x_syn"][i, :, sl].copy()),
                "v": torch.from_numpy(d["v"][i, :, sl].copy()),
                "imem": torch.from_numpy(d["imem"][i, :, sl].copy()),
                "spike": torch.from_numpy(d["spike"][i, sl].copy())}

    # the simulation-source interface of SimulationDataset (``records``, ``read``), used by training
    @property
    def records(self) -> list:
        """One entry per trial: ``index``, ``n_steps`` (ms), ``spike_times_ms`` (spike bins: ceil(t) = bin)."""
        return [SimpleNamespace(index=i, n_steps=self.duration_ms,
                                spike_times_ms=np.flatnonzero(self.data["spike"][i]).astype(np.float64))
                for i in range(self.n_sims)]

    def read(self, sim_pos: int, t0_ms: int, n_bins: int) -> dict:
        """Bins ``[t0_ms, t0_ms + n_bins)`` of trial ``sim_pos`` as numpy arrays (``x_syn``, ``v``, ``imem``, ``spike``)."""
        if t0_ms < 0 or t0_ms + n_bins > self.duration_ms:
            raise IndexError(f"window [{t0_ms}, {t0_ms + n_bins}) outside the {self.duration_ms} ms of a trial")
        sl = slice(t0_ms, t0_ms + n_bins)
        return {k: self.data[k][sim_pos, ..., sl].copy() for k in ("x_syn", "v", "imem", "spike")}

    # whole trials, for closed-loop evaluation
    def simulation(self, i: int) -> dict:
        """Trial ``i`` in full: ``x_syn [C, T]``, ``v [S, T]``, ``imem [S, T]``, ``spike [T]`` (tensors)."""
        d = self.data
        return {k: torch.from_numpy(d[k][i].copy()) for k in ("x_syn", "v", "imem", "spike")}
