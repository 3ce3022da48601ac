"""Run one :class:`~lfdeep_neuron.hay.HayL5PC` and return its traces on the project's time grids.

The run follows the original dataset script (BIOPHYSICS.md §0.1, §2.3): ``finitialize(v_init)``,
input events queued after the INITIAL blocks, then ``fadvance()`` until ``t >= duration``. NEURON's
``Vector.record`` stores every integrator step (C side, no Python per step and per segment); the
stored steps are harvested every ``chunk_ms`` of simulated time (bounded memory) and mapped onto:

* ``v_1ms`` [S, T]: point samples at t = 0, 1, ..., T-1 ms, by **linear interpolation between
  integrator steps** (what the reference script does; CVODE's own interpolation polynomial would
  differ during spikes);
* ``v_soma_0p1ms``: soma(0.5) the same way at t = k/10 ms;
* ``v_mean_1ms`` [S, T] (``bin_means=True``): the mean of v over each 1-ms bin (k-1, k] in the sense
  of the integrator's membrane current, so that ``imem_mean_1ms = -L v_mean_1ms`` holds exactly for
  the axial Laplacian L of the cell (:class:`lfdeep_neuron.lfp.AxialLaplacian`): the integral of the
  piecewise-linear v between CVODE steps; for Crank-Nicolson the trapezoid of the step values (its
  ``i_membrane_`` of a step is -L times the step's mid-point voltage (v_j-1 + v_j)/2); for backward
  Euler the mean of the step-end values. Column 0 holds the value at t = 0 (the bin (-1, 0] is empty).
  This is all the LFP needs, at the cost of recording v alone.
* ``imem_mean_1ms`` [S, T] (``record_imem=True``, implies ``bin_means``): NEURON's ``i_membrane_``
  (fast_imem, nA) itself, recorded and averaged the same way (the check of the identity above).

Somatic spikes are upward crossings of 0 mV at soma(0.5): NetCon threshold events with CVODE's
interpolated crossing time; with a fixed step, the crossing linearly interpolated between the two
recorded steps that bracket it (a NetCon would report the step's end, up to dt late).

Engines (fixed step only for CoreNEURON): ``engine='neuron'`` advances with ``fadvance``;
``engine='coreneuron'`` hands the same model to CoreNEURON (``ParallelContext.psolve`` in chunks), which
gives the same trajectories (tested to 1e-6 mV) faster. It needs mechanisms compiled for CoreNEURON
(``lfdeep_neuron.mechanisms.load(coreneuron=True)``, called before the cell is built).
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["run_cell", "INTEGRATORS", "ENGINES", "CVODE_ATOL", "CVODE_RTOL", "FIXED_DT_MS", "V_INIT_MV",
           "CELSIUS", "upward_crossings"]

INTEGRATORS = ("cvode", "fixed", "fixed_cn")
ENGINES = ("neuron", "coreneuron")
CVODE_ATOL = 1e-3     # the published data set's setting (BIOPHYSICS.md §2.3)
CVODE_RTOL = 0.0
FIXED_DT_MS = 0.025
V_INIT_MV = -76.0
CELSIUS = 6.3         # NEURON's default; the Beniaguev script never changed it


def _bracket(t: np.ndarray, tq: np.ndarray):
    """Index j with t[j] <= tq < t[j+1] (clipped) and the linear weight of t[j+1]."""
    j = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, len(t) - 2)
    span = t[j + 1] - t[j]
    w = np.divide(tq - t[j], span, out=np.ones_like(tq), where=span > 0)
    return j, w


def _interp_rows(t: np.ndarray, y: np.ndarray, tq: np.ndarray) -> np.ndarray:
    """Linear interpolation of every row of ``y`` [S, n] (samples at ``t`` [n]) at times ``tq``."""
    j, w = _bracket(t, tq)
    return y[:, j] * (1.0 - w) + y[:, j + 1] * w


def _integral_rows(t: np.ndarray, y: np.ndarray, tq: np.ndarray, mode: str) -> np.ndarray:
    """∫_{t[0]}^{tq} y dt for every row of ``y`` [S, n] at times ``tq`` (t[0] <= tq <= t[-1]).

    mode 'linear': y is piecewise linear between the samples (CVODE steps).
    mode 'step': y equals y[j+1] on (t[j], t[j+1]] (fixed-step backward Euler: the current of a step).
    """
    dt = np.diff(t)
    if mode == "linear":
        area = y[:, 1:] + y[:, :-1]           # one temporary, then everything in place
        area *= 0.5 * dt
    else:
        area = y[:, 1:] * dt
    np.cumsum(area, axis=1, out=area)         # area[:, m] = ∫ from t[0] to t[m+1]
    j, w = _bracket(t, tq)
    cum = np.where(j > 0, area[:, np.maximum(j - 1, 0)], 0.0)    # ∫ from t[0] to t[j]
    if mode == "linear":
        yq = y[:, j] * (1.0 - w) + y[:, j + 1] * w
        return cum + 0.5 * (tq - t[j]) * (y[:, j] + yq)
    return cum + (tq - t[j]) * y[:, j + 1]


def upward_crossings(t_ms: np.ndarray, v_mV: np.ndarray, threshold_mV: float = 0.0) -> np.ndarray:
    """Times at which ``v`` crosses ``threshold_mV`` upwards, linearly interpolated between samples.

    A crossing is a pair of consecutive samples with ``v[j-1] < threshold <= v[j]`` (NetCon's rule).
    """
    v = np.asarray(v_mV, dtype=np.float64)
    t = np.asarray(t_ms, dtype=np.float64)
    j = np.flatnonzero((v[:-1] < threshold_mV) & (v[1:] >= threshold_mV)) + 1
    frac = (threshold_mV - v[j - 1]) / (v[j] - v[j - 1])
    return t[j - 1] + frac * (t[j] - t[j - 1])


def run_cell(cell, duration_ms: float, *, integrator: str = "cvode", atol: float = CVODE_ATOL,
             rtol: float = CVODE_RTOL, dt_ms: float = FIXED_DT_MS, v_init_mV: float = V_INIT_MV,
             celsius: float = CELSIUS, record_imem: bool = False, bin_means: bool = False,
             engine: str = "neuron", chunk_ms: float | None = None, progress: bool = False) -> dict:
    """Simulate ``cell`` (with whatever inputs it holds) for ``duration_ms``.

    NEURON holds one model per process: every cell that exists is simulated, only ``cell`` is
    recorded. The integrator's global settings (CVODE on/off, tolerances, dt, second order, fast_imem)
    are set for this run and restored afterwards, so that later runs in the process (e.g. a network
    with the co-simulation engine) are not changed behind their back; ``celsius`` stays as set.

    Parameters
    ----------
    cell : HayL5PC
    duration_ms : float
        Simulated time; a whole number of ms (T = duration_ms samples on the 1-ms grid).
    integrator : {'cvode', 'fixed', 'fixed_cn'}
        'cvode': NEURON's global variable-step CVODE with ``atol`` (all states, scale 1) and ``rtol``
        (the references: 1e-3, 0). 'fixed': backward Euler with step ``dt_ms`` (NEURON's default
        fixed step, ``secondorder = 0``). 'fixed_cn': Crank-Nicolson (``secondorder = 2``), same cost
        per step, ~5x closer to the CVODE reference at dt = 0.025 ms (see the closing note of issue 2).
    v_init_mV : float
        ``finitialize`` voltage (-76 mV in the references); no settling period.
    celsius : float
        Sets NEURON's global ``celsius`` (6.3 °C in the references; it only enters the Nernst eca).
    record_imem : bool
        Also record ``i_membrane_`` and return ``imem_mean_1ms`` and ``v_mean_1ms`` (bin means, see the
        module docstring). Costs ~30 % more than recording v alone.
    bin_means : bool
        Return ``v_mean_1ms`` (from the recorded v alone; ``imem_mean_1ms = -L v_mean_1ms``).
    engine : {'neuron', 'coreneuron'}
        Who integrates (see the module docstring); 'coreneuron' needs a fixed-step integrator.
    chunk_ms : float, optional
        Harvest interval of the recorded steps (memory bound: S x steps-per-chunk doubles); default
        100 ms with NEURON, 1000 ms with CoreNEURON (each ``psolve`` call transfers the model; 1 s of
        recorded steps at dt 0.05 ms is ~100 MB).
    progress : bool
        Show a tqdm bar over simulated time.

    Returns
    -------
    dict
        ``t_1ms`` [T] ms, ``v_1ms`` float32 [S, T] mV, ``t_0p1ms`` [10T] ms, ``v_soma_0p1ms`` float32 mV,
        ``soma_spike_times_ms`` float64, ``integrator_steps`` (fadvance calls), ``wall_s``, the run
        settings (``integrator``, ``cvode_atol``, ``cvode_rtol``, ``dt_ms``, ``v_init_mV``, ``celsius``,
        ``duration_ms``, ``engine``), with ``bin_means`` ``v_mean_1ms`` and with ``record_imem`` also
        ``imem_mean_1ms`` float32 [S, T] (mV, nA).
    """
    from neuron import h

    cvode = h.CVode()
    saved = (cvode.active(), cvode.atol(), cvode.rtol(), h.dt, h.secondorder, cvode.use_fast_imem())
    try:
        return _run_cell(cell, duration_ms, integrator=integrator, atol=atol, rtol=rtol, dt_ms=dt_ms,
                         v_init_mV=v_init_mV, celsius=celsius, record_imem=record_imem, bin_means=bin_means,
                         engine=engine, chunk_ms=chunk_ms, progress=progress)
    finally:
        cvode.active(saved[0])
        cvode.atol(saved[1])
        cvode.rtol(saved[2])
        h.dt, h.secondorder = saved[3], saved[4]
        cvode.use_fast_imem(saved[5])


def _run_cell(cell, duration_ms: float, *, integrator: str, atol: float, rtol: float, dt_ms: float,
              v_init_mV: float, celsius: float, record_imem: bool, bin_means: bool, engine: str,
              chunk_ms: float | None, progress: bool) -> dict:
    """The body of :func:`run_cell` (which holds the defaults and restores the integrator settings)."""
    from neuron import h

    T = int(round(duration_ms))
    if T < 1 or abs(T - duration_ms) > 1e-9:
        raise ValueError(f"duration_ms must be a positive whole number of ms, got {duration_ms}")
    if integrator not in INTEGRATORS:
        raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
    if integrator != "cvode" and not dt_ms > 0:
        raise ValueError(f"dt_ms must be > 0, got {dt_ms}")
    if integrator == "cvode" and not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "coreneuron" and integrator == "cvode":
        raise ValueError("engine 'coreneuron' needs a fixed-step integrator ('fixed' or 'fixed_cn')")
    if chunk_ms is None:
        chunk_ms = 1000.0 if engine == "coreneuron" else 100.0
    bin_means = bin_means or record_imem

    h.celsius = celsius
    cvode = h.CVode()
    cvode.cache_efficient(1)      # ~12 % faster here, same trajectories (measured on the reference)
    if integrator == "cvode":
        cvode.active(1)
        cvode.atol(atol)
        cvode.rtol(rtol)
        h.secondorder = 0
    else:
        cvode.active(0)
        h.dt = dt_ms
        h.secondorder = 2 if integrator == "fixed_cn" else 0
    cvode.use_fast_imem(1 if record_imem else 0)
    # How v and i_membrane_ vary between two recorded steps (see _integral_rows): CVODE's v and i are
    # piecewise linear; a fixed step's i_membrane_ is one value per step, taken at the step's end
    # (backward Euler) or its mid-point (Crank-Nicolson, whose v is then integrated as trapezoids).
    v_mode = "step" if integrator == "fixed" else "linear"
    i_mode = "linear" if integrator == "cvode" else "step"

    segs = cell.segments
    S = len(segs)
    tvec = h.Vector()
    tvec.record(h._ref_t)
    vvecs = [h.Vector() for _ in range(S)]
    for vec, seg in zip(vvecs, segs):
        vec.record(seg._ref_v)
    ivecs = []
    if record_imem:
        ivecs = [h.Vector() for _ in range(S)]
        for vec, seg in zip(ivecs, segs):
            vec.record(seg._ref_i_membrane_)
    spikes = h.Vector()
    detector = None
    if integrator == "cvode":
        detector = cell.spike_netcon()
        detector.record(spikes)

    rec = _Harvest(T, S, v_mode, i_mode, bin_means, record_imem)
    solver = _CoreNeuronSolver(h) if engine == "coreneuron" else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=T, unit="ms", desc="simulating", leave=False)
    wall0 = time.perf_counter()
    h.finitialize(v_init_mV)
    rec.take(tvec, vvecs, ivecs)                # the t = 0 record
    steps = 0
    chunk_end = 0.0
    # A fixed step's t is a running sum of dt and lands a hair below a chunk's end: stop within half a
    # step of it (CoreNEURON's psolve would otherwise be asked for the same end again and again).
    slack = 0.0 if integrator == "cvode" else 0.5 * dt_ms
    while h.t < duration_ms - slack:
        chunk_end = min(chunk_end + chunk_ms, float(duration_ms))
        t_before = h.t
        if solver is not None:
            steps += solver.advance(chunk_end, h.dt)
        else:
            while h.t < chunk_end - slack:
                h.fadvance()
                steps += 1
        rec.take(tvec, vvecs, ivecs)
        if h.t >= duration_ms - slack:
            rec.take_final(h.t, segs)
        if bar is not None:
            bar.update(min(h.t, duration_ms) - t_before)
    wall = time.perf_counter() - wall0
    if bar is not None:
        bar.close()
    if solver is not None:
        solver.close()
    spike_times = spikes.as_numpy().copy() if detector is not None else rec.soma_crossings_ms()

    out = {
        "t_1ms": rec.grid_1ms,
        "v_1ms": rec.v_1ms,
        "t_0p1ms": rec.grid_0p1ms,
        "v_soma_0p1ms": rec.v_soma,
        "soma_spike_times_ms": spike_times,
        "integrator_steps": steps,
        "wall_s": wall,
        "integrator": integrator,
        "cvode_atol": float(atol) if integrator == "cvode" else float("nan"),
        "cvode_rtol": float(rtol) if integrator == "cvode" else float("nan"),
        "dt_ms": float(dt_ms) if integrator != "cvode" else float("nan"),
        "v_init_mV": float(v_init_mV),
        "celsius": float(celsius),
        "duration_ms": float(duration_ms),
        "engine": engine,
    }
    out.update(rec.finish())
    return out


class _Harvest:
    """Maps the recorded integrator steps onto the output grids, one chunk of steps at a time.

    Keeps the last step of the previous chunk so that interpolation and integrals run across chunk
    boundaries, and the running integrals of i_membrane_ and v from t = 0 to that step.
    """

    def __init__(self, T: int, S: int, v_mode: str, i_mode: str, bin_means: bool, record_imem: bool):
        self.T, self.v_mode, self.i_mode = T, v_mode, i_mode
        self.bin_means, self.record_imem = bin_means, record_imem
        self.grid_1ms = np.arange(T, dtype=np.float64)
        self.grid_0p1ms = np.arange(10 * T, dtype=np.float64) / 10.0
        self.v_1ms = np.empty((S, T), dtype=np.float32)
        self.v_soma = np.empty(10 * T, dtype=np.float32)
        self.n1 = self.n01 = 0            # next unfilled samples of the two grids
        self.last = None                  # (t, v [S], i [S]) of the last harvested step
        self.soma_crossings: list[np.ndarray] = []
        if bin_means:
            self.int_i = np.zeros((S, T)) if record_imem else None  # ∫_0^k i dt at the bin edges
            self.int_v = np.zeros((S, T))
            self.n_edge = 1               # next unfilled edge (edge 0: integral 0)
            self.base_i = np.zeros(S)     # ∫_0^{t_last}
            self.base_v = np.zeros(S)
        self.i0 = None

    def take(self, tvec, vvecs, ivecs) -> None:
        """Harvest the steps recorded since the last call and empty the vectors."""
        n = len(tvec)
        if n == 0:
            return
        # one copy straight into arrays that already hold the previous chunk's last step (column 0)
        lead = 0 if self.last is None else 1
        t = np.empty(n + lead)
        t[lead:] = tvec.as_numpy()
        v = np.empty((len(vvecs), n + lead))
        np.stack([vec.as_numpy() for vec in vvecs], out=v[:, lead:])
        i = None
        if self.record_imem:
            i = np.empty((len(ivecs), n + lead))
            np.stack([vec.as_numpy() for vec in ivecs], out=i[:, lead:])
        for vec in (tvec, *vvecs, *ivecs):
            vec.resize(0)                 # Vector.record keeps appending after a resize
        self.take_arrays(t, v, i, lead_filled=False)

    def take_final(self, t: float, segs) -> None:
        """Add the state at the end of the run, which Vector.record has not stored yet.

        NEURON records a step's state when the *next* step starts, so the last step of the run is
        missing from the vectors. (The reference files lack it too and hold their last samples
        constant after their last recorded step; we interpolate to the true final state instead.)
        """
        if self.last is not None and t <= self.last[0]:
            return
        v = np.array([[seg.v] for seg in segs])
        i = np.array([[seg.i_membrane_] for seg in segs]) if self.record_imem else None
        self.take_arrays(np.array([t]), v, i)

    def take_arrays(self, t: np.ndarray, v: np.ndarray, i: np.ndarray | None, lead_filled: bool | None = None) -> None:
        """Harvest steps ``t`` [n] with ``v`` (and ``i``) [S, n]. After the first call the arrays either
        lack the previous last step (``lead_filled=None``: it is prepended) or have an empty column 0 for
        it (``lead_filled=False``: it is written there)."""
        if self.last is not None:
            if lead_filled is None:
                t = np.concatenate([[self.last[0]], t])
                v = np.concatenate([self.last[1][:, None], v], axis=1)
                if self.record_imem:
                    i = np.concatenate([self.last[2][:, None], i], axis=1)
            else:
                t[0], v[:, 0] = self.last[0], self.last[1]
                if self.record_imem:
                    i[:, 0] = self.last[2]
        elif self.record_imem:
            self.i0 = i[:, 0].copy()
        self.last = (t[-1], v[:, -1].copy(), i[:, -1].copy() if self.record_imem else None)
        if len(t) < 2:
            return
        self.soma_crossings.append(upward_crossings(t, v[0]))
        t_end = t[-1]
        k = int(np.searchsorted(self.grid_1ms, t_end, side="right"))
        if k > self.n1:
            self.v_1ms[:, self.n1:k] = _interp_rows(t, v, self.grid_1ms[self.n1:k])
            self.n1 = k
        k = int(np.searchsorted(self.grid_0p1ms, t_end, side="right"))
        if k > self.n01:
            self.v_soma[self.n01:k] = _interp_rows(t, v[:1], self.grid_0p1ms[self.n01:k])[0]
            self.n01 = k
        if self.bin_means:
            # integrals from the last harvested step to the new bin edges and to the chunk's end, in one
            # pass over the steps (the trace is then one cumulative sum, not two)
            k = max(min(self.T, int(np.floor(t_end)) + 1), self.n_edge)
            tq = np.concatenate([self.grid_1ms[self.n_edge:k], [t_end]])
            iv = _integral_rows(t, v, tq, self.v_mode)
            self.int_v[:, self.n_edge:k] = self.base_v[:, None] + iv[:, :-1]
            self.base_v = self.base_v + iv[:, -1]
            if self.record_imem:
                ii = _integral_rows(t, i, tq, self.i_mode)
                self.int_i[:, self.n_edge:k] = self.base_i[:, None] + ii[:, :-1]
                self.base_i = self.base_i + ii[:, -1]
            self.n_edge = k

    def soma_crossings_ms(self) -> np.ndarray:
        """Upward 0-mV crossings of soma(0.5) found in the harvested steps (ms)."""
        return np.concatenate(self.soma_crossings) if self.soma_crossings else np.zeros(0)

    def finish(self) -> dict:
        if self.n1 < self.T or self.n01 < 10 * self.T:
            raise RuntimeError("the run ended before the last grid sample (internal error)")
        if not self.bin_means:
            return {}
        if self.n_edge < self.T:
            raise RuntimeError("the run ended before the last 1-ms bin edge (internal error)")
        vmean = np.concatenate([self.v_1ms[:, :1].astype(np.float64), np.diff(self.int_v, axis=1)], axis=1)
        out = {"v_mean_1ms": vmean.astype(np.float32)}
        if self.record_imem:
            imem = np.concatenate([self.i0[:, None], np.diff(self.int_i, axis=1)], axis=1)
            out["imem_mean_1ms"] = imem.astype(np.float32)
        return out


class _CoreNeuronSolver:
    """Advances the NEURON model with CoreNEURON (``ParallelContext.psolve``), chunk by chunk.

    Each ``psolve`` call transfers the model to CoreNEURON and the state and recorded vectors back,
    so that NEURON's ``Vector.record`` and ``h.t`` behave as with ``fadvance``.
    """

    def __init__(self, h):
        from neuron import coreneuron

        from lfdeep_neuron import mechanisms

        if not str(mechanisms.load()).endswith("-coreneuron"):
            raise RuntimeError("engine 'coreneuron' needs mechanisms.load(coreneuron=True) before the cell "
                               "is built (this process loaded the NEURON-only build)")
        self._core = coreneuron
        self._pc = h.ParallelContext()
        self._core.enable = True
        self._core.verbose = 0
        self._pc.set_maxstep(10)

    def advance(self, t_stop_ms: float, dt_ms: float) -> int:
        from neuron import h

        t0 = h.t
        # t is a running sum of dt on both sides; asking for half a step more makes CoreNEURON take the
        # step that lands (up to round-off) on t_stop_ms instead of stopping one step short.
        self._pc.psolve(t_stop_ms + 0.5 * dt_ms)
        if h.t <= t0:
            raise RuntimeError(f"CoreNEURON did not advance from t = {t0} ms towards {t_stop_ms} ms")
        return int(round((h.t - t0) / dt_ms))

    def close(self) -> None:
        self._core.enable = False
