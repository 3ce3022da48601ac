"""Network equivalence: detailed cells and surrogates on identical inputs and connectivity.

The pieces behind ``benchmarks/network_equivalence.py`` and its small version in the tests:

* :func:`background_events` — the ground-truth background of one cell (a named generator, a seed per gid);
* :class:`VolleyProtocol` — synchronous volleys of given size, location and sign, scheduled per cell;
* :class:`Connectivity` — recurrent connections: each a bundle of synapses of the target, one delay;
* :class:`NetworkSpec` — per-cell input events plus connections: the whole input of a network;
* :func:`run_detailed` / :func:`run_surrogates` — that network of ``HayL5PC`` cells (the ground-truth solve:
  Crank–Nicolson, dt 0.05 ms, v_init -76 mV) or of ``SurrogateL5PC`` cells (one engine, one forward pass
  per ms), returning somatic spike times on the metric convention and soma voltages at 1-ms points;
* :func:`volley_responses` and :func:`network_scores` — what the benchmark reports.

Spike times: detailed spikes are NetCon threshold times (0 mV, upward); surrogate spikes are converted
from the engine's emission time to ``k - 0.5`` ms (:func:`~lfdeep_neuron.surrogate.metrics.emitted_to_metric_times`),
the convention of ``rollout`` and the metrics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GROUND_TRUTH_SOLVER", "background_events", "VolleyProtocol", "Connectivity", "NetworkSpec",
           "delete_events", "run_detailed", "run_surrogates", "volley_responses", "network_scores",
           "population_rate"]

def _generation_defaults() -> dict:
    from dataclasses import fields

    from lfdeep_neuron.data.simulate import GenerationConfig

    d = {f.name: f.default for f in fields(GenerationConfig)}
    return {k: d[k] for k in ("integrator", "dt_ms", "v_init_mV")}


#: The solve of the training corpus: ``lfdeep-neuron generate``'s defaults (Crank–Nicolson, dt 0.05 ms, -76 mV).
GROUND_TRUTH_SOLVER = _generation_defaults()


def background_events(gid: int, segments: dict, synapses: dict, duration_ms: int, generator: str = "published",
                      dataset_seed: int = 9001) -> tuple[np.ndarray, np.ndarray]:
    """Effective background events of cell ``gid``: ``draw_inputs(generator, sim_seed(dataset_seed, gid))``."""
    from lfdeep_neuron.data.inputs import draw_inputs
    from lfdeep_neuron.data.simulate import sim_seed

    d = draw_inputs(generator, sim_seed(dataset_seed, gid), segments, synapses, duration_ms)
    return d.effective_syn_idx, d.effective_t_ms


def delete_events(syn_idx, t_ms, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The events with a random ``fraction`` deleted (``RandomState(seed)``): the noise-ceiling input."""
    keep = np.random.RandomState(seed).rand(np.size(t_ms)) >= fraction
    return np.asarray(syn_idx)[keep], np.asarray(t_ms)[keep]


