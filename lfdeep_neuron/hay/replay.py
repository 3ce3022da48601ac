"""``lfdeep-neuron replay``: simulate the detailed Hay cell on the inputs of a record file.

Reads an HDF5 record in the layout of ``shared/hay/reference/*.h5`` and writes a new record of the
same layout with our cell's response::

    lfdeep-neuron replay --morphology ../shared/hay/cell1.asc \\
        --inputs ../shared/hay/reference/synaptic_seed1.h5 --out replay.h5 [--integrator fixed --dt-ms 0.025]

Inputs, in this order of preference:

* synaptic events from ``input_effective/`` (``syn_idx``, ``t_ms``), else from ``input/`` with
  every event of a synapse that has one at t = 0 dropped (the original's silencing, BIOPHYSICS.md §6.4);
* a somatic current step from the root attributes ``step_amp_nA``, ``step_delay_ms``, ``step_dur_ms``
  (protocol ``somatic_step_current_hay2011``); the cell is then built without synapses, as the
  reference was (synapse states would change CVODE's error norm).

Defaults follow the reference: CVODE atol 1e-3, rtol 0, v_init and duration from the file's
attributes (-76 mV, ``duration_ms``), celsius 6.3.
"""
from __future__ import annotations

import argparse
import datetime

import numpy as np

from lfdeep_neuron.errors import InputError
from lfdeep_neuron.hay.simulate import CELSIUS, CVODE_ATOL, FIXED_DT_MS, INTEGRATORS, V_INIT_MV

__all__ = ["configure_parser", "run", "replay"]

STEP_PROTOCOL = "somatic_step_current_hay2011"
SYNAPTIC_PROTOCOL = "synaptic_beniaguev"

_SEGMENT_NOTES = {
    "dist_note": "path distance (um) from soma[0](0.5) to segment centre (h.distance)",
    "parent_seg_note": ("previous segment of the same section, else the segment of the parent section "
                        "containing the connection point; -1 for soma"),
    "xyz_note": ("um, from the Import3d 3-D points interpolated along arc length at x-0.5/nseg, x, "
                 "x+0.5/nseg; NaN for the 2 axon stub sections (no 3-D points)"),
}
# Attributes of the input file that describe its own simulation and must not be copied.
_RUN_ATTRS = ("integrator", "cvode_atol", "cvode_rtol", "dt_ms", "dt_note", "integrator_steps",
              "sim_wall_s", "n_soma_spikes", "soma_rate_hz", "rate_during_step_hz", "created_by",
              "neuron_version", "model", "notes", "spike_detection", "v_1ms_grid", "segment_order")


