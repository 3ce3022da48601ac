"""Ground-truth generation: ``lfdeep-neuron generate`` — many Hay-cell simulations, parallel and resumable.

Each simulation ``i`` of a dataset with seed ``S``:

1. draws its inputs with the published generator (:func:`~lfdeep_neuron.data.inputs.beniaguev_inputs`),
   or a named variant of it (``--generator``, :data:`~lfdeep_neuron.data.inputs.GENERATORS`), from its own
   seed ``sim_seed(S, i)`` (a ``numpy.random.RandomState``; stored as the record's ``seed`` attribute, so
   ``beniaguev_inputs(seed)`` redraws the same events);
2. drops the events of dead synapses (BIOPHYSICS.md §6.4) and runs the detailed cell on the rest;
3. writes ``DIR/sim_<i:06d>.h5`` (the layout of :mod:`~lfdeep_neuron.data.records` plus
   ``imem_mean_1ms`` [S, T], the 1-ms bin-mean membrane currents in nA) through a temporary file that is
   renamed when whole; the root attribute ``complete`` is written last.

The default solve is the fast path measured in ``benchmarks/generation.py``: Crank-Nicolson at dt = 0.05 ms
on CoreNEURON (same trajectories as NEURON), recording v alone; the bin-mean currents are ``-L v_mean``
(exact, :mod:`lfdeep_neuron.hay.simulate`). ``--integrator cvode --engine neuron`` is the published
integrator (CVODE, atol 1e-3). Storage ``compact`` (default) keeps ``v_1ms`` as float16 (0.015 mV RMS
rounding) and ``imem_mean_1ms`` as float16 rounded to 6 mantissa bits (0.35 % RMS relative rounding):
~1.5 MB per simulated second; ``float32`` keeps both exact (~4 MB/s).

Parallelism: ``--workers K`` worker processes (``spawn``: NEURON is not fork-safe once initialised), or
``mpiexec -n K lfdeep-neuron generate ...`` where rank ``r`` simulates ``r, r+K, r+2K, ...``.
Resume: a rerun skips every record that is complete and matches the arguments; temporary files of an
interrupted run are removed and those simulations redone. The same arguments give bit-identical
records and ``meta.json`` whatever the number of workers or ranks (wall-clock times go to
``timing.jsonl`` only).

``DIR/meta.json`` describes the dataset: generation settings, per-record seeds/splits/spikes/bytes, and
totals (simulated seconds, spikes, bytes, bytes per simulated second). It is written at the start (the
settings a resume must match) and rewritten at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

__all__ = [
    "GenerationConfig",
    "generate",
    "dataset_status",
    "dataset_digest",
    "sim_seed",
    "split_key",
    "assign_splits",
    "record_path",
    "read_meta",
    "list_records",
    "record_is_complete",
    "Simulator",
    "configure_parser",
    "run",
]

META_NAME = "meta.json"
TIMING_LOG = "timing.jsonl"
RECORD_GLOB = "sim_*.h5"
_RECORD_RE = re.compile(r"^sim_(\d+)\.h5$")
_TMP_RE = re.compile(r"^\.sim_(\d+)\.h5\..*\.tmp$")
FORMAT_VERSION = 2
STORAGES = ("compact", "float32")
#: Where the bin-mean currents come from: -L v_mean (exact, cheap) or NEURON's recorded i_membrane_
#: (the previous generator's way, ~30 % more per simulation; kept to measure against).
IMEM_SOURCES = ("laplacian", "recorded")
#: Mantissa bits kept by the compact storage of ``imem_mean_1ms`` (float16 has 10).
COMPACT_IMEM_MANTISSA_BITS = 6
DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
# Datasets every generated record must hold (checked when resuming).
REQUIRED_DATASETS = ("segments", "synapses", "input", "input_effective", "v_1ms", "t_1ms",
                     "imem_mean_1ms", "soma_spike_times_ms")


# --------------------------------------------------------------------------------------------------
# dataset directory conventions (also used by dataset.py)
# --------------------------------------------------------------------------------------------------

def sim_seed(dataset_seed: int, index: int) -> int:
    """Seed of simulation ``index`` in a dataset seeded ``dataset_seed`` (an int < 2**32)."""
    ss = np.random.SeedSequence(entropy=int(dataset_seed), spawn_key=(int(index),))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def split_key(dataset_seed: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by (dataset seed, index): decides the split of a simulation."""
    ss = np.random.SeedSequence(entropy=int(dataset_seed), spawn_key=(int(index), 0x5EED))
    return float(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(11)) / float(1 << 53)