# ---------------------------------------------------------------------------------------------------------
# Volleys
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VolleyProtocol:
    """Volleys of every condition, interleaved in a random order per cell.

    A condition is ``(size, location, sign)``; location as in :data:`lfdeep_neuron.data.volleys.LOCATIONS`,
    sign ``exc`` or ``inh``. All events of a volley arrive at its onset (integer ms: "within 1 ms"), on
    synapses drawn uniformly with replacement from the location. Onsets: ``first_ms``, then every
    ``gap_ms`` (+ 0..``jitter_ms`` ms), up to ``duration - tail_ms``.
    """

    sizes: tuple = (10, 25, 50, 100, 200)
    locations: tuple = ("all", "basal", "apical")
    inh_sizes: tuple = (50, 200)
    inh_location: str = "all"
    first_ms: int = 200
    gap_ms: int = 150
    jitter_ms: int = 20
    tail_ms: int = 40

    @property
    def conditions(self) -> list[tuple]:
        exc = [(m, loc, "exc") for loc in self.locations for m in self.sizes]
        return exc + [(m, self.inh_location, "inh") for m in self.inh_sizes]

    def schedule(self, gid: int, duration_ms: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Onsets (ms) and condition indices of cell ``gid``'s volleys."""
        rng = np.random.RandomState([seed, gid, 7])
        onsets, t = [], self.first_ms
        while t <= duration_ms - self.tail_ms:
            onsets.append(t)
            t += self.gap_ms + int(rng.randint(0, self.jitter_ms + 1))
        n, n_cond = len(onsets), len(self.conditions)
        cond = np.concatenate([rng.permutation(n_cond) for _ in range(-(-n // n_cond))])[:n]
        return np.asarray(onsets, np.int64), cond.astype(np.int64)

    def events(self, gid: int, onsets, cond, segments: dict, synapses: dict, seed: int = 0):
        """The volleys' events of cell ``gid`` (sorted by time then channel)."""
        from lfdeep_neuron.data.volleys import location_channels

        rng = np.random.RandomState([seed, gid, 8])
        pools = {}
        syn, tt = [], []
        for onset, c in zip(onsets, cond):          # a few dozen volleys: setup, not a hot path
            m, loc, sign = self.conditions[int(c)]
            key = (loc, sign)
            if key not in pools:
                pools[key] = location_channels(segments, synapses, loc, sign)
            syn.append(rng.choice(pools[key], size=m))
            tt.append(np.full(m, float(onset)))
        syn = np.concatenate(syn).astype(np.int32) if syn else np.zeros(0, np.int32)
        tt = np.concatenate(tt) if tt else np.zeros(0)
        order = np.lexsort((syn, tt))
        return syn[order], tt[order]


# ---------------------------------------------------------------------------------------------------------
# Connectivity and the network's whole input
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connectivity:
    """Random recurrent connections: each cell gets ``k_in`` presynaptic cells (no self-connections).

    A connection is a bundle of ``synapses_per_connection`` excitatory synapses of the target drawn
    uniformly over its dendrites, each with weight ``weight`` (reference-synapse units, 1 = one training
    event) and one delay uniform in ``delay_ms`` (rounded to 0.1 ms, >= the surrogate step).
    """

    k_in: int = 8
    synapses_per_connection: int = 40
    weight: float = 1.0
    delay_ms: tuple = (1.0, 3.0)

    def plan(self, n_cells: int, synapses: dict, seed: int = 0) -> dict:
        """Arrays of equal length: ``src``, ``tgt``, ``channel``, ``weight``, ``delay`` (one row per synapse)."""
        exc = np.asarray(synapses["syn_idx"])[np.asarray(synapses["type"]).astype(int) == 0]
        rows = []
        for tgt in range(n_cells):                     # setup: a loop over cells at build time only
            rng = np.random.RandomState([seed, tgt, 9])
            others = np.delete(np.arange(n_cells), tgt)
            k = min(self.k_in, others.size)
            for src in rng.choice(others, size=k, replace=False):
                ch = rng.choice(exc, size=self.synapses_per_connection)
                delay = round(float(rng.uniform(*self.delay_ms)), 1)
                rows += [(int(src), tgt, int(c), delay) for c in ch]
        a = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
        return {"src": a[:, 0].astype(np.int64), "tgt": a[:, 1].astype(np.int64),
                "channel": a[:, 2].astype(np.int64), "weight": np.full(len(a), float(self.weight)),
                "delay": a[:, 3]}


@dataclass
class NetworkSpec:
    """Everything a network run needs: per-cell events and the connections (may be empty)."""

    n_cells: int
    duration_ms: int
    events: dict                         # gid -> (syn_idx, t_ms)
    connections: dict = field(default_factory=lambda: {k: np.zeros(0) for k in
                                                        ("src", "tgt", "channel", "weight", "delay")})

    def local(self, gids) -> "NetworkSpec":
        """The part of the network on ``gids`` (only valid when no connection crosses the subset)."""
        gids = set(int(g) for g in gids)
        c = self.connections
        mask = np.isin(c["tgt"], list(gids))
        if np.any(~np.isin(c["src"][mask], list(gids))):
            raise ValueError("a connection crosses the subset: run connected networks in one process")
        return NetworkSpec(self.n_cells, self.duration_ms, {g: self.events[g] for g in gids},
                           {k: v[mask] for k, v in c.items()})


def _spike_recorders(h, cells: dict, gids) -> tuple[list, list]:
    """One NetCon.record vector per cell (both cell kinds have ``spike_netcon()``); keep both lists alive."""
    netcons, vectors = [], []
    for g in gids:
        vectors.append(h.Vector())
        netcons.append(cells[g].spike_netcon())
        netcons[-1].record(vectors[-1])
    return netcons, vectors


def _spike_lists(netcon_vectors, gids) -> tuple[np.ndarray, np.ndarray]:
    gid = np.concatenate([np.full(len(v), g, np.int64) for g, v in zip(gids, netcon_vectors)] or [np.zeros(0, int)])
    t = np.concatenate([np.asarray(v) for v in netcon_vectors] or [np.zeros(0)])
    order = np.lexsort((gid, t))
    return gid[order], t[order]


def run_detailed(spec: NetworkSpec, morphology=None, solver: dict | None = None, progress: bool = False) -> dict:
    """Simulate ``spec`` with detailed ``HayL5PC`` cells in this process (NEURON, fixed step).

    Returns
    -------
    dict with ``gids`` [n], ``spike_gid``, ``spike_t_ms`` (threshold times), ``soma_v_mV`` [n, T] at t = 0..T-1
    ms (point samples), ``wall_s``.
    """
    from neuron import h

    from lfdeep_neuron.hay import HayL5PC

    s = dict(GROUND_TRUTH_SOLVER, **(solver or {}))
    if s["integrator"] not in ("fixed", "fixed_cn"):
        raise ValueError(f"run_detailed: integrator must be 'fixed' or 'fixed_cn', got {s['integrator']!r}")
    gids = sorted(spec.events)
    cells = {g: HayL5PC(morphology) for g in gids}
    for g in gids:
        cells[g].set_input_events(*spec.events[g])
    c = spec.connections
    netcons = []
    for src, tgt, ch, w, d in zip(c["src"], c["tgt"], c["channel"], c["weight"], c["delay"]):
        nc = cells[int(src)].spike_netcon(cells[int(tgt)].synapse_by_channel(int(ch)),
                                          delay_ms=float(d), weight=float(w))
        netcons.append(nc)
    rec_ncs, spike_vecs = _spike_recorders(h, cells, gids)
    v_vecs = [h.Vector() for _ in gids]
    for g, vv in zip(gids, v_vecs):
        vv.record(cells[g].soma[0](0.5)._ref_v, 1.0)
    h.load_file("stdrun.hoc")
    cvode = h.CVode()
    old = (cvode.active(), h.secondorder, h.dt)
    cvode.active(0)
    h.secondorder = 2 if s["integrator"] == "fixed_cn" else 0
    h.dt = float(s["dt_ms"])
    t0 = time.perf_counter()
    h.finitialize(float(s["v_init_mV"]))
    T = int(spec.duration_ms)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=T, unit="ms", desc=f"detailed ({len(gids)} cells)")
    for stop in range(100, T + 100, 100):
        h.continuerun(min(stop, T))
        if bar is not None:
            bar.update(min(stop, T) - bar.n)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    cvode.active(old[0])
    h.secondorder, h.dt = old[1], old[2]
    gid, t = _spike_lists(spike_vecs, gids)
    v = np.stack([np.asarray(vv)[:T] for vv in v_vecs])
    return {"gids": np.asarray(gids, np.int64), "spike_gid": gid, "spike_t_ms": t, "soma_v_mV": v, "wall_s": wall}


def run_surrogates(spec: NetworkSpec, model, dt_ms: float = 0.05, spike_threshold: float | None = None,
                   dtype=None, device=None) -> dict:
    """Simulate ``spec`` with ``SurrogateL5PC`` cells of ``model`` (one engine, made and closed here).

    Returns the same keys as :func:`run_detailed`; spike times on the metric convention (``k - 0.5`` ms).
    """
    from neuron import h

    from lfdeep_neuron.cosim import SurrogateEngine, SurrogateL5PC, connect
    from lfdeep_neuron.surrogate.metrics import emitted_to_metric_times

    engine = SurrogateEngine(model, device=device, spike_threshold=spike_threshold, dtype=dtype)
    try:
        gids = sorted(spec.events)
        cells = {g: SurrogateL5PC(engine=engine) for g in gids}
        for g in gids:
            cells[g].set_input_events(*spec.events[g])
        c = spec.connections
        netcons = [connect(cells[int(src)], cells[int(tgt)].channel_target(int(ch)), weight=float(w),
                           delay=float(d))
                   for src, tgt, ch, w, d in zip(c["src"], c["tgt"], c["channel"], c["weight"], c["delay"])]
        rec_ncs, spike_vecs = _spike_recorders(h, cells, gids)
        rec = engine.record(cells=[cells[g] for g in gids], segments="soma")
        h.load_file("stdrun.hoc")
        cvode = h.CVode()
        old = (cvode.active(), h.dt)
        cvode.active(0)
        h.dt = float(dt_ms)
        t0 = time.perf_counter()
        h.finitialize(GROUND_TRUTH_SOLVER["v_init_mV"])
        h.continuerun(float(spec.duration_ms))
        wall = time.perf_counter() - t0
        cvode.active(old[0])
        h.dt = old[1]
        gid, t = _spike_lists(spike_vecs, gids)
        t = emitted_to_metric_times(t, dt_ms, step_ms=engine.step_ms)
        v = np.asarray(rec.v_mV)[:, 0, :int(spec.duration_ms)]
        del netcons, rec_ncs
        return {"gids": np.asarray(gids, np.int64), "spike_gid": gid, "spike_t_ms": t, "soma_v_mV": v,
                "wall_s": wall}
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------

def volley_responses(run: dict, control: dict, onsets: dict, cond: dict, n_conditions: int,
                     window_ms: int = 20, hist_ms: tuple = (-10, 40), clip_mV: float = -55.0) -> dict:
    """Evoked responses per condition: volley run minus control run, volley by volley (paired).

    Parameters
    ----------
    run, control : dicts of :func:`run_detailed` / :func:`run_surrogates` (same gids and inputs, the
        control without the volleys).
    onsets, cond : gid -> arrays of :meth:`VolleyProtocol.schedule`.

    Returns
    -------
    dict of arrays over conditions: ``n_volleys``, ``evoked`` (extra spikes per volley in
    [onset, onset + window_ms)), ``evoked_se``, ``hist`` [C, H] (extra spikes per volley per 1-ms bin of
    ``hist_ms``), ``hist_edges``, ``peak_latency_ms`` (centre of the largest bin of ``hist`` at >= 0 ms; NaN
    when no bin is positive), ``depol_mV`` [C, W] (mean soma difference, both clipped at ``clip_mV``,
    t = onset .. onset + 30 ms), ``peak_depol_mV`` (its value of largest magnitude: a depolarisation > 0, a
    hyperpolarisation < 0).
    """
    edges = np.arange(hist_ms[0], hist_ms[1] + 1)
    W = 31
    per_cond = {k: [[] for _ in range(n_conditions)] for k in ("evoked", "hist", "depol")}
    for row, g in enumerate(run["gids"]):
        ts_r = run["spike_t_ms"][run["spike_gid"] == g]
        ts_c = control["spike_t_ms"][control["spike_gid"] == g]
        v_r = np.minimum(run["soma_v_mV"][row], clip_mV)
        v_c = np.minimum(control["soma_v_mV"][list(control["gids"]).index(g)], clip_mV)
        on = np.asarray(onsets[int(g)])
        rel_r = ts_r[None, :] - on[:, None]                     # [volleys, spikes]
        rel_c = ts_c[None, :] - on[:, None]
        ev = ((rel_r >= 0) & (rel_r < window_ms)).sum(1) - ((rel_c >= 0) & (rel_c < window_ms)).sum(1)
        h_r = np.stack([np.histogram(r, edges)[0] for r in rel_r]) if len(on) else np.zeros((0, len(edges) - 1))
        h_c = np.stack([np.histogram(r, edges)[0] for r in rel_c]) if len(on) else np.zeros((0, len(edges) - 1))
        idx = on[:, None] + np.arange(W)[None, :]
        ok = idx[:, -1] < v_r.size
        dv = np.full((len(on), W), np.nan)
        dv[ok] = v_r[idx[ok]] - v_c[idx[ok]]
        for j, c in enumerate(np.asarray(cond[int(g)])):
            per_cond["evoked"][c].append(ev[j])
            per_cond["hist"][c].append(h_r[j] - h_c[j])
            per_cond["depol"][c].append(dv[j])
    out = {"n_volleys": np.array([len(x) for x in per_cond["evoked"]]), "hist_edges": edges}
    out["evoked"] = np.array([np.mean(x) if x else np.nan for x in per_cond["evoked"]])
    out["evoked_se"] = np.array([np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else np.nan
                                 for x in per_cond["evoked"]])
    out["hist"] = np.stack([np.mean(x, 0) if x else np.full(len(edges) - 1, np.nan) for x in per_cond["hist"]])
    out["depol_mV"] = np.stack([np.nanmean(x, 0) if x else np.full(W, np.nan) for x in per_cond["depol"]])
    centres = edges[:-1] + 0.5
    lat = []
    for hrow in out["hist"]:
        post = np.where(centres >= 0, hrow, -np.inf)
        lat.append(float(centres[np.argmax(post)]) if np.nanmax(post) > 0 else np.nan)
    out["peak_latency_ms"] = np.array(lat)
    dep = np.nan_to_num(out["depol_mV"])
    out["peak_depol_mV"] = dep[np.arange(len(dep)), np.argmax(np.abs(dep), axis=1)]   # the larger excursion
    return out


def population_rate(spike_t_ms, n_cells: int, t_start_ms: float, t_stop_ms: float, bin_ms: float) -> np.ndarray:
    """Population rate (Hz per cell) in bins of ``bin_ms`` over [t_start, t_stop)."""
    edges = np.arange(t_start_ms, t_stop_ms + 1e-9, bin_ms)
    counts = np.histogram(spike_t_ms, edges)[0]
    return counts / (n_cells * bin_ms * 1e-3)


def _train_stats(gid, t, gids, burst_isi_ms: float = 10.0) -> dict:
    isis = [np.diff(t[gid == g]) for g in gids]
    cvs = [np.std(i) / np.mean(i) for i in isis if i.size >= 2]
    all_isi = np.concatenate(isis) if isis else np.zeros(0)
    return {"isi_cv": float(np.mean(cvs)) if cvs else float("nan"),
            "burst_fraction": float(np.mean(all_isi < burst_isi_ms)) if all_isi.size else float("nan")}


def network_scores(test: dict, ref: dict, duration_ms: float, skip_ms: float = 200.0) -> dict:
    """How well the spikes of ``test`` reproduce those of ``ref`` (same gids, same inputs).

    Rate ratio, per-cell rate correlation, population-rate correlation at 5 and 20 ms, pooled Γ ±2 and
    ±5 ms (:func:`~lfdeep_neuron.surrogate.metrics.pooled_spike_metrics`), ISI CV and burst fraction
    (ISIs < 10 ms) of both; spikes before ``skip_ms`` are ignored.
    """
    from lfdeep_neuron.surrogate.metrics import pooled_spike_metrics

    gids = np.asarray(ref["gids"])
    span_s = (duration_ms - skip_ms) * 1e-3
    sel = {k: d["spike_t_ms"] >= skip_ms for k, d in (("t", test), ("r", ref))}
    tg, tt = test["spike_gid"][sel["t"]], test["spike_t_ms"][sel["t"]]
    rg, rt = ref["spike_gid"][sel["r"]], ref["spike_t_ms"][sel["r"]]
    rate_t = np.array([(tg == g).sum() for g in gids]) / span_s
    rate_r = np.array([(rg == g).sum() for g in gids]) / span_s
    out = {"rate_test_hz": float(rate_t.mean()), "rate_ref_hz": float(rate_r.mean()),
           "rate_ratio": float(rate_t.sum() / max(rate_r.sum(), 1e-12)),
           "cell_rate_corr": float(np.corrcoef(rate_t, rate_r)[0, 1]) if rate_t.std() > 0 and rate_r.std() > 0
           else float("nan")}
    for b in (5, 20):
        pt = population_rate(tt, gids.size, skip_ms, duration_ms, b)
        pr = population_rate(rt, gids.size, skip_ms, duration_ms, b)
        out[f"pop_corr_{b}ms"] = float(np.corrcoef(pt, pr)[0, 1]) if pt.std() > 0 and pr.std() > 0 else float("nan")
    for w in (2, 5):
        m = pooled_spike_metrics([tt[tg == g] - skip_ms for g in gids], [rt[rg == g] - skip_ms for g in gids],
                                 [duration_ms - skip_ms] * gids.size, window_ms=w)
        out[f"gamma_{w}ms"] = float(m["gamma"])
    st, sr = _train_stats(tg, tt, gids), _train_stats(rg, rt, gids)
    out.update({f"{k}_test": v for k, v in st.items()})
    out.update({f"{k}_ref": v for k, v in sr.items()})
    return out
