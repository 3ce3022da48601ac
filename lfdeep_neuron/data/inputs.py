"""Input spike generators for the Hay cell's 1278 synapse channels.

Channel layout (docs/ARCHITECTURE.md): channel ``c < 639`` is the excitatory (AMPA+NMDA) synapse of
dendritic segment ``c`` (262 basal, then 377 apical, canonical order), channel ``639 + c`` its
inhibitory (GABA_A) synapse. An event list is a pair of 1-D arrays ``(syn_idx int32, t_ms float64)``
sorted by time, then channel.

* :func:`beniaguev_inputs` — the published inhomogeneous-Poisson generator of the NeuronIO data
  (BIOPHYSICS.md §7, NMDA configuration), bit-for-bit from numpy's legacy global RNG and a seed.
* :func:`effective_events` / :func:`dead_synapses` — the events that can act (BIOPHYSICS.md §6.4: a
  synapse receiving an event at t = 0 stays silent for the whole trial).
* :data:`GENERATORS` / :func:`register_generator` / :func:`draw_inputs` — named generators (``generate
  --generator NAME``): ``published``, ``excited`` and ``volleys`` (:mod:`~lfdeep_neuron.data.volleys`);
  a generator is an object with ``draw(rng, segments, synapses, duration_ms) -> (syn_idx, t_ms, attrs)``.
* :func:`homogeneous_poisson` — constant exc/inh rates, for validation.
* :class:`CurrentStep` — a somatic current step (Hay 2011 protocol), for validation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.signal

__all__ = [
    "N_DEND_SEGMENTS",
    "N_CHANNELS",
    "GeneratorConfig",
    "GeneratorDraw",
    "NMDA_CONFIG",
    "EXCITED_CONFIG",
    "GENERATORS",
    "PublishedGenerator",
    "InputDraw",
    "register_generator",
    "draw_inputs",
    "dendritic_lengths_um",
    "beniaguev_inputs",
    "beniaguev_rates",
    "dead_synapses",
    "effective_events",
    "events_from_raster",
    "events_by_channel",
    "homogeneous_poisson",
    "CurrentStep",
    "HAY_STEP_AMPS_NA",
]

#: Dendritic (synapse-bearing) segments of the Hay cell: 262 basal + 377 apical.
N_DEND_SEGMENTS = 639
#: Input channels: one excitatory and one inhibitory synapse per dendritic segment.
N_CHANNELS = 2 * N_DEND_SEGMENTS


@dataclass(frozen=True)
class GeneratorConfig:
    """Numeric ranges of the published generator (NMDA configuration, BIOPHYSICS.md §7).

    Counts are "spikes per tree (basal or apical) per 100 ms" before the per-segment spatial noise.
    """

    hold_ms_options: tuple = (25, 30, 35, 40, 45, 55, 60, 65, 70, 75, 80, 85, 90, 100, 150, 200, 300, 450)
    sigma_ms_options: tuple = (25, 30, 35, 40, 50, 60, 80, 100, 150, 200, 300, 400, 500, 600)
    jitter_ms: int = 20
    min_seg_length_um: float = 10.0
    bas_ex_per_100ms: tuple = (0, 800)
    bas_ex_inh_diff_per_100ms: tuple = (-600, 200)
    apic_ex_per_100ms: tuple = (0, 800)
    apic_ex_inh_diff_per_100ms: tuple = (-600, 200)
    spatial_noise: tuple = (0.5, 1.5)
    window_sigmas: int = 7


NMDA_CONFIG = GeneratorConfig()

#: The same generator with inhibition shifted down: inhibition per 100 ms is drawn from
#: [excitation - 800, excitation] instead of [excitation - 600, excitation + 200]. It widens the
#: range of somatic firing (the published ranges leave most 6-s trials near-silent) for training
#: sets; held-out splits keep :data:`NMDA_CONFIG` so that scores compare with published ones.
EXCITED_CONFIG = GeneratorConfig(bas_ex_inh_diff_per_100ms=(-800, 0), apic_ex_inh_diff_per_100ms=(-800, 0))


@dataclass
class GeneratorDraw:
    """What one call of the generator chose (stored as ``gen_*`` record attributes)."""

    keep_inst_rate_const_for_ms: int
    temporal_inst_rate_smoothing_sigma_ms: int
    num_inst_rate_samples: int
    duration_ms: int
    seed: int | None
    config: GeneratorConfig = field(default=NMDA_CONFIG)

    def attrs(self) -> dict:
        """Record attributes in the reference's naming (``gen_keep_inst_rate_const_for_ms`` ...)."""
        c = self.config
        return {
            "gen_keep_inst_rate_const_for_ms": np.int64(self.keep_inst_rate_const_for_ms),
            "gen_temporal_inst_rate_smoothing_sigma_ms": np.int64(self.temporal_inst_rate_smoothing_sigma_ms),
            "gen_num_inst_rate_samples": np.int64(self.num_inst_rate_samples),
            "gen_min_seg_length_um": float(c.min_seg_length_um),
            "gen_num_bas_ex_spikes_per_100ms_range": np.array(c.bas_ex_per_100ms, dtype=np.int64),
            "gen_num_bas_ex_inh_spike_diff_per_100ms_range": np.array(c.bas_ex_inh_diff_per_100ms, dtype=np.int64),
            "gen_num_apic_ex_spikes_per_100ms_range": np.array(c.apic_ex_per_100ms, dtype=np.int64),
            "gen_num_apic_ex_inh_spike_diff_per_100ms_range": np.array(c.apic_ex_inh_diff_per_100ms, dtype=np.int64),
            "gen_spatial_noise_range": np.array(c.spatial_noise, dtype=np.float64),
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


def dendritic_lengths_um(segments: dict) -> tuple[np.ndarray, int]:
    """Per-segment lengths ℓ = L/nseg (µm) of the dendritic segments, and how many are basal.

    Parameters
    ----------
    segments : dict
        A segment table (``sec_type`` and ``length_um`` columns), canonical order.

    Returns
    -------
    lengths_um : ndarray [639]
        Basal segments first, then apical (the synapse order).
    n_basal : int
    """
    sec_type = np.asarray(segments["sec_type"]).astype(str)
    length = np.asarray(segments["length_um"], dtype=np.float64)
    basal, apical = sec_type == "dend", sec_type == "apic"
    if not basal.any() or not apical.any():
        raise ValueError("segment table has no basal ('dend') or no apical ('apic') segments in sec_type")
    # canonical order already has all basal before all apical
    dend = np.flatnonzero(basal | apical)
    if not np.all(basal[dend[: basal.sum()]]):
        raise ValueError("segment table is not in canonical order (basal segments must precede apical)")
    return length[dend], int(basal.sum())


def _jittered_choice(rs: np.random.RandomState, options, jitter: int) -> int:
    """``options[randint(len)] + int(2·jitter·rand() − jitter)`` (int truncates toward zero)."""
    base = options[rs.randint(len(options))]
    return int(base + int(2 * jitter * rs.rand() - jitter))


def _gaussian_smoothing(rates: np.ndarray, sigma_ms: float, n_sigmas: int) -> np.ndarray:
    """Row-wise 'same' convolution with a unit-sum Gaussian of M = 1 + n_sigmas·σ samples."""
    m = int(1 + n_sigmas * sigma_ms)
    w = scipy.signal.windows.gaussian(m, std=sigma_ms)
    w = w / w.sum()
    return scipy.signal.convolve(rates, w[np.newaxis, :], mode="same")


def beniaguev_rates(rs: np.random.RandomState, lengths_um: np.ndarray, n_basal: int, duration_ms: int,
                    config: GeneratorConfig = NMDA_CONFIG) -> tuple[np.ndarray, np.ndarray, dict]:
    """Steps 1–11 of the generator: smoothed expected spikes per ms, exc and inh [639, T].

    Consumes the RNG exactly as the original: randint, rand, randint, rand, uniform(1×n) ×4,
    uniform(639×n) ×2.
    """
    T = int(duration_ms)
    ell = np.asarray(lengths_um, dtype=np.float64) + config.min_seg_length_um
    n_seg = ell.size
    lam_bas, lam_apic = ell[:n_basal].sum(), ell[n_basal:].sum()

    hold_ms = _jittered_choice(rs, config.hold_ms_options, config.jitter_ms)
    sigma_ms = _jittered_choice(rs, config.sigma_ms_options, config.jitter_ms)
    n_samples = int(np.ceil(T / hold_ms))

    # coarse totals per tree per 100 ms; inhibition = excitation + a difference, floored at 0
    e_bas = rs.uniform(*config.bas_ex_per_100ms, size=(1, n_samples))
    i_bas = rs.uniform(np.maximum(0, e_bas + config.bas_ex_inh_diff_per_100ms[0]),
                       e_bas + config.bas_ex_inh_diff_per_100ms[1], size=(1, n_samples))
    e_apic = rs.uniform(*config.apic_ex_per_100ms, size=(1, n_samples))
    i_apic = rs.uniform(np.maximum(0, e_apic + config.apic_ex_inh_diff_per_100ms[0]),
                        e_apic + config.apic_ex_inh_diff_per_100ms[1], size=(1, n_samples))

    # spikes per µm per ms, broadcast to the segments of each tree (basal rows first)
    is_bas = (np.arange(n_seg) < n_basal)[:, None]
    exc = np.where(is_bas, e_bas / (lam_bas * 100.0), e_apic / (lam_apic * 100.0))
    inh = np.where(is_bas, i_bas / (lam_bas * 100.0), i_apic / (lam_apic * 100.0))

    # independent spatial noise per element (whole exc matrix first), then per-segment length
    exc = exc * rs.uniform(*config.spatial_noise, size=(n_seg, n_samples))
    inh = inh * rs.uniform(*config.spatial_noise, size=(n_seg, n_samples))
    exc, inh = exc * ell[:, None], inh * ell[:, None]

    # piecewise constant for hold_ms, then Gaussian smoothing in time
    exc = np.repeat(exc, hold_ms, axis=1)[:, :T]
    inh = np.repeat(inh, hold_ms, axis=1)[:, :T]
    exc = _gaussian_smoothing(exc, sigma_ms, config.window_sigmas)
    inh = _gaussian_smoothing(inh, sigma_ms, config.window_sigmas)
    info = dict(keep_inst_rate_const_for_ms=hold_ms, temporal_inst_rate_smoothing_sigma_ms=sigma_ms,
                num_inst_rate_samples=n_samples)
    return exc, inh, info


def events_from_raster(raster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary [channels, T] raster on the 1-ms grid -> events sorted by time, then channel."""
    t_idx, ch = np.nonzero(np.asarray(raster).T)
    return ch.astype(np.int32), t_idx.astype(np.float64)


def beniaguev_inputs(seed: int | None, lengths_um: np.ndarray, n_basal: int, duration_ms: int = 6000,
                     config: GeneratorConfig = NMDA_CONFIG, rng: np.random.RandomState | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, GeneratorDraw]:
    """One trial of the published inhomogeneous-Poisson generator (BIOPHYSICS.md §7).

    Parameters
    ----------
    seed : int or None
        Seeds numpy's legacy global RNG (``np.random.seed(seed)``) exactly like the original, then
        draws from it. Pass ``rng`` instead to draw from your own ``RandomState`` without touching
        the global one (same numbers for the same seed).
    lengths_um : ndarray [639]
        ℓ_i = L/nseg of the dendritic segments, basal first (:func:`dendritic_lengths_um`).
    n_basal : int
        Number of basal segments (262 for the Hay cell).
    duration_ms : int
        Trial length T; spikes fall on integer times 0 … T−1 ms, at most one per channel per ms.

    Returns
    -------
    syn_idx : ndarray int32
        Channels 0..1277 (exc = segment index, inh = 639 + segment index).
    t_ms : ndarray float64
        Event times (ms), sorted; ties sorted by channel.
    draw : GeneratorDraw
        The hold interval K, smoothing σ and number of coarse samples chosen for this trial.
    """
    if rng is None:
        np.random.seed(seed)
        rs = np.random  # the module's functions draw from the legacy global RandomState
    else:
        rs = rng
    exc_rate, inh_rate, info = beniaguev_rates(rs, lengths_um, n_basal, duration_ms, config)
    # per bin and segment: p ~ Exponential(mean = rate), spike iff U(0, 1) < p; exc first, then inh
    p_exc = rs.exponential(exc_rate)
    exc = rs.rand(*exc_rate.shape) < p_exc
    p_inh = rs.exponential(inh_rate)
    inh = rs.rand(*inh_rate.shape) < p_inh
    syn_idx, t_ms = events_from_raster(np.concatenate([exc, inh], axis=0))
    draw = GeneratorDraw(duration_ms=int(duration_ms), seed=seed, config=config, **info)
    return syn_idx, t_ms, draw


@dataclass(frozen=True)
class PublishedGenerator:
    """The published generator as a named generator (:func:`beniaguev_inputs` with ``config``)."""

    config: GeneratorConfig = NMDA_CONFIG

    def draw(self, rng: np.random.RandomState, segments: dict, synapses: dict, duration_ms: int,
             ) -> tuple[np.ndarray, np.ndarray, dict]:
        """One trial from ``rng``: events sorted by time then channel, and the record attributes."""
        lengths_um, n_basal = dendritic_lengths_um(segments)
        syn, t, draw = beniaguev_inputs(None, lengths_um, n_basal, duration_ms, config=self.config, rng=rng)
        return syn, t, draw.attrs()


#: Named generators (``lfdeep-neuron generate --generator NAME``); :func:`register_generator` adds one.
GENERATORS: dict = {"published": PublishedGenerator(NMDA_CONFIG), "excited": PublishedGenerator(EXCITED_CONFIG)}


def register_generator(name: str, generator) -> None:
    """Make ``generator`` (an object with ``draw(rng, segments, synapses, duration_ms)``) known by ``name``."""
    if not callable(getattr(generator, "draw", None)):
        raise TypeError(f"generator {name!r} has no draw(rng, segments, synapses, duration_ms) method")
    GENERATORS[name] = generator


@dataclass
class InputDraw:
    """The ground-truth inputs of one trial: all events, the effective ones, dead synapses, attributes."""

    syn_idx: np.ndarray
    t_ms: np.ndarray
    effective_syn_idx: np.ndarray
    effective_t_ms: np.ndarray
    dead: np.ndarray
    attrs: dict


def draw_inputs(generator: str, seed: int, segments: dict, synapses: dict, duration_ms: int) -> InputDraw:
    """The inputs the ground truth gives a cell for one seed (what ``generate`` simulates).

    Draws from a private ``RandomState(seed)`` (numpy's global RNG is left alone) and drops the events of
    the synapses an event at t = 0 silences (:func:`effective_events`); drive a cell with
    ``effective_syn_idx, effective_t_ms``.

    Parameters
    ----------
    generator : str
        A key of :data:`GENERATORS` (``published``, ``excited``, ``volleys``, ...).
    seed : int
        The trial's seed (a corpus's simulation ``i`` uses ``simulate.sim_seed(dataset_seed, i)``).
    segments, synapses : dict
        The cell's segment and synapse tables (a record's ``segments`` / ``synapses`` groups, or the
        cell's ``segment_table()`` / ``synapse_table()``).
    duration_ms : int
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; known: {sorted(GENERATORS)}")
    syn, t, attrs = GENERATORS[generator].draw(np.random.RandomState(seed), segments, synapses, int(duration_ms))
    n_channels = int(np.asarray(synapses["syn_idx"]).size)
    eff_syn, eff_t, dead = effective_events(syn, t, n_channels)
    return InputDraw(syn, t, eff_syn, eff_t, dead, attrs)


# --------------------------------------------------------------------------------------------------
# events that can act (BIOPHYSICS.md §6.4)
# --------------------------------------------------------------------------------------------------

def dead_synapses(syn_idx: np.ndarray, t_ms: np.ndarray, n_channels: int = N_CHANNELS) -> np.ndarray:
    """Channels silenced for the trial: those receiving an event at exactly t = 0 ms.

    In the original synapses an event at t = 0 makes the release bookkeeping NaN (0/0), so that
    synapse never transmits again during the trial (BIOPHYSICS.md §6.4).

    Returns
    -------
    dead : ndarray bool [n_channels]
    """
    syn_idx = np.asarray(syn_idx)
    dead = np.zeros(n_channels, dtype=bool)
    dead[syn_idx[np.asarray(t_ms) == 0.0]] = True
    return dead


def effective_events(syn_idx: np.ndarray, t_ms: np.ndarray, n_channels: int = N_CHANNELS,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop every event of the dead synapses (:func:`dead_synapses`).

    Returns
    -------
    syn_idx, t_ms : the events that can act (order kept)
    dead : ndarray bool [n_channels]
    """
    syn_idx, t_ms = np.asarray(syn_idx), np.asarray(t_ms)
    dead = dead_synapses(syn_idx, t_ms, n_channels)
    keep = ~dead[syn_idx]
    return syn_idx[keep], t_ms[keep], dead


def events_by_channel(syn_idx, t_ms, weights=None, n_channels: int = N_CHANNELS) -> list:
    """Check an event list and group it as one entry per distinct (channel, weight).

    What a cell's ``set_input_events`` needs to make one NetCon per entry and queue its times.

    Parameters
    ----------
    syn_idx : int array [E]
        Channels 0..n_channels-1.
    t_ms : float array [E]
        Event times (ms, finite, >= 0).
    weights : float array [E] or scalar, optional
        Weights in units of the reference synapse (default 1; finite).

    Returns
    -------
    list of (channel int, weight float, times list[float] sorted)

    Raises
    ------
    ValueError
        Shapes, dtypes or values out of range (the message says which).
    """
    syn = np.asarray(syn_idx)
    t = np.asarray(t_ms, dtype=np.float64)
    if syn.ndim != 1 or t.shape != syn.shape:
        raise ValueError(f"syn_idx {syn.shape} and t_ms {t.shape} must be 1-D of equal length")
    if syn.size and not np.issubdtype(syn.dtype, np.integer):
        raise ValueError(f"syn_idx must be integers, got {syn.dtype}")
    w = np.ones_like(t) if weights is None else np.broadcast_to(
        np.asarray(weights, dtype=np.float64), t.shape).copy()
    if syn.size:
        if syn.min() < 0 or syn.max() >= n_channels:
            raise ValueError(f"syn_idx spans [{syn.min()}, {syn.max()}], outside 0..{n_channels - 1}")
        if not np.all(np.isfinite(t)) or t.min() < 0:
            raise ValueError("t_ms must be finite and >= 0")
        if not np.all(np.isfinite(w)):
            raise ValueError("weights must be finite")
    keys = np.stack([syn.astype(np.float64), w], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.lexsort((t, inverse))
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    return [(int(c), float(weight), t[order[bounds[k]:bounds[k + 1]]].tolist())
            for k, (c, weight) in enumerate(uniq)]


# --------------------------------------------------------------------------------------------------
# validation protocols
# --------------------------------------------------------------------------------------------------

def homogeneous_poisson(exc_rate_hz, inh_rate_hz, duration_ms: float, seed: int | None = None,
                        grid_ms: float | None = 1.0, n_dend: int = N_DEND_SEGMENTS,
                        t_start_ms: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous Poisson input on every channel.

    Parameters
    ----------
    exc_rate_hz, inh_rate_hz : float or ndarray [n_dend]
        Rate of each excitatory / inhibitory synapse (Hz).
    duration_ms : float
        Events fall in [t_start_ms, duration_ms).
    seed : int, optional
        Seed of a private ``numpy.random.Generator`` (the global RNG is left alone).
    grid_ms : float or None
        1.0 (default): at most one event per channel per bin, at the bin start (a Bernoulli draw
        with p = rate·grid, as the training data's integer-ms events). None: continuous times.
    t_start_ms : float
        First allowed time (use e.g. 1.0 to keep synapses clear of the t = 0 rule).

    Returns
    -------
    syn_idx int32, t_ms float64 : sorted by time, then channel
    """
    rng = np.random.default_rng(seed)
    rates_hz = np.concatenate([np.broadcast_to(np.asarray(exc_rate_hz, dtype=np.float64), (n_dend,)),
                               np.broadcast_to(np.asarray(inh_rate_hz, dtype=np.float64), (n_dend,))])
    if np.any(rates_hz < 0):
        raise ValueError("homogeneous_poisson: rates must be >= 0 Hz")
    span_ms = float(duration_ms) - float(t_start_ms)
    if span_ms <= 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float64)
    if grid_ms is not None:
        n_bins = int(np.floor(span_ms / grid_ms))
        p = rates_hz * 1e-3 * grid_ms
        if np.any(p > 1):
            raise ValueError(f"homogeneous_poisson: rate x grid exceeds one event per bin (max p = {p.max():.3g})")
        raster = rng.random((rates_hz.size, n_bins)) < p[:, None]
        syn_idx, bins = events_from_raster(raster)
        return syn_idx, t_start_ms + bins * grid_ms
    counts = rng.poisson(rates_hz * 1e-3 * span_ms)
    syn_idx = np.repeat(np.arange(rates_hz.size, dtype=np.int32), counts)
    t_ms = t_start_ms + rng.random(syn_idx.size) * span_ms
    order = np.lexsort((syn_idx, t_ms))
    return syn_idx[order], t_ms[order]


#: Hay et al. 2011 somatic step amplitudes (nA).
HAY_STEP_AMPS_NA = (0.619, 0.793, 1.507)


@dataclass(frozen=True)
class CurrentStep:
    """A current step into soma[0](0.5): ``amp_nA`` from ``delay_ms`` for ``dur_ms`` (Hay 2011: 700, 2000)."""

    amp_nA: float
    delay_ms: float = 700.0
    dur_ms: float = 2000.0

    def __post_init__(self):
        if self.delay_ms < 0 or self.dur_ms < 0:
            raise ValueError("CurrentStep: delay_ms and dur_ms must be >= 0")

    def current_nA(self, t_ms: np.ndarray) -> np.ndarray:
        """Injected current at times t_ms (nA)."""
        t_ms = np.asarray(t_ms, dtype=np.float64)
        on = (t_ms >= self.delay_ms) & (t_ms < self.delay_ms + self.dur_ms)
        return np.where(on, self.amp_nA, 0.0)

    def attrs(self) -> dict:
        """Root attributes of a record of this protocol (the reference naming)."""
        return {"protocol": "somatic_step_current_hay2011", "step_amp_nA": float(self.amp_nA),
                "step_delay_ms": float(self.delay_ms), "step_dur_ms": float(self.dur_ms)}


import lfdeep_neuron.data.volleys  # noqa: E402,F401  (registers the "volleys" generator)