def assign_splits(indices, dataset_seed: int = 0, fractions: dict | None = None) -> dict[str, list[int]]:
    """Split simulations (never time) into train / val / test.

    Simulation ``i`` goes to ``val`` if ``split_key(seed, i) < f_val``, to ``test`` if below
    ``f_val + f_test``, else to ``train``: each simulation's split depends on its own index only, so
    growing a dataset never moves an existing simulation. For tiny datasets (≥ 3 simulations) where a
    split comes out empty, the train simulation with the smallest key moves to val and the one with
    the largest key to test.
    """
    fr = dict(DEFAULT_SPLIT_FRACTIONS if fractions is None else fractions)
    if set(fr) != {"train", "val", "test"} or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-9:
        raise ValueError(f"split fractions must be train/val/test >= 0 summing to 1, got {fr}")
    keys = {int(i): split_key(dataset_seed, int(i)) for i in indices}
    out = {"train": [], "val": [], "test": []}
    for i, u in sorted(keys.items()):
        out["val" if u < fr["val"] else "test" if u < fr["val"] + fr["test"] else "train"].append(i)
    if len(keys) >= 3:
        for name, pick in (("val", min), ("test", max)):
            if not out[name] and fr[name] > 0 and len(out["train"]) > 1:
                moved = pick(out["train"], key=lambda i: keys[i])
                out["train"].remove(moved)
                out[name].append(moved)
    return {k: sorted(v) for k, v in out.items()}


def record_path(out_dir, index: int) -> Path:
    return Path(out_dir) / f"sim_{int(index):06d}.h5"


def list_records(out_dir) -> dict[int, Path]:
    """``{index: path}`` of the record files (``sim_<index>.h5``) in a directory."""
    out = {}
    for p in Path(out_dir).glob(RECORD_GLOB):
        m = _RECORD_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def read_meta(out_dir) -> dict | None:
    """The dataset's ``meta.json`` as a dict, or None when absent."""
    p = Path(out_dir) / META_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class GenerationConfig:
    """Everything that determines the records (and must match when resuming)."""

    morphology: str
    out_dir: str
    n_sims: int
    duration_ms: int = 6000
    seed: int = 0
    integrator: str = "fixed_cn"
    dt_ms: float = 0.05
    engine: str = "coreneuron"
    generator: str = "published"
    v_init_mV: float = -76.0
    storage: str = "compact"
    imem_source: str = "laplacian"
    compression: str | None = "gzip"
    split_fractions: dict = field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))
    morphology_sha256: str = ""

    def __post_init__(self):
        from lfdeep_neuron.data.inputs import GENERATORS
        from lfdeep_neuron.errors import InputError
        from lfdeep_neuron.hay.simulate import ENGINES, INTEGRATORS

        if int(self.n_sims) != self.n_sims or self.n_sims < 1:
            raise InputError(f"n_sims must be a whole number >= 1, got {self.n_sims}")
        if int(self.duration_ms) != self.duration_ms or self.duration_ms < 2:
            raise InputError(f"duration_ms must be a whole number of ms >= 2, got {self.duration_ms}")
        self.duration_ms = int(self.duration_ms)
        if self.integrator not in INTEGRATORS:
            raise InputError(f"integrator must be one of {INTEGRATORS}, got {self.integrator!r}")
        if self.integrator != "cvode" and not (0 < self.dt_ms <= 1 and float(1.0 / self.dt_ms).is_integer()):
            raise InputError(f"dt_ms must divide 1 ms (e.g. 0.025, 0.05), got {self.dt_ms}")
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "coreneuron" and self.integrator == "cvode":
            raise InputError("engine 'coreneuron' needs a fixed-step integrator (fixed or fixed_cn), not cvode")
        if self.generator not in GENERATORS:
            raise InputError(f"generator must be one of {sorted(GENERATORS)}, got {self.generator!r}")
        if self.storage not in STORAGES:
            raise InputError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.imem_source not in IMEM_SOURCES:
            raise InputError(f"imem_source must be one of {IMEM_SOURCES}, got {self.imem_source!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")
        try:
            assign_splits([], 0, self.split_fractions)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not self.morphology_sha256:
            p = Path(self.morphology)
            if not p.is_file():
                raise InputError(f"{p}: morphology file not found")
            self.morphology_sha256 = file_sha256(p)

    def identity(self) -> dict:
        """Settings that a resumed run must share with the records already there."""
        d = asdict(self)
        for k in ("morphology", "out_dir", "n_sims"):
            d.pop(k)
        d["morphology_name"] = Path(self.morphology).name
        return d


# --------------------------------------------------------------------------------------------------
# one process: build the cell once, simulate many
# --------------------------------------------------------------------------------------------------

