"""NetPyNE glue: deep-surrogate (and detailed) Hay L5PCs as ordinary NetPyNE cell types.

A NetPyNE spec keeps its usual idioms; one line picks the cell implementation::

    from lfdeep_neuron.cosim.netpyne import (surrogate_cell_params, hay_cell_params,
                                             add_syn_mechs, record_surrogate_lfp, surrogate_lfp)
    netParams.cellParams['L5PC'] = surrogate_cell_params('models/best.pt')    # deep surrogate
    # netParams.cellParams['L5PC'] = hay_cell_params('cell1.asc')           # detailed HayL5PC
    add_syn_mechs(netParams)                          # 'exc' (AMPA+NMDA) and 'inh' (GABA_A)
    netParams.popParams['L5'] = {'cellType': 'L5PC', 'numCells': 20, 'yRange': [900, 1000]}
    netParams.popParams['bg'] = {'cellModel': 'VecStim', 'numCells': 50, 'spkTimes': [5, 12, 30]}
    netParams.connParams['bg->L5'] = {'preConds': {'pop': 'bg'}, 'postConds': {'pop': 'L5'},
                                      'sec': 'apical', 'loc': 0.5, 'synMech': 'exc',
                                      'weight': 1.0, 'delay': 1.0}
    simConfig.recordTraces = {'V_soma': {'sec': 'soma', 'loc': 0.5, 'var': 'v'}}
    record_surrogate_lfp(simConfig)                   # laminar probe through the column
    sim.createSimulateAnalyze(netParams, simConfig)
    lfp = surrogate_lfp()                             # rank 0: {'t_ms' [T], 'lfp_mV' [T, E], 'electrodes_um'}

How it works
------------
NetPyNE builds ``h.<cellModel>()`` point cells but ignores ``sec``/``loc`` for them, so a
surrogate is instead a :class:`SurrogateCompartCell`: a ``CompartCell`` whose ``secs``/``secLists``
are the Hay cell's (names ``soma``, ``dend[i]``, ``apic[i]``, ``axon[i]``; lists ``somatic``,
``basal``, ``apical``, ``dendritic``, ``axonal``, ``all``: the lists of Hay's template plus
``dendritic``) but which creates no NEURON section: only one
:class:`~lfdeep_neuron.cosim.cell.SurrogateL5PC` (one ``SurrogateCell`` artificial cell) in the
process's :class:`~lfdeep_neuron.cosim.engine.SurrogateEngine`. Every (sec, loc, synMech) NetPyNE
resolves for a connection becomes that cell's input channel in the NetCon's ``weight[1]``
(excitatory or inhibitory from the synMech); ``weight`` is in units of the reference synapse
(1 = one training-data activation) and delays from surrogates should be >= 1 ms (the engine's
timing rule). :class:`HayCompartCell` is the same spec backed by a real
:class:`~lfdeep_neuron.hay.HayL5PC`, whose own synapse of the segment serves each (sec, loc,
synMech), so the two are addressed and weighted identically and can be swapped by one line.

NetPyNE picks a cell class by ``cellModel`` with no hook for new ones, so :func:`install` wraps
``netpyne.network.pop.Pop._resolveCellClass`` to return these classes for ``'SurrogateL5PC'`` and
``'HayL5PC'`` (idempotent; other cell models are untouched). Importing this module patches
nothing: :func:`surrogate_cell_params` and :func:`hay_cell_params` call :func:`install` (and load
our mechanisms, ``VecStim`` included); a script that loads a saved netParams instead calls
``install()`` itself before ``sim.create`` (``installed()`` tells whether it was applied).

Input checks (``lfdeep_neuron.errors.InputError``, one line naming the culprit):

* Sections: a connection's ``sec`` may be a section (``'apic[36]'``, ``'soma'``, or NetPyNE's name of
  an imported Hay template's section, ``'apic_36'``), a section list (``'apical'``, ``'basal'``,
  ``'dendritic'``, ``'somatic'``, ``'axonal'``, ``'all'``) or a list of sections. A list resolves to
  its sections that carry synapses (basal and apical; soma and axon have none); a list or section
  without any, and unknown names, raise naming them (NetPyNE itself would silently move such a
  connection to the soma).
* synMechs that are neither excitatory nor inhibitory raise. A synMech's own parameters are not
  honoured (the cells use their AmpaNmdaSyn/GabaASyn with the Hay reference parameters; a surrogate
  has only exc/inh channels): parameters that differ from those (e.g. Exp2Syn ``tau1``, ``tau2``,
  ``e``) give ONE :class:`UnhonouredParameterWarning` per synMech and network, naming them.
* Weights into a surrogate must be finite and >= 0 (it was never trained on negative ones): a
  connection with another weight raises naming the weight and the connection, unless the cell rule
  opts in with ``surrogate_cell_params(..., allow_negative_weights=True)`` (non-finite always raise).

Recording: ``simConfig.recordTraces`` entries with ``'var': 'v'`` and a ``sec``/``loc`` of the
cell record the surrogate's voltage of that segment into the usual ``simData[key]['cell_<gid>']``
Vectors, created when NetPyNE sets up recording (so its "Recording N traces" summary and
``sim.allSimData`` count them like any cell's), so ``plotTraces`` and ``plotRaster`` work unchanged.
A surrogate trace is the surrogate's 1-ms point samples (with the fitted action potential added at
emitted spikes, when the checkpoint has a spike waveform), linear between them at ``recordStep``. The
last surrogate step of a run is at ``duration - 1`` ms for integer durations (step k needs the inputs of
(k-1, k]): the samples after it, up to ``duration``, hold its value, so no sample is NaN. All segments:
engine recordings (``cell.engine.record(...)``, :class:`~lfdeep_neuron.cosim.recording.Recording`).

LFP: :func:`record_surrogate_lfp` asks for the extracellular potential of the L5PC populations
(surrogate and detailed) at chosen electrodes, sampled every 1 ms from t = 0. Surrogates: an engine
sink (:class:`~lfdeep_neuron.lfp.PopulationLFPSink`: one product for all local cells, each placed
and rotated as in the network) from their predicted voltages or currents; HayL5PC populations:
:class:`~lfdeep_neuron.lfp.MembraneCurrentLFP` from NEURON's ``i_membrane_`` through the same
electrode mapping. Each rank keeps its part in ``simData['surrogateLFP']['node<rank>:<source>']``;
:func:`surrogate_lfp` sums them after NetPyNE's gather. Orientation ``[T, E]`` (time first), as
NetPyNE's own ``sim.allSimData['LFP']``. NetPyNE's ``simConfig.recordLFP`` itself sees no L5PC
cell of either class (it sums only cells whose type is exactly its ``CompartCell``: its LFP of these
populations is zero), so the glue warns once when it is set and :func:`record_surrogate_lfp` takes
its contacts by default.

Placement: a cell at NetPyNE position (x, y, z) µm has its soma centre there; the morphology keeps
its file orientation (Hay cell: apical dendrite along +y), turned about y when
``netParams.rotateCellsRandomly`` is set, by NetPyNE's angle and in NetPyNE's sense.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np

from lfdeep_neuron.cosim.cell import KIND_TYPES, SurrogateL5PC, section_name
from lfdeep_neuron.cosim.engine import default_spike_threshold
from lfdeep_neuron.cosim.sinks import EngineSink
from lfdeep_neuron.errors import InputError
from lfdeep_neuron.lfp import MembraneCurrentLFP, PopulationLFPSink

__all__ = ["surrogate_cell_params", "hay_cell_params", "add_syn_mechs", "record_surrogate_lfp",
           "surrogate_lfp", "SurrogateCompartCell", "HayCompartCell", "register_model", "install",
           "installed", "SYN_MECHS", "UnhonouredParameterWarning"]


class UnhonouredParameterWarning(UserWarning):
    """A NetPyNE parameter the L5PC cells do not apply (e.g. a synMech's own time constants)."""


#: ``mod`` names of synMechs and the surrogate channel type they map to (0 exc, 1 inh).
MOD_TYPES = {"AmpaNmdaSyn": 0, "GabaASyn": 1}

#: synMechParams registered by :func:`add_syn_mechs`: our synapses with the Hay reference parameters.
SYN_MECHS = {
    "exc": "AmpaNmdaSyn", "AMPA_NMDA": "AmpaNmdaSyn",
    "inh": "GabaASyn", "GABAA": "GabaASyn",
}

_MODELS: dict = {}                # registered model objects (and loaded checkpoints) by key
_MODEL_KEYS = itertools.count()
_LAPLACIANS: dict = {}            # morphology path -> AxialLaplacian (once per process)


# ---------------------------------------------------------------------------------------------
# Spec helpers
# ---------------------------------------------------------------------------------------------

def _sec_key(name: str) -> str:
    """NetPyNE section label of a canonical section name (``'soma[0]'`` -> ``'soma'``)."""
    return "soma" if name == "soma[0]" else name


def _canonical(label: str) -> str:
    return section_name(label)


#: Parameters of a synMech entry that are NetPyNE bookkeeping, not synapse parameters.
_SYN_MECH_META = ("mod", "label", "selfNetCon", "loc", "pointerParams", "shape", "plast")


def _secs_from_table(table) -> tuple[dict, dict]:
    """cellParams ``secs`` and ``secLists`` from a segment table (canonical order).

    ``geom`` holds ``L`` (µm, sum of segment lengths), ``nseg``, ``diam`` (µm, mean) and, where the
    table has 3-D points, ``pt3d`` (segment end points as in the file); ``topol`` the parent section
    and its x (1 if the parent segment is the last of a non-root section, else its centre). The
    structure is for NetPyNE's bookkeeping (sections, lists, lengths); the cells are built elsewhere.
    """
    names = np.asarray(table["name"]).astype(str)
    x = np.asarray(table["x"], np.float64)
    parent = np.asarray(table["parent_seg"], np.int64)
    length = np.asarray(table["length_um"], np.float64)
    diam = np.asarray(table["diam_um"], np.float64)
    start = np.asarray(table["xyz_start"], np.float64)
    end = np.asarray(table["xyz_end"], np.float64)
    order = list(dict.fromkeys(names))
    segs = {n: np.flatnonzero(names == n) for n in order}
    secs, lists = {}, {k: [] for k in ("somatic", "basal", "apical", "dendritic", "axonal", "all")}
    for n in order:
        idx = segs[n][np.argsort(x[segs[n]])]
        geom = {"L": float(length[idx].sum()), "nseg": int(len(idx)), "diam": float(diam[idx].mean())}
        if np.isfinite(start[idx]).all() and np.isfinite(end[idx]).all():
            pts = np.vstack([start[idx[:1]], end[idx]])
            d = np.concatenate([diam[idx[:1]], diam[idx]])
            geom["pt3d"] = [[float(a), float(b), float(c), float(dd)] for (a, b, c), dd in zip(pts, d)]
        p = int(parent[idx[0]])
        if p < 0:
            topol = {}
        else:
            pname = names[p]
            last = segs[pname][np.argmax(x[segs[pname]])] == p
            root = parent[segs[pname]].min() < 0
            topol = {"parentSec": _sec_key(pname), "parentX": 1.0 if (last and not root) else float(x[p]),
                     "childX": 0.0}
        key = _sec_key(n)
        secs[key] = {"geom": geom, "topol": topol}
        kind = n.split("[")[0]
        lists["all"].append(key)
        lists[{"soma": "somatic", "dend": "basal", "apic": "apical", "axon": "axonal"}[kind]].append(key)
        if kind in ("dend", "apic"):
            lists["dendritic"].append(key)
    secs["soma"]["threshold"] = 0.0          # HayL5PC's spike: soma(0.5) crossing 0 mV
    return secs, {k: v for k, v in lists.items() if v}


def register_model(model, key: str | None = None) -> str:
    """Register a surrogate object under a key that cellParams can name (returns the key).

    Keys default to ``'model:<n>'`` in registration order, which is the same on every MPI rank as
    long as every rank runs the same script.
    """
    if not hasattr(model, "streamer"):
        raise TypeError(f"model must be a streaming surrogate (with .streamer), got {type(model).__name__}")
    key = key or f"model:{next(_MODEL_KEYS)}"
    _MODELS[key] = model
    return key


def _model(spec):
    """The model object named by cellParams' ``surrogate['model']`` (path or registered key)."""
    if spec in _MODELS:
        return _MODELS[spec]
    if str(spec).startswith("model:"):
        raise InputError(f"surrogate model {spec!r} is not registered in this process: call "
                         "surrogate_cell_params(model) (or register_model) in every rank's script")
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate, resolve_checkpoint

    try:
        path = resolve_checkpoint(spec)          # a pointer file (models/DEFAULT): the checkpoint it names
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    model = load_surrogate(path)
    _MODELS[str(spec)] = model
    return model


def surrogate_cell_params(model, *, spike_threshold: float | None = None, device=None, dtype: str | None = None,
                          feedback: bool = True, allow_negative_weights: bool = False) -> dict:
    """cellParams rule of a deep-surrogate Hay L5PC (``cellModel: 'SurrogateL5PC'``).

    Parameters
    ----------
    model : str, Path or surrogate object
        A checkpoint (loaded once per process) or a model object (registered under a key; see
        :func:`register_model`).
    spike_threshold : float, optional
        Spike-logit threshold of the engine (0 = probability 1/2). Default: the checkpoint's
        calibrated ``metrics['spike_threshold_logit']``, else 0.
    device : str, optional
        Torch device of the engine (default CUDA if available, else CPU).
    dtype : {'float32', 'float64'}, optional
        Engine dtype; 'float64' makes results independent of the split over ranks to round-off.
    feedback : bool
        Closed-loop stepping (the trained regime).
    allow_negative_weights : bool
        Accept connections with negative weights into these cells (the surrogate was never trained
        on them; default False: such a connection raises ``InputError``).

    Calls :func:`install`, so NetPyNE creates :class:`SurrogateCompartCell` cells for this rule.
    """
    if isinstance(model, (str, Path)):
        key = str(Path(model).resolve())
        obj = _model(key)
    else:
        key = next((k for k, m in _MODELS.items() if m is model), None) or register_model(model)
        obj = model
    if dtype not in (None, "float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    table = (getattr(obj, "meta", None) or {}).get("segments")
    if table is None:
        raise InputError("the surrogate carries no segment table (model.meta['segments']); load it with "
                         "load_surrogate or set model.meta = dict(segments=..., synapses=..., dt_ms=...)")
    secs, lists = _secs_from_table(table)
    install()
    return {"cellModel": "SurrogateL5PC", "secs": secs, "secLists": lists,
            "surrogate": {"model": key, "spike_threshold": None if spike_threshold is None else float(spike_threshold),
                          "device": None if device is None else str(device), "dtype": dtype,
                          "feedback": bool(feedback), "allow_negative_weights": bool(allow_negative_weights)}}


def hay_cell_params(morphology) -> dict:
    """cellParams rule of the detailed Hay L5PC (``cellModel: 'HayL5PC'``), same sections as the surrogate.

    Each cell is a :class:`~lfdeep_neuron.hay.HayL5PC` built from ``morphology`` (the biophysics are
    HayL5PC's, not re-expressed as NetPyNE mechs). Set ``simConfig.hParams['v_init'] = -76`` (mV)
    as for HayL5PC. Calls :func:`install`, so NetPyNE creates :class:`HayCompartCell` cells for it.
    """
    from lfdeep_neuron.hay import HayL5PC

    path = Path(morphology)
    if not path.is_file():
        raise InputError(f"Hay morphology {str(path)!r} not found")
    install()
    cell = HayL5PC(path, synapses=False)
    table = cell.segment_table()
    del cell
    secs, lists = _secs_from_table(table)
    return {"cellModel": "HayL5PC", "secs": secs, "secLists": lists, "hay": {"morphology": str(path.resolve())}}


def add_syn_mechs(netParams) -> dict:
    """Register the synMechs ``'exc'``/``'AMPA_NMDA'`` (AmpaNmdaSyn) and ``'inh'``/``'GABAA'`` (GabaASyn).

    Their parameters are HayL5PC's synapses (weight 1 = one reference activation). Existing entries
    with these labels are left alone. Returns ``netParams.synMechParams``.
    """
    from lfdeep_neuron.hay.cell import EXC_PARAMS, INH_PARAMS

    params = {"AmpaNmdaSyn": EXC_PARAMS, "GabaASyn": INH_PARAMS}
    for label, mod in SYN_MECHS.items():
        if label not in netParams.synMechParams:
            netParams.synMechParams[label] = {"mod": mod, **params[mod]}
    return netParams.synMechParams


def record_surrogate_lfp(simConfig, electrodes_um=None, *, sigma_S_per_m: float = 0.3,
                         method: str = "linesource", pops=None, morphology=None, laplacian=None,
                         device=None, source: str = "auto") -> dict:
    """Ask for the LFP of the L5PC populations, surrogate and detailed (sets ``simConfig.recordSurrogateLFP``).

    Sampled every 1 ms from t = 0 and returned by :func:`surrogate_lfp` as ``[T, E]`` (time first, as
    NetPyNE's ``sim.allSimData['LFP']``). Surrogates contribute from their predictions (``source``),
    :class:`HayCompartCell` cells from NEURON's ``i_membrane_`` (point samples), through the same
    electrode mapping.

    Parameters
    ----------
    electrodes_um : array [E, 3], optional
        Contact positions (µm, network coordinates). Default: ``simConfig.recordLFP`` when set (NetPyNE's
        own LFP request, which does not see these cells), else a 16-contact laminar probe along y,
        100 µm apart from y = -300 µm, through the centre (sizeX/2, sizeZ/2) of the network.
    sigma_S_per_m, method : conductivity and LFPykit model ('linesource' or 'pointsource').
    pops : list of str, optional
        Populations to include (default: every SurrogateL5PC and HayL5PC population).
    morphology : path, optional
        Hay morphology used once per process to build the axial Laplacian (needs NEURON, ~1 s);
        default ``$LFDEEP_HAY_MORPHOLOGY`` or ``../shared/hay/cell1.asc`` next to the repository.
    laplacian : path, optional
        An ``.npz`` written by ``AxialLaplacian.save`` instead of building it.
    device : torch device for the LFP sums (default: the engine's).
    source : {'auto', 'currents', 'voltages'}
        What the LFP is computed from. ``'voltages'``: ``M (-L v)`` from the predicted point samples
        (the Laplacian amplifies voltage errors, see docs/ARCHITECTURE.md, "LFP"); ``'currents'``:
        ``M i`` from the predicted bin-mean membrane currents of a model trained with current tasks
        (``--imem``), so sample k is the LFP averaged over (k-1, k] ms, like NEURON's bin-mean LFP;
        ``'auto'`` (default): currents when the model predicts them, else voltages.
    """
    if source not in ("auto", "currents", "voltages"):
        raise InputError(f"source must be 'auto', 'currents' or 'voltages', got {source!r}")
    if method not in ("linesource", "pointsource"):
        raise InputError(f"method must be 'linesource' or 'pointsource', got {method!r}")
    if electrodes_um is None and getattr(simConfig, "recordLFP", None):
        electrodes_um = simConfig.recordLFP
    spec = {"electrodes_um": None if electrodes_um is None else np.asarray(electrodes_um, float).tolist(),
            "sigma_S_per_m": float(sigma_S_per_m), "method": method,
            "pops": None if pops is None else list(pops),
            "morphology": None if morphology is None else str(morphology),
            "laplacian": None if laplacian is None else str(laplacian),
            "device": None if device is None else str(device), "source": source}
    if spec["electrodes_um"] is not None:
        arr = np.asarray(spec["electrodes_um"])
        if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
            raise InputError(f"electrodes_um must be [E, 3] µm with E >= 1, got shape {arr.shape}")
    simConfig.recordSurrogateLFP = spec
    return spec


def surrogate_lfp(sim=None) -> dict | None:
    """The L5PC populations' LFP after ``sim.gatherData()`` (on rank 0; None elsewhere).

    Returns ``{'t_ms' [T], 'lfp_mV' [T, E], 'electrodes_um' [E, 3]}``: the per-rank, per-source parts
    of ``allSimData['surrogateLFP']`` added up (samples at t = 0, 1, ... ms). ``lfp_mV`` is time-first,
    like NetPyNE's own ``sim.allSimData['LFP']``.
    """
    if sim is None:
        from netpyne import sim
    data = getattr(sim, "allSimData", None)
    if data is None or getattr(sim, "rank", 0) != 0:
        return None
    if "surrogateLFP" not in data:
        raise InputError("no L5PC LFP in sim.allSimData: call record_surrogate_lfp(simConfig) before creating the "
                         "network (it covers SurrogateL5PC and HayL5PC populations), build a population of "
                         "either, and gather the data (sim.createSimulateAnalyze does)")
    d = data["surrogateLFP"]
    parts = [np.asarray(v, np.float64) for k, v in d.items() if str(k).startswith("node")]
    t_ms = np.asarray(d["t_ms"], np.float64)
    electrodes = np.asarray(d["electrodes_um"], np.float64)
    lfp = np.sum(parts, axis=0) if parts else np.zeros((len(t_ms), len(electrodes)))
    return {"t_ms": t_ms, "lfp_mV": lfp, "electrodes_um": electrodes}


# ---------------------------------------------------------------------------------------------
# Cell classes
# ---------------------------------------------------------------------------------------------

def _kind_of_syn_mech(label) -> int:
    """0 (excitatory) or 1 (inhibitory) for a synMech label, from its ``mod`` or its label."""
    from netpyne import sim

    if isinstance(label, (list, tuple)):
        raise InputError(f"synMech {label!r}: give one synMech per connection")
    params = sim.net.params.synMechParams
    if label is None:
        raise InputError("connection without 'synMech': surrogate L5PC connections need 'exc' or 'inh' "
                         "(add_syn_mechs(netParams) registers them)")
    if label not in params:
        raise InputError(f"unknown synMech {label!r}: not in netParams.synMechParams "
                         f"({sorted(params)}); add_syn_mechs(netParams) registers 'exc' and 'inh'")
    mod = params[label].get("mod")
    if mod in MOD_TYPES:
        return MOD_TYPES[mod]
    key = str(label).strip().lower()
    if key in KIND_TYPES:
        return KIND_TYPES[key]
    raise InputError(f"synMech {label!r} (mod {mod!r}) is neither excitatory nor inhibitory for an L5PC: "
                     f"use mod AmpaNmdaSyn or GabaASyn (add_syn_mechs) or a label in {sorted(KIND_TYPES)}")


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _warn_unhonoured(label) -> None:
    """ONE warning per network and synMech naming the parameters the L5PC cells will not apply."""
    from netpyne import sim

    from lfdeep_neuron.hay.cell import EXC_PARAMS, INH_PARAMS

    warned = _net_store()["warned"]
    if label in warned:
        return
    warned.add(label)
    params = dict(sim.net.params.synMechParams[label])
    kind = _kind_of_syn_mech(label)
    own_mod, own = (("AmpaNmdaSyn", EXC_PARAMS), ("GabaASyn", INH_PARAMS))[kind]
    mod = params.get("mod")
    reference = own if mod == own_mod else {}
    ignored = sorted(k for k, v in params.items()
                     if k not in _SYN_MECH_META and not (k in reference and _same_number(v, reference[k])))
    if mod != own_mod:
        ignored = ["mod"] + ignored
    if ignored:
        warnings.warn(
            f"synMech {label!r} (mod {mod!r}): {', '.join(ignored)} not honoured by the L5PC cells "
            f"(SurrogateL5PC / HayL5PC): its connections use the segment's own {own_mod} with the Hay "
            "reference parameters, weight in units of that reference synapse", UnhonouredParameterWarning,
            stacklevel=3)


def _placement(cell, centre_um):
    """(position_um, rotation) of HayL5PC's convention putting the soma centre at the cell's x, y, z."""
    from netpyne import sim

    p = np.array([cell.tags.get(c, 0.0) for c in "xyz"], np.float64)
    rot = None
    if sim.net.params.rotateCellsRandomly:
        rot = (0.0, -float(cell.randRotationAngle), 0.0)   # NetPyNE turns x, z by +angle (= Ry(-angle))
    return p - np.asarray(centre_um, np.float64), rot


def _net_store() -> dict:
    """Per-network state of this module (sinks, LFP recorders, warnings given), kept on ``sim.net``."""
    from netpyne import sim

    store = getattr(sim.net, "lfdeepNetpyne", None)
    if store is None:
        store = {"traces": {}, "lfp": {}, "hay_lfp": None, "warned": set()}
        sim.net.lfdeepNetpyne = store
    return store


_SYNAPTIC_KINDS = ("dend", "apic")


class _L5PCCell:
    """What both cell classes share: section names and lists, synMech and weight checks."""

    _private = ()

    def _what(self):
        return f"{type(self).__name__} gid={self.gid}"

    def _section_key(self, label):
        """The ``secs``/``secLists`` key of a name as users write it, or None if unknown."""
        if isinstance(label, str) and (label in self.secs or label in self.secLists):
            return label
        try:
            key = _sec_key(section_name(label))
        except (InputError, TypeError):
            return None
        return key if key in self.secs else None

    def _unknown(self, bad, where=""):
        return InputError(f"unknown section(s) {bad}{where} on {self._what()}: sections are 'soma', "
                          "'dend[0..]', 'apic[0..]', 'axon[0|1]' (or an imported template's 'apic_36'); "
                          f"secLists {sorted(self.secLists)}")

    def _conn_sections(self, sec):
        """A connection's ``sec`` resolved to sections with synapses (a key or a list of keys)."""
        if sec is None:
            raise InputError(f"connection to {self._what()} without 'sec': name a dendritic section "
                             "('apic[36]', 'dend[3]') or a secList ('apical', 'basal', 'dendritic')")
        labels = list(sec) if isinstance(sec, (list, tuple)) else [sec]
        keys = [self._section_key(lab) for lab in labels]
        bad = [lab for lab, k in zip(labels, keys) if k is None]
        if bad:
            raise self._unknown(bad)
        synaptic = lambda k: k.split("[")[0] in _SYNAPTIC_KINDS   # noqa: E731
        if len(keys) == 1 and keys[0] in self.secs:
            if not synaptic(keys[0]):
                raise InputError(f"no synaptic input channel on {keys[0]} of {self._what()}: the L5PC's "
                                 "1278 channels are on the 639 basal and apical segments only")
            return keys[0]
        expanded = [s for k in keys for s in (self.secLists[k] if k in self.secLists else [k])]
        keep = [s for s in expanded if synaptic(s)]
        if not keep:
            raise InputError(f"section list {sec!r} on {self._what()} has no section with synapses (soma "
                             "and axon carry none): use 'apical', 'basal' or 'dendritic'")
        if isinstance(sec, str) and sec in self.secLists and keep == list(self.secLists[sec]):
            return sec
        return keep

    def _trace_section(self, key, params) -> str:
        """The section key of a recordTraces entry (one section, as users write it)."""
        sec = params.get("sec", "soma")
        k = self._section_key(sec)
        if k is None:
            raise self._unknown([sec], f" in recordTraces[{key!r}]")
        if k not in self.secs:
            raise InputError(f"recordTraces[{key!r}]: 'sec' must name one section, not the list {sec!r}")
        return k

    @staticmethod
    def _numeric_weights(weight):
        if isinstance(weight, (list, tuple, np.ndarray)):
            return [w for w in weight if isinstance(w, (int, float, np.number))]
        return [weight] if isinstance(weight, (int, float, np.number)) else []

    def addConn(self, params, netStimParams=None):
        from netpyne import sim

        if params.get("gapJunction") or params.get("pointer"):
            raise InputError(f"{self._what()}: pointer/gap-junction connections are not supported")
        params["sec"] = self._conn_sections(params.get("sec"))
        if not params.get("synMech") and sim.net.params.synMechParams:
            params["synMech"] = next(iter(sim.net.params.synMechParams))   # NetPyNE's default
        _kind_of_syn_mech(params.get("synMech"))
        _warn_unhonoured(params["synMech"])
        for w in self._numeric_weights(params.get("weight")):
            self._check_weight(float(w), params)
        n0 = len(self.conns)
        super().addConn(params, netStimParams)
        self._after_conns(self.conns[n0:])

    def _check_weight(self, weight: float, conn) -> None:
        pass

    def _after_conns(self, conns):
        pass

    def __getstate__(self):
        state = super().__getstate__()
        for name in self._private:
            state.pop(name, None)
        return state


def _import_netpyne_cell():
    from netpyne.cell.compartCell import CompartCell

    return CompartCell


CompartCell = _import_netpyne_cell()


class SurrogateCompartCell(_L5PCCell, CompartCell):
    """A NetPyNE cell backed by a :class:`SurrogateL5PC` (see the module doc)."""

    _private = ("surrogate", "engine")

    def createNEURONObj(self, prop, propLabel=None):
        opts = dict(prop.get("surrogate") or {})
        if "model" not in opts:
            raise InputError(f"cellParams {propLabel!r}: no 'surrogate' options; build the rule with "
                             "surrogate_cell_params(model)")
        self.allow_negative_weights = bool(opts.get("allow_negative_weights", False))
        self.engine = _engine(opts)
        centre = np.asarray(self.engine.segments["xyz_mid"], np.float64)[0]
        pos, rot = _placement(self, centre)
        self.surrogate = SurrogateL5PC(engine=self.engine, position_um=pos, rotation=rot)
        _warn_netpyne_lfp()
        _setup_lfp_sink(self.engine)

    def associateGid(self, threshold=None):
        from netpyne import sim

        if sim.cfg.createNEURONObj:
            self.surrogate.register_gid(self.gid, sim.pc)
        sim.net.gid2lid[self.gid] = len(sim.net.gid2lid)

    def addSynMechNEURONObj(self, synMech, synMechLabel, synMechParams, sec, loc, preLoc=None):
        synMech["hObj"] = self.surrogate.target          # every channel enters the artificial cell

    def _channel(self, sec, loc, syn_mech) -> int:
        return self.surrogate.synapse(_canonical(sec), loc, _kind_of_syn_mech(syn_mech)).channel

    def _check_weight(self, weight: float, conn) -> None:
        """Weights into a surrogate: finite, and >= 0 unless the cell rule opts in."""
        if np.isfinite(weight) and (weight >= 0 or getattr(self, "allow_negative_weights", False)):
            return
        what = (f"connection {conn.get('label', '?')!r} (preGid {conn.get('preGid', '?')} -> {self._what()}, "
                f"sec {conn.get('sec')!r}, synMech {conn.get('synMech')!r})")
        if not np.isfinite(weight):
            raise InputError(f"{what}: weight {weight!r} is not finite")
        raise InputError(f"{what}: negative weight {weight!r}; the surrogate was never trained on negative "
                         "weights (use an inhibitory synMech), or opt in with "
                         "surrogate_cell_params(..., allow_negative_weights=True)")

    def _after_conns(self, conns):
        for conn in conns:
            nc = conn.get("hObj")
            if nc is None or "sec" not in conn:
                continue
            self._check_weight(float(nc.weight[0]), conn)
            ch = self._channel(conn["sec"], conn["loc"], conn["synMech"])
            nc.weight[1] = float(ch)
            conn["channel"] = ch

    def addStim(self, params):
        if params.get("type", "NetStim") != "NetStim":
            raise InputError(f"{self._what()}: only NetStim sources can target a surrogate "
                             f"(got stim type {params.get('type')!r}; use a VecStim population for spike times)")
        return super().addStim(params)

    def recordTraces(self):
        """Voltage traces of the surrogate: NetPyNE-style Vectors in ``simData[key]['cell_<gid>']``."""
        from netpyne import sim

        for key, params in sim.cfg.recordTraces.items():
            if "conds" in params and not self.checkConditions(params["conds"]):
                continue
            var = params.get("var")
            if var != "v" or any(k in params for k in ("mech", "synMech", "stim", "pointp")):
                warnings.warn(f"recordTraces[{key!r}]: a surrogate L5PC records only section voltages "
                              "('var': 'v'); skipped", UnhonouredParameterWarning, stacklevel=2)
                continue
            sec = self._trace_section(key, params)
            seg = self.engine.channel_map.segment(_canonical(sec), float(params.get("loc", 0.5)))
            _trace_sink(self.engine).add(key, self, seg)


class HayCompartCell(_L5PCCell, CompartCell):
    """A NetPyNE cell backed by a detailed :class:`~lfdeep_neuron.hay.HayL5PC` (see the module doc)."""

    _private = ("hay", "_sec_names")

    def createNEURONObj(self, prop, propLabel=None):
        from lfdeep_neuron.hay import HayL5PC

        morph = (prop.get("hay") or {}).get("morphology")
        if morph is None:
            raise InputError(f"cellParams {propLabel!r}: no Hay morphology; build it with hay_cell_params(path)")
        cell = HayL5PC(morph, synapses=True)              # placed after: needs the file's soma centre
        pos, rot = _placement(self, cell.soma_centre_file_um)
        cell.set_placement(pos, rot)
        self.hay = cell
        self._sec_names = {}
        for key in self.secs:
            self.secs[key]["hObj"] = cell.section(_canonical(key))
            self._sec_names[str(id(self.secs[key]))] = key
        _warn_netpyne_lfp()
        _setup_hay_lfp()

    def addSynMechNEURONObj(self, synMech, synMechLabel, synMechParams, sec, loc, preLoc=None):
        name = self._sec_names.get(str(id(sec)))
        if name is None:
            raise InputError(f"{self._what()}: synapse on an unknown section")
        kind = ("exc", "inh")[_kind_of_syn_mech(synMechLabel)]
        synMech["hObj"] = self.hay.synapse(_canonical(name), float(loc), kind)   # the segment's synapse

    def recordTraces(self):
        """NetPyNE's own trace recording, with section names resolved as for connections."""
        from netpyne import sim

        given = sim.cfg.recordTraces
        resolved = {}
        for key, params in given.items():
            if "sec" in params and not ("conds" in params and not self.checkConditions(params["conds"])):
                params = {**params, "sec": self._trace_section(key, params)}
            resolved[key] = params
        sim.cfg.recordTraces = resolved
        try:
            super().recordTraces()
        finally:
            sim.cfg.recordTraces = given


def _engine(opts):
    import torch

    from lfdeep_neuron.cosim.engine import SurrogateEngine

    model = _model(opts["model"])
    dtype = {None: None, "float32": torch.float32, "float64": torch.float64}[opts.get("dtype")]
    eng = SurrogateEngine.get(model, device=opts.get("device"), spike_threshold=opts.get("spike_threshold"),
                              feedback=opts.get("feedback", True), dtype=dtype)
    want = opts.get("spike_threshold")
    want = default_spike_threshold(eng.model) if want is None else float(want)
    if eng.spike_threshold != want or eng.dtype != dtype:
        raise InputError(f"two cellParams use the same surrogate with different options (spike_threshold "
                         f"{eng.spike_threshold} vs {want}, dtype {eng.dtype} vs {dtype}): one engine per model")
    return eng


# ---------------------------------------------------------------------------------------------
# Voltage traces: an engine sink writing into NetPyNE's simData Vectors
# ---------------------------------------------------------------------------------------------

class _TraceSink(EngineSink):
    """Writes surrogate voltages into NetPyNE's ``simData[key]['cell_<gid>']`` Vectors during the run.

    The Vectors are made when NetPyNE sets up recording (:meth:`add`), so its summary counts them,
    and are filled in place (never resized during a run: the numpy views stay valid). Step k fills the
    samples up to t_k, linear from step k-1, and holds its value on the samples up to t_k + Δ, which
    step k+1 overwrites: the samples after a run's last step (up to ``duration``) keep that value.
    """

    def __init__(self, engine):
        self.engine = engine
        self.items = {}                  # (key, gid) -> (cell, segment, Vector)
        self._views = []

    @staticmethod
    def _samples():
        from netpyne import sim

        step = float(sim.cfg.recordStep) if sim.cfg.recordStep != "adaptive" else 0.1
        return step, int(round(float(sim.cfg.duration) / step)) + 1

    def add(self, key, cell, seg):
        """Record segment ``seg`` of ``cell`` under ``simData[key]['cell_<gid>']`` (made now, NaN)."""
        from neuron import h
        from netpyne import sim

        vec = h.Vector(self._samples()[1])
        vec.fill(np.nan)
        sim.simData[key][f"cell_{cell.gid}"] = vec
        self.items[(key, cell.gid)] = (cell, int(seg), vec)

    def reset(self, engine):
        import torch
        from netpyne import sim

        self.record_step, self.n = self._samples()
        self._views, rows, segs = [], [], []
        for (key, gid), (cell, seg, vec) in self.items.items():
            if vec.size() != self.n:
                vec.resize(self.n)
            vec.fill(np.nan)
            if key in sim.simData:
                sim.simData[key][f"cell_{gid}"] = vec
            self._views.append(vec.as_numpy())
            rows.append(cell.surrogate.index)
            segs.append(seg)
        dev = engine.device
        self._rows = torch.as_tensor(rows, dtype=torch.long, device=dev)
        self._segs = torch.as_tensor(segs, dtype=torch.long, device=dev)
        self._prev = None
        self._next = 0
        return None

    def append(self, step):
        if not self._views:
            return
        vals = step.v_mV[self._rows, self._segs].double().cpu().numpy()
        t_k = step.t_ms
        j1 = min(int(np.floor(t_k / self.record_step + 1e-9)), self.n - 1)
        j0 = self._next
        if j1 >= j0:
            if self._prev is None:
                block = np.repeat(vals[:, None], j1 - j0 + 1, axis=1)
            else:
                w = (np.arange(j0, j1 + 1) * self.record_step - (t_k - self.engine.step_ms)) / self.engine.step_ms
                block = self._prev[:, None] + (vals - self._prev)[:, None] * w[None, :]
            for view, row in zip(self._views, block):      # one slice per recorded trace
                view[j0:j1 + 1] = row
            self._next = j1 + 1
        # hold until the next step (which overwrites these samples): after the run's last step, the
        # samples up to `duration` would otherwise stay NaN
        j_hold = min(int(np.floor((t_k + self.engine.step_ms) / self.record_step + 1e-9)), self.n - 1)
        if j_hold >= self._next:
            for view, v in zip(self._views, vals):
                view[self._next:j_hold + 1] = v
        self._prev = vals


def _trace_sink(engine) -> _TraceSink:
    store = _net_store()["traces"]
    sink = store.get(id(engine))
    if sink is None or sink.engine is not engine:
        sink = store[id(engine)] = _TraceSink(engine)
        engine.add_sink(sink)
    return sink


# ---------------------------------------------------------------------------------------------
# LFP of the L5PC populations (surrogate: engine sink; HayL5PC: i_membrane_)
# ---------------------------------------------------------------------------------------------

def _fast_imem_guard() -> None:
    """FInitializeHandler(0): no sections in this process -> fast_imem off (nothing to compute)."""
    from neuron import h

    if next(iter(h.allsec()), None) is None:
        h.CVode().use_fast_imem(0)


def _warn_netpyne_lfp() -> None:
    """Once per network: NetPyNE's own recordLFP returns zeros for these cells."""
    from netpyne import sim

    warned = _net_store()["warned"]
    if not getattr(sim.cfg, "recordLFP", None) or "recordLFP" in warned:
        return
    warned.add("recordLFP")
    from neuron import h

    # NEURON 9 aborts (assertion in nrn_calc_fast_imem) when fast_imem is on and the process has no
    # section, as on a rank with surrogates only: NetPyNE's recordLFP turns it on, so turn it off there.
    _net_store()["fast_imem_guard"] = h.FInitializeHandler(0, _fast_imem_guard)
    warnings.warn("simConfig.recordLFP does not see SurrogateL5PC / HayL5PC cells (NetPyNE sums only cells of "
                  "its own CompartCell class, so their part of sim.allSimData['LFP'] is zero): call "
                  "record_surrogate_lfp(simConfig) (it takes the recordLFP contacts) and read surrogate_lfp()",
                  UnhonouredParameterWarning, stacklevel=3)


def _lfp_electrodes(spec):
    from netpyne import sim

    from lfdeep_neuron.lfp import ElectrodeArray, laminar_probe

    if spec["electrodes_um"] is not None:
        return ElectrodeArray(np.asarray(spec["electrodes_um"]), sigma_S_per_m=spec["sigma_S_per_m"])
    p = sim.net.params
    return laminar_probe(x_um=p.sizeX / 2.0, z_um=p.sizeZ / 2.0, sigma_S_per_m=spec["sigma_S_per_m"])


def _lfp_steps(step_ms: float) -> int:
    """Samples t = 0, step, 2 step, ... before ``duration`` (the engine's rule)."""
    from netpyne import sim

    return max(int(np.floor((float(sim.cfg.duration) - float(sim.cfg.dt) / 4.0) / step_ms + 1e-9)) + 1, 0)


def _in_pops(cell, spec) -> bool:
    return spec["pops"] is None or cell.tags.get("pop") in spec["pops"]


def _publisher(label: str):
    """Called after each reset of an LFP recorder: puts its [T, E] array into this rank's simData."""
    def publish(recorder):
        from netpyne import sim

        entry = sim.simData.setdefault("surrogateLFP", {})
        entry[f"node{sim.rank}:{label}"] = recorder.lfp_mV
        entry["t_ms"] = recorder.t_ms
        entry["electrodes_um"] = recorder.electrodes.xyz_um.tolist()
    return publish


def _default_morphology():
    import os

    env = os.environ.get("LFDEEP_HAY_MORPHOLOGY")
    cand = [Path(env)] if env else []
    cand.append(Path(__file__).resolve().parents[2].parent / "shared" / "hay" / "cell1.asc")
    return next((c for c in cand if c.is_file()), None)


def _laplacian(spec):
    from lfdeep_neuron.lfp import AxialLaplacian

    if spec.get("laplacian"):
        return AxialLaplacian.load(spec["laplacian"])
    morph = spec.get("morphology") or _default_morphology()
    if morph is None:
        raise InputError("surrogate LFP needs the axial Laplacian of the Hay cell: pass morphology= (cell1.asc) "
                         "or laplacian= (.npz of AxialLaplacian.save) to record_surrogate_lfp, or set "
                         "$LFDEEP_HAY_MORPHOLOGY")
    key = str(Path(morph).resolve())
    if key not in _LAPLACIANS:
        from lfdeep_neuron.hay import HayL5PC

        cell = HayL5PC(key, synapses=False)
        _LAPLACIANS[key] = AxialLaplacian.from_cell(cell)
        del cell
    return _LAPLACIANS[key]


def _setup_lfp_sink(engine):
    """The surrogate LFP sink of ``engine`` in this network (made once, if the LFP was asked for)."""
    from netpyne import sim

    spec = getattr(sim.cfg, "recordSurrogateLFP", None)
    if not spec:
        return
    store = _net_store()["lfp"]
    if store.get(id(engine), (None,))[0] is engine:
        return
    source = spec.get("source", "auto")
    if source == "currents" and not engine.predicts_currents:
        raise InputError("record_surrogate_lfp(source='currents') needs a surrogate with membrane-current "
                         "tasks (trained with --imem); this one predicts voltages only")
    use_currents = source == "currents" or (source == "auto" and engine.predicts_currents)
    lap = None if use_currents else _laplacian(spec)   # M i from predicted currents: no Laplacian

    def cells():
        return [c.surrogate for c in sim.net.cells
                if isinstance(c, SurrogateCompartCell) and c.engine is engine and _in_pops(c, spec)]

    sink = PopulationLFPSink(_lfp_electrodes(spec), lap, cells=cells, method=spec["method"],
                             device=spec["device"], n_steps=lambda: _lfp_steps(engine.step_ms),
                             on_reset=_publisher(f"surrogate{len(store)}"))
    store[id(engine)] = (engine, sink)
    engine.add_sink(sink)


def _setup_hay_lfp():
    """The i_membrane_ LFP recorder of this network's HayL5PC cells (made once, if asked for)."""
    from netpyne import sim

    spec = getattr(sim.cfg, "recordSurrogateLFP", None)
    store = _net_store()
    if not spec or store["hay_lfp"] is not None:
        return

    def cells():
        return [c.hay for c in sim.net.cells if isinstance(c, HayCompartCell) and _in_pops(c, spec)]

    store["hay_lfp"] = MembraneCurrentLFP(cells, _lfp_electrodes(spec), method=spec["method"], step_ms=1.0,
                                          n_steps=lambda: _lfp_steps(1.0), on_reset=_publisher("hay"))


# ---------------------------------------------------------------------------------------------
# Hook into NetPyNE's choice of cell class
# ---------------------------------------------------------------------------------------------

CELL_CLASSES = {"SurrogateL5PC": SurrogateCompartCell, "HayL5PC": HayCompartCell}


def install() -> None:
    """Make NetPyNE create our cell classes for ``cellModel`` 'SurrogateL5PC' / 'HayL5PC' (idempotent).

    NetPyNE has no registry of cell classes: this wraps ``netpyne.network.pop.Pop._resolveCellClass``
    so that populations of these two cell models get :class:`SurrogateCompartCell` /
    :class:`HayCompartCell` (every other population keeps NetPyNE's choice). It also loads our
    mechanisms (``SurrogateCell``, the Hay channels, ``VecStim``). :func:`surrogate_cell_params` and
    :func:`hay_cell_params` call it; importing this module does not.
    """
    from netpyne.network.pop import Pop

    from lfdeep_neuron import mechanisms

    mechanisms.load()
    if getattr(Pop._resolveCellClass, "_lfdeep", False):
        return
    original = Pop._resolveCellClass

    def _resolveCellClass(self):
        from netpyne import sim

        cls, rule = original(self)
        model = self.tags.get("cellModel")
        if model is None and self.tags.get("cellType"):
            model = sim.net.params.cellParams.get(self.tags["cellType"], {}).get("cellModel")
        return CELL_CLASSES.get(model, cls), rule

    _resolveCellClass._lfdeep = True
    Pop._resolveCellClass = _resolveCellClass


def installed() -> bool:
    """Whether :func:`install` has been applied in this process."""
    from netpyne.network.pop import Pop

    return bool(getattr(Pop._resolveCellClass, "_lfdeep", False))
