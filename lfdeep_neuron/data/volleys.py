"""Network-like input: the published background plus synchronous volleys (``--generator volleys``).

In a network a cell receives, besides its asynchronous background, volleys: many events from other cells
within a few milliseconds. The published generator never produces them (its excitatory events per 1-ms
bin stay below ~25), so a surrogate trained on it alone under-answers large volleys. This generator draws
the published background exactly as :func:`~lfdeep_neuron.data.inputs.beniaguev_inputs` does (same
RandomState, same numbers consumed first, so the background equals the published trial of the same seed)
and then adds volleys drawn from the same RandomState:

* onsets: the first after ``first_onset_ms``, then gaps uniform in ``gap_ms`` (integer ms);
* size M: log-uniform in ``size_range`` (events per volley);
* location: one of ``locations`` (segment groups of :func:`~lfdeep_neuron.surrogate.metrics.segment_groups`;
  ``apical`` = trunk + oblique + tuft, ``all`` = every synapse-bearing segment);
* sign: ``exc``, ``inh`` or ``mixed`` (each event excitatory with probability ``mixed_exc_fraction``);
* synchrony: every event at onset + an integer offset uniform in [0, width), width uniform in ``width_ms``;
* targets: synapses of the location's segments, uniformly, with replacement (several events on one
  synapse in one bin add up, as NetCon events do).

Events stay on the integer-ms grid of the published generator. Everything drawn is kept in the record
(``gen_volley_*`` attributes), so analyses can align on the volleys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lfdeep_neuron.data.inputs import NMDA_CONFIG, GeneratorConfig, PublishedGenerator, register_generator

__all__ = ["VolleyConfig", "VolleyGenerator", "LOCATIONS", "SIGNS", "location_channels", "volley_events"]

#: Volley locations (segment groups; ``apical`` joins trunk, oblique and tuft).
LOCATIONS = ("all", "basal", "apical", "oblique", "tuft")
#: Volley signs.
SIGNS = ("exc", "inh", "mixed")


@dataclass(frozen=True)
class VolleyConfig:
    """Numeric ranges of the volley generator."""

    background: GeneratorConfig = NMDA_CONFIG
    first_onset_ms: tuple = (150, 400)
    gap_ms: tuple = (40, 300)
    size_range: tuple = (10, 300)
    width_ms: tuple = (1, 5)
    locations: tuple = LOCATIONS
    location_p: tuple = (0.3, 0.2, 0.2, 0.15, 0.15)
    signs: tuple = SIGNS
    sign_p: tuple = (0.6, 0.2, 0.2)
    mixed_exc_fraction: float = 0.5


def location_channels(segments: dict, synapses: dict, location: str, kind: str) -> np.ndarray:
    """Channels of one synapse kind (``exc``/``inh``) on the segments of one location.

    Parameters
    ----------
    segments : dict
        Segment table (``sec_type``, ``parent_seg``, ``area_um2``; canonical order).
    synapses : dict
        Synapse table (``seg_idx``, ``syn_idx``, ``type_str`` or ``type`` 0 = exc / 1 = inh).
    location : str
        One of :data:`LOCATIONS`.
    kind : str
        ``exc`` or ``inh``.
    """
    from lfdeep_neuron.surrogate.metrics import segment_groups

    if location not in LOCATIONS:
        raise ValueError(f"volley location must be one of {LOCATIONS}, got {location!r}")
    groups = segment_groups(segments)
    names = {"all": ("basal", "apical_trunk", "oblique", "tuft"), "apical": ("apical_trunk", "oblique", "tuft"),
             "basal": ("basal",), "oblique": ("oblique",), "tuft": ("tuft",)}[location]
    segs = np.concatenate([groups[n] for n in names])
    seg_of = np.asarray(synapses["seg_idx"], dtype=np.int64)
    is_inh = np.asarray(synapses["type"]).astype(np.int64) == 1
    want = is_inh if kind == "inh" else ~is_inh
    return np.asarray(synapses["syn_idx"], dtype=np.int64)[want & np.isin(seg_of, segs)]


def volley_events(rs: np.random.RandomState, duration_ms: int, pools: dict, config: VolleyConfig,
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw the volleys of one trial.

    Parameters
    ----------
    rs : RandomState
        Consumed in a fixed order (onsets; then per volley: size, width, location, sign, targets, offsets).
    duration_ms : int
        Events fall in [1, duration_ms − 1] ms.
    pools : dict
        ``(location, kind) -> channel array`` for every location of the config and kind exc/inh.
    config : VolleyConfig

    Returns
    -------
    syn_idx int32, t_ms float64 : the volleys' events (unsorted)
    attrs : dict
        ``gen_volley_onset_ms``, ``_size``, ``_width_ms``, ``_location``, ``_sign`` (indices into the
        ``gen_volley_locations`` / ``gen_volley_signs`` lists), ``_n_exc``, ``_n_inh``.
    """
    onsets = []
    t = int(rs.randint(*config.first_onset_ms))
    while t < duration_ms - 25:
        onsets.append(t)
        t += int(rs.randint(*config.gap_ms))
    lo, hi = np.log(config.size_range[0]), np.log(config.size_range[1])
    syn_parts, t_parts, rows = [], [], []
    for onset in onsets:   # a few dozen volleys per trial: setup, not a hot path
        size = int(round(np.exp(rs.uniform(lo, hi))))
        width = int(rs.randint(config.width_ms[0], config.width_ms[1] + 1))
        loc = int(rs.choice(len(config.locations), p=config.location_p))
        sign = int(rs.choice(len(config.signs), p=config.sign_p))
        name = config.signs[sign]
        if name == "mixed":
            n_exc = int((rs.rand(size) < config.mixed_exc_fraction).sum())
        else:
            n_exc = size if name == "exc" else 0
        n_inh = size - n_exc
        targets = np.concatenate([
            rs.choice(pools[(config.locations[loc], "exc")], size=n_exc),
            rs.choice(pools[(config.locations[loc], "inh")], size=n_inh)]).astype(np.int32)
        times = onset + rs.randint(0, width, size=size)
        syn_parts.append(targets)
        t_parts.append(np.minimum(times, duration_ms - 1).astype(np.float64))
        rows.append((onset, size, width, loc, sign, n_exc, n_inh))
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
    attrs = {f"gen_volley_{k}": rows[:, i] for i, k in
             enumerate(("onset_ms", "size", "width_ms", "location", "sign", "n_exc", "n_inh"))}
    attrs["gen_volley_locations"] = np.array(config.locations, dtype="S")
    attrs["gen_volley_signs"] = np.array(config.signs, dtype="S")
    syn = np.concatenate(syn_parts) if syn_parts else np.zeros(0, np.int32)
    tt = np.concatenate(t_parts) if t_parts else np.zeros(0, np.float64)
    return syn, tt, attrs