class Simulator:
    """Builds one Hay cell in this process and simulates dataset entries on it."""

    def __init__(self, cfg: GenerationConfig):
        from lfdeep_neuron import mechanisms
        from lfdeep_neuron.hay import HayL5PC
        from lfdeep_neuron.hay.morphology import check_morphology

        from lfdeep_neuron.lfp import AxialLaplacian

        # read the morphology first: a bad file is one quick error, not one after minutes of compiling
        check_morphology(cfg.morphology)
        mechanisms.load(coreneuron=cfg.engine == "coreneuron")
        self.cfg = cfg
        self.cell = HayL5PC(cfg.morphology)
        # bin-mean membrane currents = -L v_mean (exact for every integrator; recording i_membrane_
        # itself would cost ~30 % more)
        self.laplacian = AxialLaplacian.from_cell(self.cell).matrix
        self.segments = _as_table(self.cell.segment_table())
        self.sections = _as_table(self.cell.section_table())
        self.synapses = _as_table(self.cell.synapse_table())

    def simulate(self, index: int) -> tuple[dict, dict]:
        """Run simulation ``index``; return (``write_record`` kwargs, timing info)."""
        import neuron

        from lfdeep_neuron.data.inputs import draw_inputs
        from lfdeep_neuron.data.records import to_float16
        from lfdeep_neuron.hay.simulate import run_cell

        cfg = self.cfg
        seed = sim_seed(cfg.seed, index)
        drawn = draw_inputs(cfg.generator, seed, self.segments, self.synapses, cfg.duration_ms)
        syn, t_ms, dead = drawn.syn_idx, drawn.t_ms, drawn.dead
        eff_syn, eff_t = drawn.effective_syn_idx, drawn.effective_t_ms
        self.cell.set_input_events(eff_syn, eff_t)
        out = run_cell(self.cell, float(cfg.duration_ms), integrator=cfg.integrator, dt_ms=cfg.dt_ms,
                       v_init_mV=cfg.v_init_mV, bin_means=True, engine=cfg.engine,
                       record_imem=cfg.imem_source == "recorded")
        v = np.asarray(out["v_1ms"], dtype=np.float32)
        err16 = v.astype(np.float16).astype(np.float64) - v
        spikes = np.asarray(out["soma_spike_times_ms"], dtype=np.float64)
        if cfg.imem_source == "recorded":
            imem = np.asarray(out["imem_mean_1ms"], dtype=np.float64)
        else:
            imem = -(self.laplacian @ np.asarray(out["v_mean_1ms"], dtype=np.float64))
        if cfg.storage == "compact":
            v_store, imem_store = v.astype(np.float16), to_float16(imem, COMPACT_IMEM_MANTISSA_BITS)
            storage_note = (f"v_1ms float16 (round to nearest); imem_mean_1ms float16 rounded to "
                            f"{COMPACT_IMEM_MANTISSA_BITS} mantissa bits (relative error <= "
                            f"2^-{COMPACT_IMEM_MANTISSA_BITS + 1} + 2^-11)")
        else:
            v_store, imem_store = v, imem.astype(np.float32)
            storage_note = "v_1ms and imem_mean_1ms float32"

        attrs = {
            "protocol": "synaptic_beniaguev",
            "duration_ms": float(cfg.duration_ms),
            "v_init_mV": float(out["v_init_mV"]),
            "celsius": float(out["celsius"]),
            "integrator": cfg.integrator,
            "engine": cfg.engine,
            "generator": cfg.generator,
            "storage": cfg.storage,
            "storage_note": storage_note,
            "cvode_atol": float(out["cvode_atol"]),
            "cvode_rtol": float(out["cvode_rtol"]),
            "dt_ms": float(out["dt_ms"]),
            "integrator_steps": np.int64(out["integrator_steps"]),
            "neuron_version": neuron.__version__,
            "seed": np.int64(seed),
            "dataset_seed": np.int64(cfg.seed),
            "sim_index": np.int64(index),
            "n_soma_spikes": np.int64(spikes.size),
            "n_input_events": np.int64(syn.size),
            "n_input_effective_events": np.int64(eff_syn.size),
            "morphology_name": Path(cfg.morphology).name,
            "morphology_sha256": cfg.morphology_sha256,
            "v_1ms_float16_rmse_mV": float(np.sqrt(np.mean(err16**2))),
            "v_1ms_float16_max_abs_err_mV": float(np.abs(err16).max()),
            "segment_order": "soma, dend (basal), apic, axon; sections by index; segments by increasing x",
            "spike_detection": "upward crossing of 0 mV at soma[0](0.5) (NetCon threshold)",
            "v_1ms_grid": "t = 0,1,...,T-1 ms (point samples); v_soma_0p1ms: t = 0,0.1,...,T-0.1 ms",
            "imem_mean_1ms_note": ("nA; mean of i_membrane_ of each segment over the bin (k-1, k] ms, computed "
                                   "exactly as -L v_mean (L: axial Laplacian, v_mean: the integrator's bin "
                                   "mean of v); column 0 holds the value at t = 0"),
            "inputs_note": ("input = generated events (channel, ms); input_effective = input without the events of "
                            "synapses/dead (an event at t = 0 silences a synapse in the original, BIOPHYSICS 6.4); "
                            "the cell was driven by input_effective"),
            **drawn.attrs,
        }
        attrs["complete"] = np.int8(1)  # the root attributes are written after every dataset
        traces = {
            "t_1ms": np.asarray(out["t_1ms"], dtype=np.float64),
            "v_1ms": v_store,
            "imem_mean_1ms": imem_store,
            "soma_spike_times_ms": spikes,
            "t_0p1ms": np.asarray(out["t_0p1ms"], dtype=np.float64),
            "v_soma_0p1ms": np.asarray(out["v_soma_0p1ms"], dtype=np.float32),
        }
        kwargs = dict(segments=self.segments, sections=self.sections, synapses={**self.synapses, "dead": dead},
                      traces=traces, attrs=attrs, inputs=(syn, t_ms), inputs_effective=(eff_syn, eff_t),
                      compression=cfg.compression)
        timing = {"index": int(index), "solve_wall_s": float(out["wall_s"]),
                  "integrator_steps": int(out["integrator_steps"]), "n_soma_spikes": int(spikes.size)}
        return kwargs, timing

    def run_idle(self) -> None:
        """Simulate the cell without inputs for one duration and keep nothing (MPI lockstep padding)."""
        from lfdeep_neuron.hay.simulate import run_cell

        self.cell.clear_input_events()
        run_cell(self.cell, float(self.cfg.duration_ms), integrator=self.cfg.integrator, dt_ms=self.cfg.dt_ms,
                 v_init_mV=self.cfg.v_init_mV, engine=self.cfg.engine)

    def run_and_write(self, index: int) -> dict:
        from lfdeep_neuron.data.records import write_record

        t0, c0 = time.perf_counter(), time.process_time()
        kwargs, timing = self.simulate(index)
        path = write_record(record_path(self.cfg.out_dir, index), **kwargs)
        timing.update(total_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, pid=os.getpid(),
                      bytes=path.stat().st_size)
        return timing


