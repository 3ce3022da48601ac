"""SurrogateEngine: one batched forward pass per surrogate step for all local SurrogateL5PC cells.

One engine per model per process (MPI rank). It owns

* the streaming state of every local instance as one batch (``model.streamer(n_local)``), on
  CUDA when available, else on the CPU (1 torch thread by default);
* its rows of the process-wide **intake buffer**: one hoc ``Vector`` of ``n_instances x 1278``
  doubles into which the ``SurrogateCell`` artificial cells (``mod/SurrogateCell.mod``) add,
  in C, the weight of every NetCon event they receive (channel in ``weight[1]``, weight in
  ``weight[0]``, in units of the reference synapse). The mechanism also lists, per engine, the
  entries that became non-zero, so a step gathers only those (sparse intake: a few thousand
  values, not n x 1278) from the zero-copy numpy view (``Vector.as_numpy()``), clears them
  and scatters them into the input tensor on the device;
* a self-rescheduling ``cvode.event`` (the *stepper*) started by an ``FInitializeHandler``,
  which runs during ``h.run()``, ``h.continuerun()`` and ``pc.psolve()`` on every rank, with
  fixed-step integration or CVode.

Timing rule
-----------
The engine follows the time convention of training, the data sets and ``lfdeep-neuron rollout``
(DESIGN "Time"): the sample at t0 is the initial state, and step k >= 1 consumes the inputs of
``(k-1, k]`` with the voltages of step k-1 as feedback and yields the voltages at k. Let Δ be the
surrogate step (``model.meta['dt_ms']``, 1 ms by default) and dt NEURON's time step. The stepper
runs at ``t0 + k·Δ + dt/4`` for k = 0, 1, 2, ... (t0 = time of ``finitialize``):

* **k = 0 (initial state, no forward pass).** The sample at t0 is the streamer's initial state,
  ``model.v_rest`` (the same ``v0`` as ``lfdeep-neuron rollout --v0 rest``), with spike logit NaN
  and no spike. The events the buffer holds at this point are cleared and NOT fed to the model
  (like ``rollout``, which never feeds bin 0 = events at t <= 0): with fixed steps those with
  delivery time ``< t0 + dt`` (all events at t <= t0, and also those in ``(t0, t0 + dt)``);
  under CVode those with delivery time ``<= t0 + dt/4``. Recordings with ``inputs=True`` keep
  them in column 0 (the layout of :func:`lfdeep_neuron.data.dataset.bin_events`, whose column 0
  is likewise not used).
* **k >= 1 (one forward pass each).** Step k consumes the events delivered since step k-1,
  nominally those in ``(t0 + (k-1)·Δ, t0 + k·Δ]``. Exactly: with fixed steps NEURON delivers
  events on the dt grid and runs the stepper at the end of the dt step containing its schedule
  time, so step k takes events with delivery time in ``[(k-1)·Δ + dt, k·Δ + dt)``; under CVode,
  those in ``((k-1)·Δ + dt/4, k·Δ + dt/4]``. Either way an event at exactly k·Δ (integer ms) is
  always in step k: the dt/4 offset keeps round-off from splitting integer-time events between
  two steps. It yields the voltages of every segment *at* t0 + k·Δ (point samples, like
  ``v_1ms[:, k]``) and a somatic spike decision for the window.

A run to ``tstop = T·Δ`` thus records T samples (t = 0 .. T-1, like a record's ``v_1ms`` of
``duration_ms = T``) with T-1 forward passes, and reproduces ``lfdeep-neuron rollout`` on the same
(binned) events to float round-off.

Spikes: step k >= 1 emits a predicted spike when ``spike_logit`` crosses ``spike_threshold`` upwards
(``spike_rule='crossing'``, default: a run of steps above the threshold is one spike, as a NetCon
threshold on a voltage; ``'level'``: every step above it) as a ``net_event``
of the instance at the time the stepper runs, ``t_emit = h.t``: ``k·Δ + dt`` with fixed steps,
``k·Δ + dt/4`` under CVode (a time in the past is not allowed: MPI runs would abort). Spike times
are thus quantised to the step and lag the true spike, somewhere in ``((k-1)·Δ, k·Δ]``, by dt to
Δ + dt. (``rollout`` and the metrics place the same step's spike at ``k·Δ - 0.5`` ms; both give back
k with ``ceil(t - dt)`` resp. ``ceil(t)``.) Use NetCon delays >= Δ from surrogates: whatever the
delay, the spike reaches a surrogate target in step k+1 at the earliest, like the spike of a
detailed cell fired in step k's window would with a delay >= Δ; and under MPI every inter-rank
delay must be >= the ParallelContext's minimum delay anyway. The decision is the streamer's
(:mod:`lfdeep_neuron.surrogate.stream`) with the engine's threshold and rule: ``rollout`` and ``evaluate``
stream the same way, and a model with spike history reads back exactly the spikes the engine emitted.

Action potentials: a model trained on a clipped soma target has no AP in its voltages (the spike lives in
the spike logit). With a spike waveform (:class:`~lfdeep_neuron.surrogate.waveform.SpikeWaveform`, stored in
the checkpoint by ``lfdeep-neuron waveform``; ``spike_waveform=`` chooses), after the spike decision of step k
the waveform of every instance that emitted a spike at a step k' >= k - K + 1 (the latest one: a new spike
restarts it) is added to the voltages (and predicted currents) handed to the sinks, column k - k': one
indexed add for all instances inside a waveform. The model's own state and fed-back voltages are not changed.

Per step (no Python per event, none per cell except per emitted spike): gather and clear the
engine's inputs, ONE ``streamer.step`` for all local instances, emit spikes, add the spike waveform,
hand the step to the attached sinks (:mod:`lfdeep_neuron.cosim.sinks`: recordings, LFP, NetPyNE traces;
one ``index_select`` per sink that asked for a subset of the instances). ``engine.timers`` accumulates
the time of each phase (``intake``, ``forward``, ``emit``, ``waveform``, ``record`` = handing over to the
sinks; seconds of ``engine.clock``, wall time by default) of the steps k >= 1 since the last init;
``engine.n_steps`` counts those steps and ``engine.n_forward`` the forward passes (equal: one per step).

Object lifetimes
----------------
NEURON 9 aborts when a point process or NetCon is destroyed while it holds the model's data
frozen (inside ``finitialize`` or a time step), which is exactly when our callbacks run. Python's
cyclic garbage collector frees objects in reference cycles at arbitrary allocation points, so
(1) no reference cycle of this package contains a hoc object: the engine keeps the hoc objects
of its instances (artificial cell, "fire" NetCon) and weak references to the Python cells and
recordings; NEURON calls the engine through weak callables; and (2) the collector is paused
while our callbacks run. Instances live as long as the engine (like NEURON objects, they do not
vanish when the Python handle is dropped); :meth:`SurrogateEngine.close` releases them.
"""
from __future__ import annotations