class ReplayInputError(InputError):
    """The inputs file holds no usable protocol; the message says what is missing."""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--morphology", default=None,
                   help="Hay morphology (cell1.asc); default $LFDEEP_HAY_MORPHOLOGY")
    p.add_argument("--inputs", required=True, help="HDF5 record holding the inputs (reference layout)")
    p.add_argument("--out", required=True, help="output HDF5 record (written atomically)")
    p.add_argument("--integrator", choices=INTEGRATORS, default="cvode",
                   help="cvode: variable step (default, as the references); fixed: fixed-step backward "
                        "Euler; fixed_cn: fixed-step Crank-Nicolson")
    p.add_argument("--dt-ms", type=float, default=FIXED_DT_MS, help="fixed step (ms), default 0.025")
    p.add_argument("--atol", type=float, default=CVODE_ATOL, help="CVODE absolute tolerance, default 1e-3")
    p.add_argument("--duration-ms", type=float, default=None,
                   help="simulated time (ms); default the file's duration_ms")
    p.add_argument("--v-init-mV", type=float, default=None, help="initial voltage; default the file's (-76)")
    p.add_argument("--record-imem", action="store_true",
                   help="also store imem_mean_1ms (nA) and v_mean_1ms: 1-ms bin means for LFP")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _protocol(rec) -> dict:
    """Events and/or current step found in a record, and whether synapses are needed."""
    from lfdeep_neuron.data.inputs import effective_events

    attrs = rec.attrs
    proto = {"events": None, "step": None, "dead": None}
    if "input_effective" in rec:
        ev = rec["input_effective"]
        proto["events"] = (np.asarray(ev["syn_idx"]), np.asarray(ev["t_ms"], dtype=np.float64))
        if "synapses" in rec and "dead" in rec["synapses"]:
            proto["dead"] = np.asarray(rec["synapses"]["dead"], dtype=bool)
    if "input" in rec:
        ev = rec["input"]
        syn, t, dead = effective_events(np.asarray(ev["syn_idx"]), np.asarray(ev["t_ms"], dtype=np.float64))
        if proto["events"] is None:
            proto["events"] = (syn, t)
        if proto["dead"] is None:
            proto["dead"] = dead
    step_keys = ("step_amp_nA", "step_delay_ms", "step_dur_ms")
    if any(k in attrs for k in step_keys):
        missing = [k for k in step_keys if k not in attrs]
        if missing:
            raise ReplayInputError(f"{rec.path}: current-step attributes incomplete, missing {missing}")
        proto["step"] = tuple(float(attrs[k]) for k in step_keys)
    if attrs.get("protocol") == STEP_PROTOCOL and proto["step"] is None:
        raise ReplayInputError(f"{rec.path}: protocol {STEP_PROTOCOL} but no step_amp_nA/step_delay_ms/"
                               "step_dur_ms root attributes")
    if attrs.get("protocol") == SYNAPTIC_PROTOCOL and proto["events"] is None:
        raise ReplayInputError(f"{rec.path}: protocol {SYNAPTIC_PROTOCOL} but no input_effective/ or "
                               "input/ event group")
    if proto["events"] is None and proto["step"] is None:
        raise ReplayInputError(
            f"{rec.path}: no inputs found: expected input events (group input_effective/ or input/ with "
            "syn_idx, t_ms) or a current step (root attributes step_amp_nA, step_delay_ms, step_dur_ms)")
    return proto