def _as_table(table) -> dict:
    return {k: np.asarray(v) for k, v in dict(table).items()}


# --------------------------------------------------------------------------------------------------
# completeness and the directory summary
# --------------------------------------------------------------------------------------------------

def record_is_complete(path, cfg: GenerationConfig, index: int) -> bool:
    """True if ``path`` is a whole record of simulation ``index`` made with these settings."""
    import h5py

    from lfdeep_neuron.data.records import RecordFormatError, validate_record

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if int(a.get("complete", 0)) != 1:
                return False
            expect = {"sim_index": index, "seed": sim_seed(cfg.seed, index), "dataset_seed": cfg.seed,
                      "duration_ms": float(cfg.duration_ms), "integrator": cfg.integrator,
                      "engine": cfg.engine, "generator": cfg.generator,
                      "morphology_sha256": cfg.morphology_sha256, "storage": cfg.storage}
            for k, v in expect.items():
                got = a.get(k)
                if isinstance(got, bytes):
                    got = got.decode()
                if got is None or (got != v if isinstance(v, str) else float(got) != float(v)):
                    return False
            validate_record(f, REQUIRED_DATASETS)
            return f["v_1ms"].shape[1] == cfg.duration_ms
    except (OSError, RecordFormatError, KeyError, ValueError):
        return False


def _clean_temporaries(out_dir: Path, indices=None) -> int:
    n = 0
    for p in out_dir.iterdir():
        m = _TMP_RE.match(p.name)
        if m and (indices is None or int(m.group(1)) in indices):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def _summarise(cfg: GenerationConfig) -> dict:
    """meta.json content from the settings and the complete records in the directory."""
    import h5py

    out_dir = Path(cfg.out_dir)
    records = []
    for index, path in list_records(out_dir).items():
        if not record_is_complete(path, cfg, index):
            continue
        with h5py.File(path, "r") as f:
            a = f.attrs
            records.append({
                "index": index, "file": path.name, "seed": int(a["seed"]), "bytes": path.stat().st_size,
                "n_soma_spikes": int(a["n_soma_spikes"]), "duration_ms": float(a["duration_ms"]),
                "n_input_events": int(a["n_input_events"]),
                "n_input_effective_events": int(a["n_input_effective_events"]),
                "integrator_steps": int(a["integrator_steps"]),
                "v_1ms_float16_rmse_mV": float(a["v_1ms_float16_rmse_mV"]),
                "v_1ms_float16_max_abs_err_mV": float(a["v_1ms_float16_max_abs_err_mV"]),
            })
    splits = assign_splits([r["index"] for r in records], cfg.seed, cfg.split_fractions)
    where = {i: name for name, idx in splits.items() for i in idx}
    for r in records:
        r["split"] = where[r["index"]]
    sim_s = sum(r["duration_ms"] for r in records) / 1000.0
    nbytes = sum(r["bytes"] for r in records)
    n_spk = sum(r["n_soma_spikes"] for r in records)
    f16_sq = sum(r["v_1ms_float16_rmse_mV"] ** 2 * r["duration_ms"] for r in records)
    totals = {
        "n_records": len(records),
        "simulated_s": sim_s,
        "soma_spikes": n_spk,
        "soma_rate_hz": n_spk / sim_s if sim_s else 0.0,
        "bytes": nbytes,
        "bytes_per_simulated_s": nbytes / sim_s if sim_s else 0.0,
        "input_events": sum(r["n_input_events"] for r in records),
        "split_counts": {k: len(v) for k, v in splits.items()},
        "split_simulated_s": {k: sum(r["duration_ms"] for r in records if r["split"] == k) / 1000.0
                              for k in splits},
    }
    return {
        "format": "lfdeep-neuron simulation dataset",
        "format_version": FORMAT_VERSION,
        "generation": cfg.identity(),
        "protocol": "synaptic_beniaguev",
        "n_channels": 1278,
        "record_pattern": "sim_{index:06d}.h5",
        "voltage_storage": {
            "storage": cfg.storage,
            "float16_rmse_mV": float(np.sqrt(f16_sq / (sim_s * 1000.0))) if sim_s else None,
            "float16_max_abs_err_mV": max((r["v_1ms_float16_max_abs_err_mV"] for r in records), default=None),
            "note": ("the float16_* figures are the error float16 storage of v_1ms gives (measured on these "
                     "records; half-ulp 0.031 mV for 64 <= |v| < 128 mV); 'compact' stores it"),
        },
        "splits": splits,
        "records": records,
        "totals": totals,
    }


