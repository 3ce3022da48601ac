"""Voltage, input and spike recordings of surrogate instances, to arrays or HDF5.

A :class:`Recording` is made by :meth:`SurrogateEngine.record` before a run. It is one of the
engine's sinks (:mod:`lfdeep_neuron.cosim.sinks`): at every surrogate step the engine hands it the
prediction of its rows; it keeps the requested rows and segments (on the
engine's device, one small copy per step) and concatenates them on demand. Spikes are kept by the
engine for all its instances (:meth:`SurrogateEngine.spikes`).

Time axis (the engine's timing rule, the same as ``lfdeep-neuron rollout``): sample k is the time
t0 + k·Δ; sample 0 is the initial state (``model.v_rest``, no forward pass; spike logit NaN) and
sample k >= 1 the prediction of step k, which consumed the inputs of (k-1, k]. A run to
``tstop = T·Δ`` gives T samples, like a record's ``v_1ms`` with ``duration_ms = T``.

Layout of :meth:`Recording.to_hdf5` (one cell per row; ``v_mV[i]`` has the meaning of a
record's ``v_1ms``, ``spike_logit[i]`` of rollout's ``spike_logit_1ms``)::

    /v_mV          float32 [n_cells, n_segments, T]   voltages at t_ms (point samples, mV)
    /t_ms          float64 [T]                         t0 + k·Δ (0, 1, 2, ... ms)
    /gid           int64   [n_cells]                   gid of each row (-1 - local index if none)
    /segment_index int64   [n_segments]                index in the canonical segment order
    /segment_name  bytes   [n_segments]                e.g. b'apic[36]' (x in segment_x)
    /segment_x     float64 [n_segments]
    /spike_logit   float32 [n_cells, T]                if recorded (NaN at k = 0)
    /imem_nA       float32 [n_cells, n_segments, T]   if recorded: predicted bin-mean membrane currents
                                                       over (k-1, k] (nA; models with current tasks)
    /inputs        float64 [n_cells, 1278, T]          if recorded: channel sums each step consumed;
                                                       column 0: the events cleared at t0, not fed
    /spikes/gid, /spikes/t_ms                          spikes emitted by the engine's instances
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lfdeep_neuron.cosim.sinks import EngineSink, SinkStep

__all__ = ["Recording", "segment_indices"]


def segment_indices(segments, table) -> np.ndarray | None:
    """Canonical indices of the requested segments (None = all, table unknown).

    Parameters
    ----------
    segments : None, 'all', 'soma', int, list of int or list of str
        ``None``/``'all'``: every segment; ``'soma'``: the somatic segment; names are
        ``'apic[36]'`` (a section with one segment) or ``'apic[36](0.25)'`` (the segment
        containing x).
    table : dict or None
        The segment table (``name``, ``x``); needed for names.
    """
    if segments is None or (isinstance(segments, str) and segments == "all"):
        return None if table is None else np.arange(len(table["name"]))
    if isinstance(segments, str) and segments == "soma":
        segments = [0]
    if isinstance(segments, (int, np.integer, str)):
        segments = [segments]
    out = []
    for s in segments:
        if isinstance(s, (int, np.integer)):
            out.append(int(s))
            continue
        if table is None:
            raise ValueError("segment names need the model's segment table (model.meta['segments'])")
        from lfdeep_neuron.hay.channels import ChannelMap

        name, x = str(s), None
        if name.endswith(")") and "(" in name:
            name, xs = name[:-1].split("(", 1)
            x = float(xs)
        out.append(ChannelMap.segment_of(table, name, x))
    idx = np.asarray(out, np.int64)
    if table is not None:
        bad = idx[(idx < 0) | (idx >= len(table["name"]))]
        if len(bad):
            raise ValueError(f"segment indices out of range [0, {len(table['name'])}): {bad.tolist()}")
    return idx


class Recording(EngineSink):
    """Voltages (and optionally inputs, spike logits, predicted currents) of chosen instances.

    An :class:`~lfdeep_neuron.cosim.sinks.EngineSink`: made and attached by
    :meth:`SurrogateEngine.record`; it keeps copies of its rows and segments on the engine's
    device, one per step, and stacks them on demand.
    """

    def __init__(self, engine, cells=None, segments="all", inputs: bool = False, logits: bool = False,
                 currents: bool = False):
        self.engine = engine
        self._cells = None if cells is None else list(cells)
        for c in self._cells or []:
            if c.engine is not engine:
                raise ValueError("Recording: a cell given belongs to another SurrogateEngine")
        self._seg = segment_indices(segments, engine.segments)
        self.keep_inputs = bool(inputs)
        self.wants_inputs = self.keep_inputs
        self.keep_logits = bool(logits)
        self.keep_currents = bool(currents)
        if self.keep_currents and not engine.predicts_currents:
            raise ValueError("currents=True needs a surrogate with membrane-current tasks (trained with --imem)")
        self._gids = np.zeros(0, np.int64)
        self._v, self._x, self._logit, self._imem, self._steps = [], [], [], [], []

    def reset(self, engine):
        """At finitialize: map cells to rows, forget old samples; returns the rows (None = all)."""
        import torch

        n_local = engine.n_local
        if self._cells is None:
            rows = None
            self._gids = engine.gids
        else:
            rows = np.array([c.index for c in self._cells], np.int64)
            if len(rows) and rows.max() >= n_local:
                raise ValueError("Recording: a cell is no longer an instance of this engine (closed?)")
            self._gids = engine.gids[rows]
        table = engine.segments
        self._all_segs = self._seg is None or (
            table is not None and np.array_equal(self._seg, np.arange(len(table["name"]))))
        self._seg_t = None if self._seg is None else torch.as_tensor(self._seg, device=engine.device)
        self._v, self._x, self._logit, self._imem, self._steps = [], [], [], [], []
        return rows

    def append_inputs(self, inputs: np.ndarray):
        """Keep the channel sums (float64 [n, 1278], a copy) the step is about to consume."""
        self._x.append(inputs)

    def append(self, step: SinkStep):
        """Keep the recorded segments of the step's voltages (mV), logits and currents (nA)."""
        self._steps.append(step.k)
        if self.keep_logits:
            self._logit.append(step.spike_logit.clone())
        if self._seg is not None and len(self._seg) == 0:
            return
        self._v.append(self._select(step.v_mV))
        if self.keep_currents:
            self._imem.append(self._select(step.imem_nA))

    def _select(self, a):
        """The recorded segments of a [n, S] tensor (a copy)."""
        return a.clone() if self._all_segs else a.index_select(1, self._seg_t)

    # ---- results ----------------------------------------------------------------------------

    @property
    def gid(self) -> np.ndarray:
        """gid of each recorded row (``-1 - local index`` for instances without gid)."""
        return self._gids

    @property
    def segment_index(self) -> np.ndarray:
        if self._seg is None:
            return np.arange(self._v[0].shape[1] if self._v else 0)
        return self._seg

    @property
    def t_ms(self) -> np.ndarray:
        """Time of each sample (ms): t0 + k·Δ (sample 0: the initial state)."""
        return np.array([self.engine.step_time(k) for k in self._steps], np.float64)

    @staticmethod
    def _stack(chunks, shape_if_empty, dtype=np.float32):
        import torch

        if not chunks:
            return np.zeros(shape_if_empty, dtype)
        want = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
        return torch.stack(chunks, dim=-1).to(device="cpu", dtype=want).numpy()

    def array(self, name: str, dtype=np.float32) -> np.ndarray:
        """``'v_mV'``, ``'imem_nA'`` or ``'spike_logit'`` as float32 (as the properties) or float64.

        float64 keeps what an engine running in float64 computed (the properties round to float32,
        which matters e.g. before the axial Laplacian, which amplifies round-off).
        """
        n_seg = (len(self._gids), len(self.segment_index), len(self._steps))
        if name == "v_mV":
            return self._stack(self._v, n_seg, dtype)
        if name == "imem_nA":
            if not self.keep_currents:
                raise ValueError("currents were not recorded: engine.record(..., currents=True)")
            return self._stack(self._imem, n_seg, dtype)
        if name == "spike_logit":
            if not self.keep_logits:
                raise ValueError("spike logits were not recorded: engine.record(..., logits=True)")
            return self._stack(self._logit, (len(self._gids), len(self._steps)), dtype)
        raise ValueError(f"unknown recorded array {name!r}: 'v_mV', 'imem_nA' or 'spike_logit'")

    @property
    def v_mV(self) -> np.ndarray:
        """Voltages, float32 [n_cells, n_segments, T] (mV)."""
        return self.array("v_mV")

    @property
    def imem_nA(self) -> np.ndarray:
        """Predicted bin-mean membrane currents, float32 [n_cells, n_segments, T] (nA; needs
        ``currents=True``): column k >= 1 is the mean over (k-1, k] ms, column 0 zero (rest)."""
        return self.array("imem_nA")

    @property
    def spike_logit(self) -> np.ndarray:
        """Somatic spike logits, float32 [n_cells, T] (needs ``logits=True``); NaN at sample 0."""
        return self.array("spike_logit")

    @property
    def inputs(self) -> np.ndarray:
        """Channel sums each step consumed, float64 [n_cells, 1278, T] (needs ``inputs=True``).

        Column k >= 1: the inputs step k fed to the model; column 0: the events cleared at t0 and
        not fed (bin 0, as in :func:`lfdeep_neuron.data.dataset.bin_events` / ``rollout``).
        """
        if not self.keep_inputs:
            raise ValueError("inputs were not recorded: engine.record(..., inputs=True)")
        if not self._x:
            from lfdeep_neuron.cosim.engine import N_CHANNELS

            return np.zeros((len(self._gids), N_CHANNELS, 0))
        return np.stack(self._x, axis=-1)

    def to_hdf5(self, path):
        """Write the recording and the engine's spikes (layout in the module doc); atomic."""
        import h5py

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        gid_sp, t_sp = self.engine.spikes()
        seg = self.segment_index
        with h5py.File(tmp, "w") as f:
            f.create_dataset("v_mV", data=self.v_mV, compression="gzip", compression_opts=4)
            f["t_ms"] = self.t_ms
            f["gid"] = self.gid
            f["segment_index"] = seg
            table = self.engine.segments
            if table is not None:
                f["segment_name"] = np.asarray(table["name"])[seg].astype("S")
                f["segment_x"] = np.asarray(table["x"], np.float64)[seg]
            if self.keep_logits:
                f["spike_logit"] = self.spike_logit
            if self.keep_currents:
                f.create_dataset("imem_nA", data=self.imem_nA, compression="gzip", compression_opts=4)
            if self.keep_inputs:
                f.create_dataset("inputs", data=self.inputs, compression="gzip", compression_opts=4)
            f["spikes/gid"] = gid_sp
            f["spikes/t_ms"] = t_sp
            f.attrs["step_ms"] = self.engine.step_ms
            f.attrs["spike_threshold"] = self.engine.spike_threshold
            f.attrs["units"] = "v_mV: mV; t_ms: ms; inputs: reference-synapse weight units"
        tmp.replace(path)
        return path