def replay(morphology, inputs, out, *, integrator="cvode", dt_ms=FIXED_DT_MS, atol=CVODE_ATOL,
           duration_ms=None, v_init_mV=None, record_imem=False, progress=False):
    """Simulate the cell on the inputs of record ``inputs``; write record ``out``; return the run dict."""
    import neuron

    from lfdeep_neuron.data.records import read_record, write_record
    from lfdeep_neuron.hay.cell import EXC_PARAMS, INH_PARAMS, N_CHANNELS, HayL5PC
    from lfdeep_neuron.hay.simulate import run_cell

    rec = read_record(inputs, require=())
    proto = _protocol(rec)
    attrs_in = rec.attrs
    if duration_ms is None:
        if "duration_ms" not in attrs_in:
            raise ReplayInputError(f"{inputs}: no duration_ms root attribute; pass --duration-ms")
        duration_ms = float(attrs_in["duration_ms"])
    if v_init_mV is None:
        v_init_mV = float(attrs_in.get("v_init_mV", V_INIT_MV))

    use_synapses = proto["events"] is not None
    cell = HayL5PC(morphology, synapses=use_synapses)
    if use_synapses:
        try:
            cell.set_input_events(*proto["events"])
        except ValueError as exc:
            raise ReplayInputError(f"{inputs}: bad input events: {exc}") from exc
    if proto["step"] is not None:
        cell.add_iclamp(*proto["step"])
    res = run_cell(cell, duration_ms, integrator=integrator, atol=atol, dt_ms=dt_ms,
                   v_init_mV=v_init_mV, celsius=CELSIUS, record_imem=record_imem, progress=progress)

    spikes = res["soma_spike_times_ms"]
    attrs = {k: v for k, v in attrs_in.items() if k not in _RUN_ATTRS}
    attrs.update({
        "protocol": attrs_in.get("protocol", SYNAPTIC_PROTOCOL if use_synapses else STEP_PROTOCOL),
        "duration_ms": float(duration_ms),
        "v_init_mV": float(v_init_mV),
        "celsius": CELSIUS,
        "integrator": integrator,
        "cvode_atol": res["cvode_atol"],
        "cvode_rtol": res["cvode_rtol"],
        "dt_ms": res["dt_ms"],
        "dt_note": ("CVode variable step; traces linearly interpolated from the integrator steps"
                    if integrator == "cvode" else
                    f"fixed step {dt_ms} ms ({'Crank-Nicolson' if integrator == 'fixed_cn' else 'backward Euler'}); "
                    "traces linearly interpolated from the steps"),
        "integrator_steps": int(res["integrator_steps"]),
        "sim_wall_s": float(res["wall_s"]),
        "n_soma_spikes": int(len(spikes)),
        "soma_rate_hz": float(len(spikes) / (duration_ms / 1000.0)),
        "neuron_version": neuron.__version__,
        "model": ("lfdeep_neuron.hay.HayL5PC (own NMODL in mod/, deterministic synapses) on "
                  f"{cell.morphology_path.name}; Beniaguev et al. 2021 configuration of Hay et al. 2011"),
        "created_by": f"lfdeep-neuron replay ({datetime.datetime.now().isoformat(timespec='seconds')})",
        "replayed_from": str(inputs),
        "spike_detection": "NetCon on soma[0](0.5) v, threshold 0 mV (upward crossing)",
        "v_1ms_grid": "t = 0,1,...,T-1 ms (np.arange(0,T)); v_soma_0p1ms: t = 0,0.1,...,T-0.1",
        "segment_order": "soma, dend (basal), apic, axon; sections by index; segments by increasing x",
    })
    if proto["step"] is not None:
        amp, delay, dur = proto["step"]
        n_in = int(np.sum((spikes >= delay) & (spikes < delay + dur)))
        attrs["rate_during_step_hz"] = n_in / (dur / 1000.0) if dur > 0 else 0.0

    synapses = None
    group_attrs = {"segments": _SEGMENT_NOTES,
                   "segments/mech": {"note": "per-segment parameter values after model construction "
                                             "(0 where mechanism absent)"}}
    if use_synapses:
        synapses = cell.synapse_table()
        dead = proto["dead"] if proto["dead"] is not None else np.zeros(N_CHANNELS, dtype=bool)
        synapses["dead"] = dead
        group_attrs["synapses"] = {
            "exc_params": {k: float(v) for k, v in EXC_PARAMS.items()},
            "inh_params": {k: float(v) for k, v in INH_PARAMS.items()},
            "type_codes": "0 = exc AmpaNmdaSyn (AMPA+NMDA), 1 = inh GabaASyn (GABA_A)",
            "seg_idx_note": "index into canonical segment order (/segments)",
        }
    traces = {k: res[k] for k in ("t_0p1ms", "t_1ms", "v_1ms", "v_soma_0p1ms", "soma_spike_times_ms")}
    if record_imem:
        traces["imem_mean_1ms"] = res["imem_mean_1ms"]
        traces["v_mean_1ms"] = res["v_mean_1ms"]
    write_record(out, segments=cell.segment_table(), sections=cell.section_table(), synapses=synapses,
                 traces=traces, attrs=attrs, inputs=rec.get("input"),
                 inputs_effective=rec.get("input_effective") or (
                     {"syn_idx": proto["events"][0], "t_ms": proto["events"][1]} if use_synapses else None),
                 group_attrs=group_attrs)
    return res


def run(args) -> int:
    """``lfdeep-neuron replay``; bad input (MorphologyError, RecordFormatError, ReplayInputError: all
    :class:`~lfdeep_neuron.errors.InputError`) is reported by the command line as one line, exit 2."""
    res = replay(args.morphology, args.inputs, args.out, integrator=args.integrator, dt_ms=args.dt_ms,
                 atol=args.atol, duration_ms=args.duration_ms, v_init_mV=args.v_init_mV,
                 record_imem=args.record_imem, progress=not args.no_progress)
    spikes = res["soma_spike_times_ms"]
    print(f"wrote {args.out}: {res['duration_ms']:.0f} ms, {len(spikes)} somatic spikes, "
          f"{res['integrator_steps']} {args.integrator} steps, {res['wall_s']:.1f} s wall")
    return 0