def _check_or_start_meta(cfg: GenerationConfig) -> None:
    from lfdeep_neuron.errors import InputError

    out_dir = Path(cfg.out_dir)
    meta = read_meta(out_dir)
    if meta is not None:
        if meta.get("format") != "lfdeep-neuron simulation dataset":
            raise InputError(f"{out_dir / META_NAME}: not an lfdeep-neuron dataset description")
        old = meta.get("generation", {})
        new = cfg.identity()
        # a setting added after the dataset was started counts as its default there
        defaults = {f.name: f.default for f in fields(GenerationConfig) if f.default is not MISSING}
        diff = {k: (old.get(k, defaults.get(k)), new[k]) for k in new if old.get(k, defaults.get(k)) != new[k]}
        if diff:
            lines = ", ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
            raise InputError(f"{out_dir} already holds a dataset generated with other settings ({lines}); "
                             "use another --out directory or the same settings to resume")
        return
    _write_json_atomic(out_dir / META_NAME, {"format": "lfdeep-neuron simulation dataset",
                                              "format_version": FORMAT_VERSION, "generation": cfg.identity(),
                                              "status": "in progress", "records": []})


def _log_timing(out_dir: Path, entries) -> None:
    with open(out_dir / TIMING_LOG, "a") as fh:
        for e in entries:
            fh.write(json.dumps(e, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# drivers: worker processes, MPI ranks
# --------------------------------------------------------------------------------------------------

_WORKER_SIM: Simulator | None = None


class SimulationFailed(RuntimeError):
    """A simulation failed in a worker process or MPI rank; the message names it and the cause."""


def _worker_setup() -> None:
    """Pool initializer: nothing that can fail (a failing initializer is respawned forever)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool


def _worker_run(cfg_dict: dict, index: int) -> dict:
    """Simulate one index in a worker; the cell is built on the first call (errors reach the parent)."""
    global _WORKER_SIM
    try:
        if _WORKER_SIM is None:
            _WORKER_SIM = Simulator(GenerationConfig(**cfg_dict))
        return _WORKER_SIM.run_and_write(index)
    except Exception as exc:
        raise SimulationFailed(f"simulation {index} failed: {type(exc).__name__}: {exc}") from None


def _pending(cfg: GenerationConfig, indices) -> list[int]:
    todo = []
    for i in indices:
        p = record_path(cfg.out_dir, i)
        if p.exists() and record_is_complete(p, cfg, i):
            continue
        todo.append(i)
    return todo


def _progress(total_s: float, done_s: float, desc: str, enabled: bool):
    """A bar over simulated seconds (with rate and ETA)."""
    from tqdm import tqdm

    return tqdm(total=round(total_s, 3), initial=round(done_s, 3), desc=desc, unit="sim s",
                disable=not enabled, dynamic_ncols=True, smoothing=0.05)


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"received signal {signum}")


def _run_workers(cfg: GenerationConfig, sim: Simulator, todo: list[int], workers: int, bar) -> None:
    """Simulate ``todo`` here (one worker: ``sim``, already built) or in a pool of worker processes."""
    import multiprocessing as mp

    out_dir = Path(cfg.out_dir)
    step_s = cfg.duration_ms / 1000.0
    if workers <= 1:
        for i in todo:
            _log_timing(out_dir, [sim.run_and_write(i)])
            bar.update(step_s)
        return
    ctx = mp.get_context("spawn")
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    pool = ctx.Pool(processes=min(workers, len(todo)), initializer=_worker_setup)
    try:
        import functools

        run_one = functools.partial(_worker_run, asdict(cfg))
        for timing in pool.imap_unordered(run_one, todo, chunksize=1):
            _log_timing(out_dir, [timing])
            bar.update(step_s)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        signal.signal(signal.SIGTERM, old)


def selected_indices(cfg: GenerationConfig, only: str | None = None) -> list[int]:
    """Simulation indices to run: all ``0..n_sims-1``, or with ``only='SPLIT[:N]'`` the (first N) simulations of
    one split. Each record is the one the whole dataset would hold (a record depends on its index alone), so
    a held-out split can be rebuilt without the rest."""
    from lfdeep_neuron.errors import InputError

    indices = list(range(cfg.n_sims))
    if not only:
        return indices
    split, _, n = only.partition(":")
    chosen = assign_splits(indices, cfg.seed, cfg.split_fractions)
    if split not in chosen:
        raise InputError(f"--only {only!r}: the split must be one of {sorted(chosen)}")
    try:
        n_max = int(n) if n else None
    except ValueError:
        raise InputError(f"--only {only!r}: expected SPLIT or SPLIT:N with a whole number N") from None
    return sorted(chosen[split])[:n_max]


def generate(cfg: GenerationConfig, workers: int | None = None, progress: bool = True,
             only: str | None = None) -> dict:
    """Generate (or complete) a dataset; return the final ``meta.json`` content (None on MPI ranks > 0).

    The cell is built (morphology read, mechanisms compiled) before anything is written or any worker
    starts, so that a bad morphology fails at once and leaves no dataset behind. The first failing
    simulation stops the run (:class:`SimulationFailed`); complete records stay and a rerun resumes.

    Parameters
    ----------
    cfg : GenerationConfig
    workers : int, optional
        Worker processes when not under MPI (default: the number of CPU cores). Under ``mpiexec`` each
        rank simulates its share in-process and ``workers`` is ignored.
    progress : bool
        Show a tqdm bar over simulated seconds, with ETA (rank 0 only under MPI).
    only : str, optional
        ``'SPLIT[:N]'``: only the (first N) simulations of that split (:func:`selected_indices`).
    """
    from lfdeep_neuron.parallel import launched_under_mpi

    out_dir = Path(cfg.out_dir)
    indices = selected_indices(cfg, only)
    if launched_under_mpi():
        from lfdeep_neuron.parallel import parallel_context

        pc = parallel_context()
        rank, size = int(pc.id()), int(pc.nhost())
        problem, sim = None, None
        try:
            sim = Simulator(cfg)                       # every rank: a bad morphology stops all of them
            if rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                _check_or_start_meta(cfg)
        except (OSError, ValueError) as exc:
            problem = exc
        if pc.allreduce(1.0 if problem is not None else 0.0, 1) > 0:  # every rank stops together
            raise problem if problem is not None else SimulationFailed("another rank refused to start")
        # Rank 0 finds what is left and deals it out round-robin; every rank then runs the same number
        # of rounds (CoreNEURON's psolve is collective: a rank without a simulation in the last round
        # runs the cell without inputs and discards it).
        if rank == 0:
            _clean_temporaries(out_dir)
        pc.barrier()
        todo = pc.py_broadcast(_pending(cfg, indices) if rank == 0 else None, 0)
        rounds = -(-len(todo) // size)
        step_s = cfg.duration_ms / 1000.0
        with _progress(len(indices) * step_s, (len(indices) - len(todo)) * step_s, f"{size} ranks",
                       progress and rank == 0) as bar:
            for r in range(rounds):
                k = r * size + rank
                if k < len(todo):
                    _log_timing(out_dir, [sim.run_and_write(todo[k])])
                else:
                    sim.run_idle()
                bar.update(step_s * min(size, len(todo) - r * size))
        pc.barrier()
        meta = None
        if rank == 0:
            meta = _summarise(cfg)
            _write_json_atomic(out_dir / META_NAME, meta)
        pc.barrier()
        return meta

    sim = Simulator(cfg)                               # preflight: fails before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_start_meta(cfg)
    _clean_temporaries(out_dir)
    todo = _pending(cfg, indices)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    step_s = cfg.duration_ms / 1000.0
    with _progress(len(indices) * step_s, (len(indices) - len(todo)) * step_s, "simulated", progress) as bar:
        if todo:
            if workers > 1:
                del sim                                # the workers build their own cells
                sim = None
            _run_workers(cfg, sim, todo, workers, bar)
    meta = _summarise(cfg)
    _write_json_atomic(out_dir / META_NAME, meta)
    return meta


def _complete_records(out_dir):
    """``(index, path, root attributes)`` of every complete record of a dataset directory, by index (files
    that cannot be opened, or that a run is still writing, are skipped)."""
    import h5py

    for index, path in sorted(list_records(out_dir).items()):
        try:
            with h5py.File(path, "r") as f:
                attrs = dict(f.attrs)
        except OSError:
            continue
        if int(attrs.get("complete", 0)) == 1:
            yield index, path, attrs


def dataset_status(out_dir) -> dict:
    """How far a dataset directory is: its settings, complete records, simulated seconds and spikes.

    Reads ``meta.json`` for the settings and counts the complete records on disk (a run in progress
    rewrites ``meta.json`` only at its end). Timing comes from ``timing.jsonl``.
    """
    from lfdeep_neuron.errors import InputError

    out_dir = Path(out_dir)
    meta = read_meta(out_dir) if out_dir.is_dir() else None
    if meta is None or "generation" not in meta:
        raise InputError(f"{out_dir}: not a dataset directory (no {META_NAME} written by generate)")
    gen = meta["generation"]
    done, spikes, rates = 0, 0, []
    for _, _, attrs in _complete_records(out_dir):
        try:
            n = int(attrs["n_soma_spikes"])
            dur = float(attrs["duration_ms"])
        except KeyError:
            continue
        done += 1
        spikes += n
        rates.append(n / (dur / 1000.0))
    cpu_s, sims_timed = 0.0, 0
    log = out_dir / TIMING_LOG
    if log.is_file():
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                e = json.loads(line)
                cpu_s += float(e["cpu_s"])
                sims_timed += 1
    dur_s = gen["duration_ms"] / 1000.0
    rates = np.asarray(rates)
    return {
        "dir": str(out_dir), "generation": gen, "records_done": done,
        "simulated_s": done * dur_s, "soma_spikes": spikes,
        "rate_hz_quantiles": {q: float(np.quantile(rates, q)) for q in (0.1, 0.5, 0.9)} if rates.size else {},
        "fraction_firing_ge_2hz": float(np.mean(rates >= 2.0)) if rates.size else 0.0,
        "rates_hz": rates.tolist(),
        "cpu_s_per_simulated_s": cpu_s / (sims_timed * dur_s) if sims_timed else None,
        "bytes": sum(p.stat().st_size for p in list_records(out_dir).values()),
    }


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def configure_parser(p: argparse.ArgumentParser) -> None:
    from lfdeep_neuron.data.inputs import GENERATORS
    from lfdeep_neuron.hay.simulate import ENGINES, INTEGRATORS

    p.add_argument("--morphology", default=os.environ.get("LFDEEP_HAY_MORPHOLOGY"),
                   help="Hay cell morphology (cell1.asc); default $LFDEEP_HAY_MORPHOLOGY")
    p.add_argument("--out", help="dataset directory (created; resumed if it exists); required unless --status")
    p.add_argument("--status", metavar="DIR", nargs="+", default=None,
                   help="print how far the dataset(s) in DIR are (records, simulated s, spikes, rates) and exit; "
                        "with --digest, DIR:first=N digests simulations 0..N-1 only (a training run's subset) "
                        "(default: generate)")
    p.add_argument("--n-sims", type=int, help="number of simulations (required with --out)")
    p.add_argument("--duration-ms", type=int, default=6000, help="length of each simulation (ms)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; simulation i uses sim_seed(seed, i)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: CPU cores; ignored under mpiexec, where ranks share the work)")
    p.add_argument("--integrator", choices=INTEGRATORS, default="fixed_cn",
                   help="fixed_cn: Crank-Nicolson, fixed step (default); fixed: backward Euler; "
                        "cvode: variable step, atol 1e-3, as the published data (needs --engine neuron)")
    p.add_argument("--dt-ms", type=float, default=0.05, help="time step of the fixed-step integrators (ms)")
    p.add_argument("--engine", choices=ENGINES, default="coreneuron",
                   help="coreneuron (default: same trajectories, faster; fixed step only) or neuron")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="published",
                   help="input generator: 'published'; 'excited' (inhibition shifted down: more firing); 'volleys' "
                        "(the published background plus synchronous volleys of 10-300 events)")
    p.add_argument("--storage", choices=STORAGES, default="compact",
                   help="compact: float16 voltages and currents (~1.5 MB per simulated s); float32: exact")
    p.add_argument("--imem-source", choices=IMEM_SOURCES, default="laplacian",
                   help="bin-mean currents as -L v_mean (default, exact) or from NEURON's recorded i_membrane_")
    p.add_argument("--splits", default="0.8,0.1,0.1",
                   help="train,val,test fractions by simulation (e.g. 1,0,0 for a training-only variant)")
    p.add_argument("--digest", action="store_true",
                   help="with --status: also print the content digest (SHA-256 over the values) of simulations "
                        "0..n-1, the complete ones from the start: a rebuilt folder must give the one README records")
    p.add_argument("--histogram", metavar="PNG", default=None,
                   help="with --status: also plot the per-simulation somatic firing rates (one histogram per DIR; "
                        "default: no plot)")
    p.add_argument("--only", metavar="SPLIT[:N]", default=None,
                   help="only the (first N) simulations of one split, e.g. test:20 (each record is the one the "
                        "whole dataset holds; default: every simulation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def dataset_digest(out_dir, first: int | None = None, progress: bool = False) -> dict:
    """Content digest of a dataset directory: one SHA-256 over the values of its first records.

    Record ``i`` contributes ``"<i> <record_values_sha256>"`` for ``i = 0 .. n-1`` in order, so the
    digest depends on the simulated numbers only (not on HDF5 versions, compression or timing logs):
    a folder rebuilt with the command that made it gives the same digest, and a folder still being
    generated can be checked on its first ``n`` records (the ``DIR:first=n`` subset of ``--data``).

    Parameters
    ----------
    out_dir : str or Path
        A dataset directory written by :func:`generate`.
    first : int, optional
        Digest records ``0 .. first-1`` (an :class:`InputError` names the first one that is not
        complete). Default: the longest run of complete records from 0.
    progress : bool
        Show a progress bar (every record is read and decompressed).

    Returns
    -------
    dict
        ``records`` (n), ``beyond`` (complete records after the first missing one, not digested) and
        ``sha256`` (64 hex digits).
    """
    from tqdm.auto import tqdm

    from lfdeep_neuron.data.records import record_values_sha256
    from lfdeep_neuron.errors import InputError

    complete = {index for index, _, _ in _complete_records(out_dir)}
    n = 0
    while n in complete:
        n += 1
    if first is not None:
        if first < 1 or first > n:
            raise InputError(f"{out_dir}: cannot digest its first {first} records: "
                             + (f"simulation {n} is not complete" if first > n else "first must be >= 1"))
        n = first
    h = hashlib.sha256()
    for index in tqdm(range(n), desc="digest", unit="record", disable=not progress):
        h.update(f"{index} {record_values_sha256(record_path(out_dir, index))}\n".encode())
    return {"records": n, "beyond": sum(1 for i in complete if i >= n), "sha256": h.hexdigest()}


def plot_rate_histogram(statuses: list[dict], path) -> None:
    """Histogram of per-simulation somatic firing rates of one or more datasets (``dataset_status``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max([max(st["rates_hz"], default=0.0) for st in statuses] + [1.0])
    bins = np.linspace(0, np.ceil(top * 2) / 2 + 0.5, 30)
    for st in statuses:
        g = st["generation"]
        ax.hist(st["rates_hz"], bins=bins, alpha=0.6,
                label=f"{g.get('generator', 'published')} ({st['records_done']} sims, "
                      f"{100 * st['fraction_firing_ge_2hz']:.0f} % >= 2 Hz)")
    ax.axvline(2.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("somatic firing rate of a simulation (Hz)")
    ax.set_ylabel("simulations")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_status(st: dict) -> None:
    g = st["generation"]
    print(f"{st['dir']}: {st['records_done']} complete simulations of {g['duration_ms']} ms "
          f"({st['simulated_s']:.1f} simulated s), {st['soma_spikes']} somatic spikes, "
          f"{st['bytes'] / 1e6:.1f} MB")
    print(f"  settings: generator {g.get('generator', 'published')}, integrator {g['integrator']} "
          f"dt {g['dt_ms']} ms, engine {g.get('engine', 'neuron')}, storage {g.get('storage', g.get('voltage_dtype'))}, "
          f"seed {g['seed']}")
    if st["rate_hz_quantiles"]:
        q = st["rate_hz_quantiles"]
        print(f"  somatic rate per simulation: 10/50/90 % = {q[0.1]:.2f} / {q[0.5]:.2f} / {q[0.9]:.2f} Hz; "
              f"{100 * st['fraction_firing_ge_2hz']:.0f} % fire >= 2 Hz")
    if st["cpu_s_per_simulated_s"]:
        print(f"  cost: {st['cpu_s_per_simulated_s']:.2f} CPU s per simulated s (timing.jsonl)")


def run(args) -> int:
    from lfdeep_neuron.errors import InputError

    if args.status:
        from lfdeep_neuron.data.dataset import parse_folder_spec

        specs = [parse_folder_spec(d) for d in args.status]     # DIR or DIR:first=N (the digest's records)
        statuses = [dataset_status(folder) for folder, _ in specs]
        for st, (_, first) in zip(statuses, specs):
            _print_status(st)
            if args.digest:
                dg = dataset_digest(st["dir"], first=first, progress=not args.no_progress)
                later = f"; {dg['beyond']} later records not included" if dg["beyond"] else ""
                if dg["records"]:
                    print(f"  content sha256 of simulations 0..{dg['records'] - 1}: {dg['sha256']}{later}")
                else:
                    print(f"  content sha256: nothing to digest, simulation 0 is not complete{later}")
        if args.histogram:
            plot_rate_histogram(statuses, args.histogram)
            print(f"histogram: {args.histogram}")
        return 0
    if not args.out or args.n_sims is None:
        raise InputError("--out and --n-sims are required (or --status DIR)")
    if not args.morphology:
        raise InputError("--morphology (or $LFDEEP_HAY_MORPHOLOGY) is required")
    try:
        fractions = dict(zip(("train", "val", "test"), (float(x) for x in args.splits.split(","))))
    except ValueError:
        raise InputError(f"--splits must be three numbers train,val,test, got {args.splits!r}") from None
    if len(fractions) != 3:
        raise InputError(f"--splits must be three numbers train,val,test, got {args.splits!r}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"{args.out}: exists and is not a directory")
    cfg = GenerationConfig(morphology=str(Path(args.morphology).resolve()), out_dir=args.out,
                           n_sims=args.n_sims, duration_ms=args.duration_ms, seed=args.seed,
                           integrator=args.integrator, dt_ms=args.dt_ms, engine=args.engine,
                           generator=args.generator, storage=args.storage, imem_source=args.imem_source,
                           split_fractions=fractions)
    try:
        meta = generate(cfg, workers=args.workers, progress=not args.no_progress, only=args.only)
    except SimulationFailed as exc:
        print(f"generate: {exc}; complete records are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("generate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if meta is not None:
        t = meta["totals"]
        print(f"{args.out}: {t['n_records']} simulations, {t['simulated_s']:.1f} simulated s, "
              f"{t['soma_spikes']} somatic spikes, {t['bytes'] / 1e6:.1f} MB "
              f"({t['bytes_per_simulated_s'] / 1e6:.2f} MB per simulated s)")
    return 0