import itertools
import time
import weakref
from pathlib import Path

import numpy as np

from lfdeep_neuron.cosim.recording import Recording
from lfdeep_neuron.cosim.sinks import EngineSink, SinkStep
from lfdeep_neuron.neuron_callbacks import WeakMethodCall
from lfdeep_neuron.surrogate.metrics import default_spike_threshold

__all__ = ["SurrogateEngine", "N_CHANNELS", "bad_event_count", "default_spike_threshold"]

#: Synaptic input channels per instance (DESIGN: 639 excitatory + 639 inhibitory).
N_CHANNELS = 1278
#: Engines (models) that can run together in one process (touched-list slots of the mechanism).
MAX_ENGINES = 8


def _h():
    """NEURON's ``h`` with stdrun and our mechanisms loaded."""
    from neuron import h

    from lfdeep_neuron import mechanisms

    mechanisms.load()
    h.load_file("stdrun.hoc")
    return h


# ---------------------------------------------------------------------------------------------
# The process-wide intake buffer (the mechanism holds ONE pointer per process)
# ---------------------------------------------------------------------------------------------

class _Intake:
    """The one hoc Vector per process that every SurrogateCell writes into.

    Rows are laid out engine after engine (each engine's rows contiguous, in its instances'
    registration order) and re-laid out at ``finitialize`` whenever the set of instances
    changed. A new Vector is always handed to the mechanism (``set_buffer``) before the old one
    is released, so the mechanism never holds a dangling pointer; a Vector is never resized.
    Instances of closed engines get ``base = -1`` (their events are refused, not written).
    ``handle`` is a private SurrogateCell used only to call the mechanism's procedures.
    """

    def __init__(self):
        self.engines: list[weakref.ReferenceType] = []
        self.vector = None
        self.array: np.ndarray | None = None   # [n_rows, N_CHANNELS] view of self.vector
        self.layout: tuple = ()
        self.touched: list = []                 # per engine slot: Vector of touched flat indices
        self.handle = None
        self._fih = None

    def install(self, h):
        """Prepare the buffer at every finitialize, before the engines' steppers start."""
        if self._fih is None:
            self.handle = h.SurrogateCell()
            self._fih = h.FInitializeHandler(0, WeakMethodCall(self, "prepare"))

    def add_engine(self, engine):
        self.engines.append(weakref.ref(engine))

    def live_engines(self):
        self.engines = [r for r in self.engines if r() is not None and not r().closed]
        return [r() for r in self.engines]

    def prepare(self):
        """Lay out the rows (if needed) and clear the buffer; once per ``finitialize``."""
        from neuron import h

        engines = self.live_engines()
        if len(engines) > MAX_ENGINES:
            raise RuntimeError(f"{len(engines)} SurrogateEngines are open in this process; at most "
                               f"{MAX_ENGINES} (one per model) can run together: close the others")
        from lfdeep_neuron.parallel import parallel_context

        # Touched lists are appended to without locks: with NEURON threads, read whole rows.
        threaded = int(parallel_context().nthread()) > 1
        for e in engines:
            e._sparse_now = e.intake == "sparse" and not threaded
        layout = tuple((e._serial, len(e._arts), e._sparse_now) for e in engines)
        if layout != self.layout or self.vector is None:
            n_rows = sum(len(e._arts) for e in engines)
            vector = h.Vector(max(n_rows, 1) * N_CHANNELS)
            touched = []
            row = 0
            for slot, e in enumerate(engines):
                e._row_start, e._slot = row, slot
                for i, art in enumerate(e._arts):
                    art.base = (row + i) * N_CHANNELS
                    art.slot = slot
                row += len(e._arts)
                if e._sparse_now:
                    # distinct entries of the engine's rows, plus slack for entries summing back to 0
                    t = h.Vector(max(len(e._arts), 1) * N_CHANNELS + 4096)
                    self.handle.set_touched(slot, t)
                    e._touched = t.as_numpy()
                    touched.append(t)
                else:
                    self.handle.set_touched(slot)      # no list: the engine reads whole rows
                    e._touched = None
            for slot in range(len(engines), MAX_ENGINES):
                self.handle.set_touched(slot)
            self.handle.set_buffer(vector)
            self.vector, self.touched = vector, touched    # the old Vectors are released only now
            self.array = vector.as_numpy().reshape(-1, N_CHANNELS)
            self.layout = layout
        self.array.fill(0.0)
        for slot in range(len(engines)):
            self.handle.reset_touched(slot)
        self.handle.reset_bad_events()

    def bad_events(self) -> tuple[int, float, float]:
        """(count, row offset, channel) of events that could not be stored since the last init."""
        if self.handle is None:
            return 0, -1.0, -1.0
        return (int(self.handle.bad_events()), self.handle.last_bad_event(0),
                self.handle.last_bad_event(1))


