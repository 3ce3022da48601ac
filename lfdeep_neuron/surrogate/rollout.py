"""Closed-loop surrogate run on an inputs file: ``lfdeep-neuron rollout``.

    lfdeep-neuron rollout --model models/mmoe.pt --inputs shared/hay/reference/synaptic_seed1.h5 --out sur.h5

Reads the input events of a record in the reference layout (``shared/hay/reference/*.h5``, or an
inputs-only file with the same groups), runs the surrogate autoregressively with
:func:`lfdeep_neuron.surrogate.stream.closed_loop`, and writes a record of the *same* layout
(:func:`lfdeep_neuron.data.records.write_record`), so the code that scores NEURON's records scores the
surrogate's as well (``read_record`` accepts it).

Time and binning (docs/ARCHITECTURE.md)
---------------------------------------
* Events: ``input_effective`` when present, else ``input`` without the events of synapses marked
  ``synapses/dead`` (``--events`` chooses). An optional ``weight`` column is honoured.
* Binning: :func:`lfdeep_neuron.data.dataset.bin_events` (the dataset reader's): an event at t lands in
  step ``ceil(t)``; step k consumes (k-1, k] ms.
* ``v_1ms[:, 0]`` is the initial state (t = 0): ``model.v_rest`` (the mean state at t = 0 of the training
  simulations), or the inputs file's own ``v_1ms[:, 0]`` with ``--v0 record``. Steps k = 1 .. T-1 give
  ``v_1ms[:, k]``, the predicted voltages *at* k ms. Events at t <= 0 ms (step 0) are not fed: step 0 is
  the initial state, as in training (targets start at step 1).
* Spikes: step k where the spike logit crosses the threshold upwards (``--spike-threshold``; default the checkpoint's
  calibrated ``metrics['spike_threshold_logit']`` from ``lfdeep-neuron evaluate --update-checkpoint``, else
  0 = probability ½) is a somatic spike at ``k - 0.5`` ms (:data:`~.metrics.SPIKE_OFFSET_MS`, the middle of
  its window; ``ceil`` of it gives back k).
* Action potentials: when the checkpoint carries a spike waveform (``lfdeep-neuron waveform``;
  :mod:`~lfdeep_neuron.surrogate.waveform`), it is added to ``v_1ms`` at the predicted spikes (column j of the
  kernel at step k + j for the spike of step k, a new spike restarting it), as the co-simulation engine
  does; ``--no-waveform`` leaves the model's raw voltages.

Written: the segment / section / synapse tables (segments and synapses from the inputs file when it has
them, else from the checkpoint; they must name the same segments as the checkpoint), ``input`` and
``input_effective`` copied, ``v_1ms`` float32 [S, T] (mV), ``t_1ms``, ``spike_logit_1ms`` float32 [T]
(NaN at step 0), ``soma_spike_times_ms``; no ``v_soma_0p1ms`` (the surrogate has no 0.1-ms trace). Root
attributes: the input's ``protocol``, ``seed``, ``duration_ms``, ``v_init_mV``, ``celsius`` (+ step
protocol attributes) and ``simulator = "lfdeep-neuron surrogate"``, ``model_arch``, ``model_config``,
``checkpoint``, ``checkpoint_sha256``, ``spike_threshold_logit``, ``spike_time_offset_ms``, ``events_used``,
``v0``, ``spike_waveform`` (what was added: "none" or its summary), ``complete = 1``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lfdeep_neuron.data.dataset import bin_events
from lfdeep_neuron.data.records import RecordFormatError, read_record, write_record
from lfdeep_neuron.errors import InputError
from lfdeep_neuron.surrogate.metrics import SPIKE_OFFSET_MS, default_spike_threshold

#: the same default as the engine's (kept under its old name)
default_threshold = default_spike_threshold

__all__ = ["configure_parser", "run", "load_inputs", "rollout", "rollout_file", "default_threshold"]

_COPY_ATTRS = ("protocol", "seed", "duration_ms", "v_init_mV", "celsius", "step_amp_nA", "step_delay_ms",
               "step_dur_ms")


def configure_parser(p: argparse.ArgumentParser) -> None:
    from lfdeep_neuron.surrogate.checkpoint import checkpoint_argument

    p.add_argument("--model", required=True, type=checkpoint_argument, metavar="CKPT",
                   help="surrogate checkpoint (.pt, or a pointer file such as models/DEFAULT)")
    p.add_argument("--inputs", required=True, help="record / inputs file in the reference layout (.h5)")
    p.add_argument("--out", required=True, help="output record (.h5)")
    p.add_argument("--events", choices=("auto", "input_effective", "input"), default="auto",
                   help="event list: auto = input_effective if present, else input minus dead synapses")
    p.add_argument("--duration-ms", type=int, default=None,
                   help="simulated time (ms); default the inputs file's duration_ms attribute (or v_1ms length)")
    p.add_argument("--v0", choices=("rest", "record"), default="rest",
                   help="initial state: the model's v_rest, or the inputs file's v_1ms[:, 0]")
    p.add_argument("--spike-threshold", type=float, default=None,
                   help="spike logit threshold (default: the checkpoint's calibrated one, else 0)")
    p.add_argument("--no-waveform", action="store_true",
                   help="do not add the checkpoint's spike waveform (APs) to the voltages at predicted spikes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.threads))
    model = load_surrogate(args.model, map_location=args.device)
    out = rollout_file(model, args.inputs, args.out, events=args.events, duration_ms=args.duration_ms,
                       v0=args.v0, spike_threshold=args.spike_threshold, device=args.device,
                       progress=not args.no_progress, spike_waveform=not args.no_waveform)
    rec = read_record(out)
    print(f"wrote {out}: {rec.n_segments} segments x {rec.n_steps} ms, "
          f"{rec['soma_spike_times_ms'].size} somatic spikes (threshold {rec.attrs['spike_threshold_logit']:.3g})")
    return 0


def load_inputs(path, events: str = "auto", duration_ms: int | None = None, n_channels: int | None = None):
    """Read an inputs file: ``(record, syn_idx, t_ms, weights or None, T, events_used)``.

    Raises :class:`RecordFormatError` when it holds no usable events or no duration.
    """
    rec = read_record(path, require=())
    if events == "auto":
        events = "input_effective" if "input_effective" in rec else "input"
    if events not in rec:
        have = [g for g in ("input", "input_effective") if g in rec]
        raise RecordFormatError(f"{path}: no /{events} event group (has {have or 'no event groups'})")
    ev = rec[events]
    syn = np.asarray(ev["syn_idx"], dtype=np.int64)
    t = np.asarray(ev["t_ms"], dtype=np.float64)
    w = np.asarray(ev["weight"], dtype=np.float64) if "weight" in ev else None
    used = events
    if events == "input" and "synapses" in rec and "dead" in rec["synapses"]:
        dead = np.asarray(rec["synapses"]["dead"], dtype=bool)
        keep = ~dead[syn]
        syn, t = syn[keep], t[keep]
        w = None if w is None else w[keep]
        used = "input minus dead synapses"
    if n_channels is not None and syn.size and (syn.min() < 0 or syn.max() >= n_channels):
        raise RecordFormatError(f"{path}: /{events}/syn_idx spans [{syn.min()}, {syn.max()}], outside the "
                                f"model's {n_channels} channels")
    if duration_ms is None:
        if "duration_ms" in rec.attrs:
            duration_ms = float(rec.attrs["duration_ms"])
        elif "v_1ms" in rec:
            duration_ms = rec["v_1ms"].shape[1]
        else:
            raise RecordFormatError(f"{path}: no duration_ms attribute and no v_1ms; pass --duration-ms")
    T = int(round(float(duration_ms)))
    if not np.isfinite(float(duration_ms)) or T < 2:
        raise InputError(f"{path}: duration must be at least 2 ms, got {duration_ms}")
    return rec, syn, t, w, T, used


@torch.no_grad()
def rollout(model, x_syn: np.ndarray, v0_mV=None, spike_threshold: float | None = None, device=None,
            progress: bool = False, spike_waveform=True) -> dict:
    """Closed-loop run of one cell on binned inputs.

    Parameters
    ----------
    model : Surrogate
    x_syn : ndarray [C, T]
        Binned channels; column k = inputs of (k-1, k] ms (column 0 is not used).
    v0_mV : array [S], optional
        State at t = 0 (default ``model.v_rest``).
    spike_waveform : SpikeWaveform or bool
        Added to the voltages at the predicted spikes (:mod:`~lfdeep_neuron.surrogate.waveform`). True
        (default): the checkpoint's (``model.meta['spike_waveform']``), if any; False or None: none.

    Returns
    -------
    dict ``v_1ms`` float32 [S, T] (column 0 = v0), ``spike_logit_1ms`` float32 [T] (NaN at 0),
    ``soma_spike_times_ms`` float64, ``threshold``, ``spike_waveform`` (the one added, or None) and
    ``imem_mean_1ms`` float32 [S, T] (nA; column k = mean over (k-1, k] ms, column 0 = 0) for models with
    membrane-current tasks, else None; the waveform's current kernel is added to it too.
    """
    from lfdeep_neuron.surrogate.waveform import SpikeWaveform, model_waveform
    from lfdeep_neuron.surrogate.stream import closed_loop

    C, T = x_syn.shape
    if C != model.n_channels:
        raise InputError(f"inputs have {C} channels; the model expects {model.n_channels}")
    v0 = model.v_rest.detach().cpu() if v0_mV is None else torch.as_tensor(np.asarray(v0_mV), dtype=torch.float32)
    x = torch.as_tensor(x_syn[None, :, 1:], dtype=torch.float32)
    thr = default_spike_threshold(model) if spike_threshold is None else float(spike_threshold)
    pred = closed_loop(model, x, v0_mV=v0[None], output="mV", device=device, progress=progress,
                       spike_threshold=thr)
    v = np.empty((model.n_segments, T), dtype=np.float32)
    v[:, 0] = v0.numpy()
    v[:, 1:] = pred.v[0].float().cpu().numpy()
    bad = ~np.isfinite(v).all(axis=0)
    if bad.any():
        raise FloatingPointError(f"the surrogate's closed-loop voltages are not finite from step {int(np.argmax(bad))} "
                                 f"on ({int(bad.sum())} of {T} steps): the model diverged on these inputs")
    imem = None
    if pred.imem is not None:
        imem = np.zeros((model.n_segments, T), dtype=np.float32)
        imem[:, 1:] = pred.imem[0].float().cpu().numpy()
    logit = np.full(T, np.nan, dtype=np.float32)
    logit[1:] = pred.spike_logit[0].float().cpu().numpy()
    spiked = np.zeros((1, T), dtype=bool)                              # step k of each spike (none at 0)
    spiked[0, 1:] = pred.spiked[0].cpu().numpy()                       # the streamer's decisions
    spikes = np.flatnonzero(spiked[0]) - SPIKE_OFFSET_MS
    wf = model_waveform(model) if spike_waveform is True else (spike_waveform or None)
    if wf is not None:
        if not isinstance(wf, SpikeWaveform) or wf.n_segments != model.n_segments:
            raise InputError(f"spike_waveform must be a SpikeWaveform of the model's {model.n_segments} segments")
        v_new, i_new = wf.apply(v[None], spiked, None if imem is None else imem[None])
        v = v_new[0].astype(np.float32)
        imem = None if imem is None else i_new[0].astype(np.float32)
    return {"v_1ms": v, "spike_logit_1ms": logit, "soma_spike_times_ms": spikes, "threshold": thr,
            "spike_waveform": wf, "imem_mean_1ms": imem}


def _names(table) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(table["name"]).tolist()]


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rollout_file(model, inputs, out, events: str = "auto", duration_ms: int | None = None, v0: str = "rest",
                 spike_threshold: float | None = None, device=None, progress: bool = False,
                 spike_waveform=True) -> Path:
    """Read ``inputs``, run :func:`rollout`, write the record ``out``; return its path."""
    rec, syn, t, w, T, used = load_inputs(inputs, events, duration_ms, model.n_channels)
    meta = getattr(model, "meta", None) or {}
    segments = rec.get("segments") or meta.get("segments")
    synapses = rec.get("synapses") or meta.get("synapses")
    if segments is None:
        raise RecordFormatError(f"{inputs}: no /segments table and the model carries none")
    if len(_names(segments)) != model.n_segments:
        raise RecordFormatError(f"{inputs}: {len(_names(segments))} segments; the model predicts {model.n_segments}")
    if meta.get("segments") is not None and _names(meta["segments"]) != _names(segments):
        raise RecordFormatError(f"{inputs}: its segment table names other segments (or another order) than "
                                f"the checkpoint's")
    if v0 == "record":
        if "v_1ms" not in rec:
            raise RecordFormatError(f"{inputs}: --v0 record needs v_1ms in the inputs file")
        v0_mV = np.asarray(rec["v_1ms"][:, 0], dtype=np.float32)
    elif v0 == "rest":
        v0_mV = None
    else:
        raise InputError(f"v0 must be 'rest' or 'record', got {v0!r}")
    x = bin_events(syn, t, model.n_channels, 0, T, w)
    res = rollout(model, x, v0_mV, spike_threshold, device, progress, spike_waveform=spike_waveform)

    attrs = {k: rec.attrs[k] for k in _COPY_ATTRS if k in rec.attrs}
    attrs.setdefault("protocol", "unknown")
    ckpt = meta.get("path")
    attrs.update({
        "duration_ms": float(T), "simulator": "lfdeep-neuron surrogate",
        "model_arch": str(getattr(model, "arch", "")),
        "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "checkpoint": str(ckpt) if ckpt else "(in memory)",
        "checkpoint_sha256": _sha256(ckpt) if ckpt and Path(ckpt).is_file() else "",
        "spike_threshold_logit": float(res["threshold"]), "spike_time_offset_ms": SPIKE_OFFSET_MS,
        "spike_rule": "upward crossing of the threshold by spike_logit at step k -> spike at k - spike_time_offset_ms",
        "events_used": used, "inputs_file": str(inputs),
        "v0": "model v_rest" if v0_mV is None else "inputs file v_1ms[:, 0]",
        "v_1ms_grid": "t = 0,1,...,T-1 ms; column 0 = initial state, column k = prediction of step k",
        "dt_ms": float(meta.get("dt_ms", 1.0)),
        "spike_waveform": "none" if res["spike_waveform"] is None else res["spike_waveform"].summary(),
        "complete": np.int8(1),
    })
    traces = {"v_1ms": res["v_1ms"], "t_1ms": np.arange(T, dtype=np.float64),
              "spike_logit_1ms": res["spike_logit_1ms"],
              "soma_spike_times_ms": np.asarray(res["soma_spike_times_ms"], dtype=np.float64)}
    return write_record(out, segments=segments, sections=rec.get("sections"), synapses=synapses, traces=traces,
                        attrs=attrs, inputs=rec.get("input"), inputs_effective=rec.get("input_effective"))