@dataclass(frozen=True)
class VolleyGenerator:
    """The published background (:class:`PublishedGenerator`) plus volleys (:func:`volley_events`)."""

    config: VolleyConfig = VolleyConfig()

    def draw(self, rng: np.random.RandomState, segments: dict, synapses: dict, duration_ms: int,
             ) -> tuple[np.ndarray, np.ndarray, dict]:
        """One trial: events sorted by time then channel, and the record attributes of the draw."""
        syn_b, t_b, attrs = PublishedGenerator(self.config.background).draw(rng, segments, synapses, duration_ms)
        pools = {(loc, kind): location_channels(segments, synapses, loc, kind)
                 for loc in self.config.locations for kind in ("exc", "inh")}
        empty = [k for k, v in pools.items() if v.size == 0]
        if empty:
            raise ValueError(f"volley generator: no synapses at {empty[0][0]} ({empty[0][1]}) on this cell")
        syn_v, t_v, vattrs = volley_events(rng, int(duration_ms), pools, self.config)
        syn = np.concatenate([syn_b, syn_v]).astype(np.int32)
        t = np.concatenate([t_b, t_v])
        order = np.lexsort((syn, t))
        return syn[order], t[order], {**attrs, **vattrs}


register_generator("volleys", VolleyGenerator())