_INTAKE = _Intake()
_SERIALS = itertools.count()


def bad_event_count() -> int:
    """Events a SurrogateCell could not store (bad channel / no buffer) since the last init."""
    return _INTAKE.bad_events()[0]


# ---------------------------------------------------------------------------------------------
# Model access
# ---------------------------------------------------------------------------------------------

def _meta(model) -> dict:
    meta = getattr(model, "meta", None)
    return dict(meta) if meta else {}


def _as_table(table) -> dict | None:
    """A table as a dict of numpy arrays with ``str`` names (accepts bytes from HDF5)."""
    if table is None:
        return None
    out = {}
    for key, val in dict(table).items():
        arr = np.asarray(val)
        if arr.dtype.kind == "S":
            arr = arr.astype(str)
        out[key] = arr
    return out


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SurrogateEngine:
    """Batched co-simulation of all SurrogateL5PC instances of one model in this process.

    Parameters
    ----------
    model : torch.nn.Module or str or Path
        A streaming surrogate (``model.streamer(n, device=..., feedback=..., output='mV',
        spike_threshold=..., spike_rule=...)`` returning an object with ``step(x [n, 1278]) -> (v_mV [n, S],
        spike_logit [n])`` whose result also has ``.spiked [n]``, the step's spike decisions: the
        :class:`~lfdeep_neuron.surrogate.stream.Streamer` protocol) or a checkpoint path for
        :func:`lfdeep_neuron.surrogate.checkpoint.load_surrogate`.
    device : str or torch.device, optional
        Where the model and the batched state live; default ``cuda`` if available, else CPU.
    spike_threshold : float, optional
        A somatic spike is emitted when the spike logit crosses this (0 = probability 1/2).
        Default (None): the checkpoint's calibrated threshold
        ``model.meta['metrics']['spike_threshold_logit']`` when present (written by
        ``lfdeep-neuron evaluate --update-checkpoint``; the default of ``lfdeep-neuron rollout``
        too), else 0.
    feedback : bool
        Closed loop: the streamer feeds its own previous voltages back (the trained regime).
    torch_threads : int, optional
        Intra-op threads for torch on CPU (process-wide ``torch.set_num_threads``). Default 1:
        one step's kernels are small, and torch threads competing with NEURON or with other
        ranks for the cores made a 200 ms, 20-cell run 16x slower on a busy 2-core machine
        (24 s instead of 1.5 s). Pass a larger number on an idle many-core machine with large N.
    segments, synapses : dict of arrays, optional
        Segment and channel tables (keys of a record's ``segments/`` and ``synapses/``) used
        for synapse addressing and recordings; default ``model.meta['segments'/'synapses']``.
    step_ms : float, optional
        Surrogate step Δ; default ``model.meta['dt_ms']`` or 1 ms.
    dtype : torch.dtype, optional
        Computation dtype of the streamer (default: the model's, float32). ``torch.float64``
        makes results independent of how cells are split over ranks to ~1e-15 instead of
        ~1e-7 (batched float32 kernels round differently for different batch sizes).
    intake : {'sparse', 'dense'}
        How a step reads its inputs. ``'sparse'`` (default): only the entries that received
        events (the mechanism's touched list): a few thousand values per step are gathered,
        cleared and scattered into a zero tensor on the device (host-to-device traffic
        proportional to the events, not to N x 1278). ``'dense'``: copy and clear the engine's
        whole rows (used automatically for a step whose touched list overflowed, and for whole
        runs with NEURON threads, ``pc.nthread() > 1``, as the lists are not thread-safe).
    max_abs_mV : float
        Predicted voltages that are not finite or exceed this in magnitude stop the run with an error.
    spike_rule : {'crossing', 'level'}
        ``'crossing'`` (default): a spike when the logit crosses the threshold upwards (a run of steps
        above it is one spike); ``'level'``: a spike in every step above it. ``rollout`` and ``evaluate``
        use the same rules (:func:`lfdeep_neuron.surrogate.metrics.spikes_from_logits`).
    spike_waveform : SpikeWaveform or bool
        The action-potential waveform added to the voltages (and currents) handed to sinks at emitted
        spikes (:mod:`lfdeep_neuron.surrogate.waveform`). True (default): the checkpoint's
        (``model.meta['spike_waveform']``), none if it has none; False or None: none. The attribute
        :attr:`spike_waveform` may be changed between runs (it is read at ``finitialize``).

    Use :meth:`get` to obtain the engine of a model (one per process).
    """

    _registry: dict = {}

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def get(cls, model=None, device=None, **options) -> "SurrogateEngine":
        """The engine of ``model`` in this process, created on first use.

        ``model=None`` returns the only engine of the process if there is exactly one;
        otherwise a model (or checkpoint path) must be given.
        """
        if model is None:
            live = [e for e in cls._registry.values() if not e.closed]
            if len(live) == 1:
                return live[0]
            if not live:
                raise ValueError(
                    "SurrogateEngine.get(): no model given and no engine exists in this process; "
                    "pass model= (a surrogate from lfdeep_neuron.surrogate or a checkpoint path)")
            raise ValueError(f"SurrogateEngine.get(): {len(live)} engines exist; pass model= to choose")
        if isinstance(model, (str, Path)):
            key = ("path", str(Path(model).resolve()))
        else:
            key = ("object", id(model))
        eng = cls._registry.get(key)
        if eng is None or eng.closed:
            eng = cls(model, device=device, **options)
            cls._registry[key] = eng
        elif device is not None and str(eng.device) != str(device):
            raise ValueError(f"the engine of this model already lives on {eng.device}, not {device}")
        return eng

    @classmethod
    def close_all(cls):
        """Close every engine of the process, however made (tests, or before a new network)."""
        for eng in _INTAKE.live_engines():
            eng.close()
        for eng in list(cls._registry.values()):
            eng.close()
        cls._registry.clear()

    def __init__(self, model, device=None, spike_threshold: float | None = None, feedback: bool = True,
                 torch_threads: int | None = None, segments=None, synapses=None,
                 step_ms: float | None = None, dtype=None, intake: str = "sparse", max_abs_mV: float = 500.0,
                 spike_rule: str = "crossing", spike_waveform=True):
        import torch

        if isinstance(model, (str, Path)):
            from lfdeep_neuron.surrogate.checkpoint import load_surrogate

            model = load_surrogate(model)
        if not hasattr(model, "streamer"):
            raise TypeError(f"model must provide .streamer(n_cells, ...); got {type(model).__name__}")
        self.h = _h()
        from lfdeep_neuron.parallel import parallel_context

        self.pc = parallel_context()
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cpu":
            torch.set_num_threads(int(torch_threads) if torch_threads else 1)
        if hasattr(model, "to"):
            model = model.to(self.device)
        if hasattr(model, "eval"):
            model.eval()
        self.model = model
        meta = _meta(model)
        self.segments = _as_table(segments if segments is not None else meta.get("segments"))
        self.synapses = _as_table(synapses if synapses is not None else meta.get("synapses"))
        self.step_ms = float(step_ms if step_ms is not None else meta.get("dt_ms", 1.0) or 1.0)
        if not self.step_ms > 0:
            raise ValueError(f"surrogate step must be > 0 ms, got {self.step_ms}")
        self.spike_threshold = float(default_spike_threshold(model) if spike_threshold is None
                                     else spike_threshold)
        if getattr(model, "v_rest", None) is None:
            raise TypeError(f"model must provide .v_rest (mV, [n_segments]), the initial state recorded "
                            f"at t0; {type(model).__name__} has none")
        self.feedback = bool(feedback)
        self.max_abs_mV = float(max_abs_mV)   # predictions beyond it (or not finite) stop the run
        if spike_rule not in ("crossing", "level"):
            raise ValueError(f"spike_rule must be 'crossing' or 'level', got {spike_rule!r}")
        self.spike_rule = spike_rule
        self.spike_waveform = spike_waveform  # property: resolves True to the checkpoint's waveform
        self._wave = None                     # the waveform on the device, in the engine's dtype (at init)
        self._wave_state = None               # its per-instance state (steps since the last spike)
        self.dtype = dtype
        if intake not in ("sparse", "dense"):
            raise ValueError(f"intake must be 'sparse' or 'dense', got {intake!r}")
        self.intake = intake
        self.closed = False
        self._serial = next(_SERIALS)

        # per local instance, in registration (= row) order; no strong refs to Python cells
        self._arts: list = []            # SurrogateCell (hoc)
        self._fires: list = []           # NetCon(None, art) with weight[1] = -1: emits a spike
        self._gids: list = []            # gid or None
        self._cell_refs: list = []       # weakref to the SurrogateL5PC
        self._row_start = 0
        self._slot = 0
        self._sparse_now = False         # sparse intake in this run (not with NEURON threads)
        self._touched = None             # numpy view of this engine's touched list
        self._x = None                   # the step's input tensor [n * 1278], reused
        self._x_set = None               # its entries set at the last step (None: maybe all)
        self._channel_map = None
        self._stream = None
        self._n_init = 0                 # instances the current streamer was made for
        self._k = 0                      # index of the next step (0: the initial state)
        self._v0 = None                  # [n, S] initial voltages (mV) recorded at t0
        self._imem0 = None               # [n, S] zeros (nA) when the model predicts membrane currents
        self._nan_logit = None           # [n] NaN: the spike logit "at" t0
        self._t0 = 0.0
        self._offset = 0.0
        self._sinks: list[weakref.ReferenceType] = []   # weak: whoever made a sink owns it
        self._fed: list[tuple] = []      # (weakref to sink, rows | None, rows tensor | None) reset at the last init
        self._spike_rows: list[np.ndarray] = []
        self._spike_times: list[float] = []
        self.n_forward = 0
        self.n_dense_reads = 0           # reads of whole rows (dense intake or overflow; t0 clear included)
        self.timers = dict(intake=0.0, forward=0.0, emit=0.0, waveform=0.0, record=0.0)
        self.clock = time.perf_counter   # clock of the timers (e.g. time.process_time for CPU time)
        self.n_steps = 0
        self._step_callback = WeakMethodCall(self, "_step")
        _INTAKE.install(self.h)
        _INTAKE.add_engine(self)
        self._fih = self.h.FInitializeHandler(1, WeakMethodCall(self, "_finitialize"))

    def close(self):
        """Detach from NEURON: no more steps; the instances' events are refused from now on.

        The engine drops its references to the instances' hoc objects (they are freed with the
        last Python handle). Call it outside of a run, not from a NEURON callback.
        """
        if self.closed:
            return
        self.closed = True
        self._fih = None
        for art in self._arts:
            art.base = -1
        self._arts, self._fires, self._gids, self._cell_refs = [], [], [], []
        self._stream = None

    @property
    def spike_waveform(self):
        """The :class:`~lfdeep_neuron.surrogate.waveform.SpikeWaveform` added at emitted spikes, or None."""
        return self._spike_waveform

    @spike_waveform.setter
    def spike_waveform(self, value):
        from lfdeep_neuron.surrogate.waveform import SpikeWaveform, model_waveform

        if value is True:
            value = model_waveform(self.model)
        elif value is False:
            value = None
        if value is not None:
            if not isinstance(value, SpikeWaveform):
                raise TypeError(f"spike_waveform must be a SpikeWaveform, True or False/None, got "
                                f"{type(value).__name__}")
            n_seg = getattr(self.model, "n_segments", value.n_segments)
            if value.n_segments != n_seg:
                raise ValueError(f"the spike waveform has {value.n_segments} segments; the model predicts {n_seg}")
        self._spike_waveform = value

    @property
    def predicts_currents(self) -> bool:
        """Whether the model has membrane-current tasks (bin-mean ``i_membrane_`` of every segment, nA).

        Such a model's LFP is ``M i`` from its predicted currents rather than ``M (-L v)`` from its
        voltages (see :func:`lfdeep_neuron.cosim.netpyne.record_surrogate_lfp`).
        """
        return bool(getattr(getattr(self.model, "config", None), "imem_tasks", False))

    # ---- instances --------------------------------------------------------------------------

    @property
    def n_local(self) -> int:
        """Number of instances on this process."""
        return len(self._arts)

    @property
    def cells(self) -> list:
        """The local SurrogateL5PC instances whose Python handle is alive, in row order."""
        return [c for c in (r() for r in self._cell_refs) if c is not None]

    @property
    def gids(self) -> np.ndarray:
        """gid of each local instance in row order (``-1 - index`` for instances without gid)."""
        return np.array([g if g is not None else -1 - i for i, g in enumerate(self._gids)], np.int64)

    @property
    def channel_map(self):
        """The (section, x, kind) -> channel addressing of the model's cell."""
        if self._channel_map is None:
            if self.segments is None or self.synapses is None:
                raise ValueError(
                    "the model carries no segment/synapse tables (model.meta['segments'], "
                    "model.meta['synapses']): pass segments= and synapses= to SurrogateEngine "
                    "to address synapses by (section, x, kind)")
            from lfdeep_neuron.hay.channels import ChannelMap

            self._channel_map = ChannelMap(self.segments, self.synapses)
        return self._channel_map

    def add_instance(self, cell, art, fire) -> int:
        """Add an instance; returns its local index (its row in the batch).

        Parameters
        ----------
        cell : SurrogateL5PC
            The Python cell (kept as a weak reference).
        art : hoc SurrogateCell
            Its artificial cell (event intake and spike source).
        fire : hoc NetCon
            ``NetCon(None, art)`` with ``weight[1] = -1``: ``fire.event(t)`` emits the cell's spike.
        """
        if self.closed:
            raise RuntimeError("this SurrogateEngine was closed; get a new one with SurrogateEngine.get(model)")
        self._arts.append(art)
        self._fires.append(fire)
        self._gids.append(None)
        self._cell_refs.append(weakref.ref(cell))
        return len(self._arts) - 1

    def set_gid(self, index: int, gid: int | None) -> None:
        """Record the gid of local instance ``index`` (as reported by :attr:`gids` and :meth:`spikes`).

        This only labels the row; registering the gid with the ParallelContext is the cell's job
        (:meth:`SurrogateL5PC.register_gid`).
        """
        index = int(index)
        if not 0 <= index < len(self._gids):
            raise IndexError(f"no local instance {index} (this engine has {len(self._gids)})")
        self._gids[index] = None if gid is None else int(gid)

    # ---- recording ----------------------------------------------------------------------------

    def record(self, cells=None, segments="all", inputs: bool = False, logits: bool = False,
               currents: bool = False) -> Recording:
        """Record voltages (mV, point samples at each step) from the next ``finitialize`` on.

        Parameters
        ----------
        cells : list of SurrogateL5PC, optional
            Local instances to record (default: all local instances at init time).
        segments : None, 'all', 'soma', list of int or list of str
            Segments (indices in the canonical order or names like ``'apic[36](0.5)'`` /
            ``'soma[0]'``); default all; ``[]`` records no voltage.
        inputs : bool
            Also keep the channel sums each step consumed (float64 [n_cells, 1278, T]; column 0:
            the events cleared at t0, not fed).
        logits : bool
            Also keep the somatic spike logits (float32 [n_cells, T]; NaN at t0).
        currents : bool
            Also keep the predicted bin-mean membrane currents (nA, same layout as the voltages;
            only for models with current tasks, see :attr:`predicts_currents`).

        Sample 0 is the initial state at t0 (``model.v_rest``), sample k >= 1 step k's prediction.
        """
        rec = Recording(self, cells=cells, segments=segments, inputs=inputs, logits=logits, currents=currents)
        return self.add_sink(rec)

    # ---- sinks --------------------------------------------------------------------------------

    def add_sink(self, sink: EngineSink) -> EngineSink:
        """Attach a sink (:class:`~lfdeep_neuron.cosim.sinks.EngineSink`); it gets data from the next
        ``finitialize`` on. The engine keeps a weak reference: keep the sink alive yourself.
        Adding a sink twice has no effect. Returns the sink."""
        if not isinstance(sink, EngineSink):
            raise TypeError(f"a sink must implement lfdeep_neuron.cosim.sinks.EngineSink, got {type(sink).__name__}")
        if all(r() is not sink for r in self._sinks):
            self._sinks.append(weakref.ref(sink))
        return sink

    def remove_sink(self, sink: EngineSink) -> None:
        """Detach a sink (no effect if it is not attached)."""
        self._sinks = [r for r in self._sinks if r() is not None and r() is not sink]
        self._fed = [f for f in self._fed if f[0]() is not None and f[0]() is not sink]

    @property
    def sinks(self) -> list[EngineSink]:
        """The attached sinks that are still alive, in the order they were added."""
        live = [r() for r in self._sinks]
        self._sinks = [r for r, s in zip(self._sinks, live) if s is not None]
        return [s for s in live if s is not None]

    def _reset_sinks(self):
        """finitialize: reset every sink and keep the rows it asked for."""
        import torch

        self._fed = []
        n = self.n_local
        for sink in self.sinks:
            rows = sink.reset(self)
            if rows is None:
                self._fed.append((weakref.ref(sink), None, None))
                continue
            rows = np.asarray(rows, np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"{type(sink).__name__}.reset asked for rows outside [0, {n}): "
                                 f"{rows[(rows < 0) | (rows >= n)][:5].tolist()}")
            self._fed.append((weakref.ref(sink), rows, torch.as_tensor(rows, device=self.device)))

    def _active_sinks(self) -> list:
        """(sink, rows, rows tensor) of the sinks reset at the last init that are still alive."""
        out = [(ref(), rows, rows_t) for ref, rows, rows_t in self._fed]
        return [entry for entry in out if entry[0] is not None]

    def _hand_over(self, sinks, k: int, v, logit, imem, fired: np.ndarray):
        """Give step k to every sink (its rows only)."""
        if not sinks:
            return
        spiked = np.zeros(self._n_init, bool)
        spiked[fired] = True
        t_ms = self.step_time(k)
        for sink, rows, rows_t in sinks:
            if rows is None:
                step = SinkStep(k, t_ms, v, logit, imem, spiked)
            else:
                step = SinkStep(k, t_ms, v.index_select(0, rows_t), logit.index_select(0, rows_t),
                                None if imem is None else imem.index_select(0, rows_t), spiked[rows])
            sink.append(step)

    def spikes(self) -> tuple[np.ndarray, np.ndarray]:
        """Emitted spikes since the last init as ``(gid, t_ms)`` arrays (time order).

        ``gid`` is the instance's gid, or ``-1 - local_index`` for an instance without gid.
        """
        if not self._spike_rows:
            return np.zeros(0, np.int64), np.zeros(0)
        rows = np.concatenate(self._spike_rows)
        t = np.concatenate([np.full(len(r), tt) for r, tt in zip(self._spike_rows, self._spike_times)])
        return self.gids[rows], t

    # ---- stepping -----------------------------------------------------------------------------

    def _finitialize(self):
        """FInitializeHandler(1): reset state, lay out the intake buffer, start the stepper."""
        if self.closed:
            return
        import torch

        h = self.h
        self._k = 0
        self._t0 = float(h.t)
        cvode_on = bool(h.cvode.active())
        if not cvode_on and h.dt > self.step_ms + 1e-12:
            raise ValueError(f"NEURON dt = {h.dt} ms is larger than the surrogate step "
                             f"{self.step_ms} ms: use dt <= {self.step_ms} ms")
        self._offset = float(h.dt) / 4.0
        self._spike_rows, self._spike_times = [], []
        self.n_forward = 0
        self.n_steps = 0
        self.n_dense_reads = 0
        for key in self.timers:
            self.timers[key] = 0.0
        n = len(self._arts)
        self._n_init = n
        self._reset_sinks()
        if n == 0:
            self._stream = None
            return
        self._x = torch.zeros(n * N_CHANNELS, dtype=self.dtype or torch.float32, device=self.device)
        self._x_set = torch.zeros(0, dtype=torch.long, device=self.device)   # entries set last step
        kw = {} if self.dtype is None else {"dtype": self.dtype}
        with torch.inference_mode():
            self._stream = self.model.streamer(n, device=self.device, feedback=self.feedback, output="mV",
                                               spike_threshold=self.spike_threshold, spike_rule=self.spike_rule,
                                               **kw)
            v_rest = torch.as_tensor(self.model.v_rest, device=self.device)
            self._v0 = v_rest.to(self._x.dtype).expand(n, -1)       # the streamer's v0 (model.v_rest)
            # membrane-current tasks (nA): at rest every segment's membrane current is zero
            self._imem0 = torch.zeros_like(self._v0) if self.predicts_currents else None
            self._nan_logit = torch.full((n,), float("nan"), dtype=self._x.dtype, device=self.device)
            wf = self._spike_waveform
            self._wave = None if wf is None else wf.to(device=self.device, dtype=self._x.dtype)
            self._wave_state = None if wf is None else self._wave.initial_state(n, device=self.device)
        h.cvode.event(self._t0 + self._offset, self._step_callback)

    def _inputs(self, sinks):
        """This engine's inputs of the step as a [n, 1278] tensor on the device; clears them.

        The tensor is a buffer reused from step to step (no allocation, no page faults): only
        the entries set at the previous step are zeroed again. ``streamer.step`` must therefore
        neither keep nor modify its input (lfdeep_neuron's Streamer does not).
        """
        import torch

        n, C = self._n_init, N_CHANNELS
        r0 = self._row_start
        rows = _INTAKE.array[r0:r0 + n]
        for sink, sel, _ in sinks:
            if sink.wants_inputs:
                sink.append_inputs(rows.copy() if sel is None else rows[sel])
        handle = _INTAKE.handle
        x = self._x
        if self._sparse_now and not handle.touched_overflow(self._slot):
            k = int(handle.n_touched(self._slot))
            flat = _INTAKE.array.reshape(-1)
            where = self._touched[:k].astype(np.int64)          # flat indices into the buffer
            values = flat[where]
            flat[where] = 0.0
            handle.reset_touched(self._slot)
            if self._x_set is None:                              # after a dense step: all of it
                x.zero_()
            elif self._x_set.numel():
                x[self._x_set] = 0.0
            index = torch.from_numpy(where - r0 * C).to(self.device)
            if k:
                x[index] = torch.from_numpy(values).to(device=self.device, dtype=x.dtype)
            self._x_set = index
            return x.view(n, C)
        self.n_dense_reads += 1
        x.view(n, C).copy_(torch.from_numpy(rows))
        rows.fill(0.0)
        handle.reset_touched(self._slot)
        self._x_set = None
        return x.view(n, C)

    def _step(self):
        """One surrogate step for all local instances (called by NEURON's event queue)."""
        import torch

        if self.closed or self._stream is None:
            return
        h = self.h
        if len(self._arts) != self._n_init:
            raise RuntimeError(
                f"{len(self._arts) - self._n_init} SurrogateL5PC instance(s) were created after "
                "finitialize(); call h.finitialize() (or h.run()) again before continuing")
        t_now = float(h.t)
        clock = self.clock
        c0 = clock()
        bad, base, channel = _INTAKE.bad_events()
        if bad:
            who = (f"instance with row offset {base:g}" if base >= 0 else
                   "a SurrogateCell that belongs to no open engine")
            raise RuntimeError(
                f"{bad:d} event(s) before t = {t_now:g} ms could not be stored (last: channel {channel:g} "
                f"of {who}): NetCon weight[1] must be an integer channel in [0, {N_CHANNELS}) and the "
                "target an instance of an open SurrogateEngine; create NetCons with "
                "SurrogateL5PC.connect() / SurrogateSynapse.connect() / cosim.connect()")
        sinks = self._active_sinks()
        x = self._inputs(sinks)
        if self._k == 0:
            # t0: the initial state; the inputs of bin 0 (events at t <= t0) were cleared, not fed
            self._hand_over(sinks, 0, self._v0, self._nan_logit, self._imem0, np.zeros(0, np.int64))
            self._k = 1
            h.cvode.event(self._t0 + self.step_ms + self._offset, self._step_callback)
            return
        c1 = clock()
        with torch.inference_mode():
            pred = self._stream.step(x)
        v, logit, imem = pred[0], pred[1], getattr(pred, "imem", None)
        self.n_forward += 1
        if not float(v.abs().amax()) <= self.max_abs_mV:           # NaN fails this test too
            self._diverged(v, self.step_time(self._k))
        c2 = clock()
        spiked = pred.spiked                                       # the streamer's decision (its threshold)
        fired = torch.nonzero(spiked).flatten()
        fired = fired.cpu().numpy() if fired.numel() else np.zeros(0, np.int64)
        fires = self._fires
        for i in fired:
            fires[i].event(t_now)
        if len(fired):
            self._spike_rows.append(fired)
            self._spike_times.append(t_now)
        c3 = clock()
        if self._wave is not None:        # APs in what the sinks get; the streamer's state is untouched
            # in place: the streamer hands out fresh tensors (its fed-back copy is separate)
            with torch.inference_mode():
                v, imem, self._wave_state = self._wave.step(self._wave_state, v, spiked, imem, inplace=True)
        c4 = clock()
        self._hand_over(sinks, self._k, v, logit, imem, fired)
        c5 = clock()
        self.timers["intake"] += c1 - c0
        self.timers["forward"] += c2 - c1
        self.timers["emit"] += c3 - c2
        self.timers["waveform"] += c4 - c3
        self.timers["record"] += c5 - c4
        self.n_steps += 1
        self._k += 1
        h.cvode.event(self._t0 + self._k * self.step_ms + self._offset, self._step_callback)

    def _diverged(self, v, t_now: float):
        import torch

        bad = torch.nonzero(~(v.abs() <= self.max_abs_mV).all(dim=1)).flatten().cpu().numpy()
        gids = [g if g >= 0 else f"local #{-1 - g}" for g in self.gids[bad][:5].tolist()]
        raise RuntimeError(
            f"surrogate predictions diverged at t = {t_now:g} ms: {len(bad)} instance(s) (e.g. gid {gids}) "
            f"predict non-finite voltages or |v| > {self.max_abs_mV:g} mV. The model is unstable on these "
            "inputs: check the NetCon weights (units of the reference synapse) and that the checkpoint "
            "matches the cell; raise max_abs_mV only if such voltages are intended")

    # ---- convenience --------------------------------------------------------------------------

    def step_time(self, k: int) -> float:
        """Time (ms) of sample k: t0 + k·Δ (k = 0: the initial state; k >= 1: step k's output)."""
        return self._t0 + k * self.step_ms

    def __repr__(self):
        return (f"SurrogateEngine({type(self.model).__name__}, device={self.device}, "
                f"n_local={self.n_local}, step_ms={self.step_ms})")
