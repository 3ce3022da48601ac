"""The detailed Hay et al. 2011 L5 pyramidal cell in the Beniaguev et al. 2021 configuration.

:class:`HayL5PC` builds the cell exactly as ``shared/hay/BIOPHYSICS.md`` §0.1 describes:

1. Import3d of the Neurolucida file into this Python object (soma, 84 dend, 109 apic, 1 axon);
2. ``nseg = 1 + 2 floor(L / 40 µm)`` on every section;
3. the imported axon replaced by two 30 µm x 1 µm stubs (axon[0](0) -> soma(0.5), axon[1](0) -> axon[0](1));
4. ``pas`` everywhere; 5. channels per section list, ek/ena, uniform densities, calcium shells;
6. apical Ih / Ca_LVAst per segment from path distances to the soma centre, last segment at the
   section end, values rounded to 10 decimals;
7. one excitatory (AMPA+NMDA) and one inhibitory (GABA_A) synapse at every dendritic segment centre.

Canonical addressing (docs/ARCHITECTURE.md): segments in the order soma[0], dend[0..83], apic[0..108],
axon[0], axon[1] (642 in all), by increasing x inside a section; channel c < 639 is the excitatory
synapse of dendritic segment c (= canonical segment c + 1), channel 639 + c its inhibitory synapse.
NEURON names the sections ``HayL5PC[k].apic[36]``; the tables report the canonical ``apic[36]``.

Units: mV, ms, nA, µm, µS, S/cm².
"""
from __future__ import annotations

import itertools
import math
import re
import weakref

import numpy as np

from lfdeep_neuron.hay import biophysics as bp
from lfdeep_neuron.hay.morphology import (
    MorphologyError,
    import_neurolucida,
    place_points,
    resolve_morphology_path,
    rotation_matrix,
)

__all__ = ["HayL5PC", "N_SEGMENTS", "N_DENDRITIC_SEGMENTS", "N_CHANNELS", "SPIKE_THRESHOLD_MV",
           "EXC_PARAMS", "INH_PARAMS", "MorphologyError"]

#: 642 segments: soma 1, basal 262, apical 377, axon 2.
N_SEGMENTS = 642
#: Dendritic (basal + apical) segments, each with one excitatory and one inhibitory synapse.
N_DENDRITIC_SEGMENTS = 639
#: Input channels: exc of each dendritic segment, then inh of each.
N_CHANNELS = 2 * N_DENDRITIC_SEGMENTS
#: Somatic spike = upward crossing of this voltage at soma(0.5) (NetCon threshold semantics).
SPIKE_THRESHOLD_MV = 0.0

#: AmpaNmdaSyn parameters (BIOPHYSICS.md §6.2): ms, µS, mV, mM.
EXC_PARAMS = dict(tau_r_AMPA=0.3, tau_d_AMPA=3.0, tau_r_NMDA=2.0, tau_d_NMDA=70.0,
                  gmax=0.0004, e=0.0, mg=1.0)
#: GabaASyn parameters (§6.3): ms, µS, mV.
INH_PARAMS = dict(tau_r=0.2, tau_d=8.0, gmax=0.001, e=-80.0)

AXON_STUB_L_UM = 30.0
AXON_STUB_DIAM_UM = 1.0
NSEG_PER_UM = 40.0          # nseg = 1 + 2 floor(L / 40 µm)

_SEC_NAME = re.compile(r"^(soma|dend|apic|axon)\[(\d+)\]$")
_KINDS = {"exc": 0, "inh": 1, 0: 0, 1: 1}


def _queue_callback(cell_ref):
    """FInitializeHandler callback that queues the events of the cell behind ``cell_ref`` (a weakref)."""
    def queue():
        cell = cell_ref()
        if cell is not None:
            cell._queue_events()
    return queue


def _nseg_rule(length_um: float) -> int:
    return 1 + 2 * int(math.floor(length_um / NSEG_PER_UM))


class HayL5PC:
    """One detailed Hay L5PC in NEURON.

    Parameters
    ----------
    morphology : str or Path, optional
        Neurolucida file (Hay's ``cell1.asc``); default ``$LFDEEP_HAY_MORPHOLOGY``.
    position_um : 3 floats
        Translation (µm) applied after the rotation; the soma centre ends at its file position plus
        ``position_um``. Default: the file's coordinates.
    rotation : None, 3 angles (rad, about x then y then z) or a 3x3 matrix
        Rotation about the soma centre. Placement moves the 3-D points only (lengths are kept).
    synapses : bool
        Create the 1278 synapse point processes (needed for synaptic input; they add CVODE states,
        so leave them out for current-clamp protocols that must match a synapse-free reference).

    Raises
    ------
    MorphologyError
        Missing, unreadable or non-Hay morphology file (the message names the file and the problem).

    Attributes
    ----------
    soma, dend, apic, axon : list of nrn.Section
    all : list of nrn.Section (import order) ; sections : list in canonical order
    section_names : list of str (canonical names, e.g. ``'apic[36]'``)
    segments : list of nrn.Segment in canonical order (642)
    exc_synapses, inh_synapses : lists of AmpaNmdaSyn / GabaASyn (639 each) if ``synapses``
    """

    _ids = itertools.count()

    def __init__(self, morphology=None, *, position_um=(0.0, 0.0, 0.0), rotation=None, synapses=True):
        from lfdeep_neuron import mechanisms

        mechanisms.load()
        from neuron import h

        self._h = h
        self._id = next(HayL5PC._ids)
        self.morphology_path = resolve_morphology_path(morphology)
        import_neurolucida(self, self.morphology_path)

        for sec in self.all:                                   # §1.2, before the axon is replaced
            sec.nseg = _nseg_rule(sec.L)
        self._replace_axon()
        self.somatic, self.axonal, self.basal, self.apical = [self.soma[0]], list(self.axon), \
            list(self.dend), list(self.apic)
        self._index_segments()
        self._record_file_points()
        self._insert_biophysics()

        self.exc_synapses, self.inh_synapses = [], []
        if synapses:
            self._insert_synapses()

        self.iclamps = []
        self._event_netcons = []          # NetCons queued at initialisation
        self._event_plan = []             # (NetCon, sorted event times in ms)
        self._fih = None
        self.position_um = np.zeros(3)
        self.rotation = None
        self.set_placement(position_um, rotation)

    # ------------------------------------------------------------------ construction

    def __repr__(self) -> str:                       # NEURON prefixes section names with this
        return f"HayL5PC[{self._id}]"

    __str__ = __repr__

    def _replace_axon(self) -> None:
        """Delete the imported axon; create the two 30-µm stubs (§1.3)."""
        h = self._h
        old = list(self.axon)
        for sec in old:
            h.delete_section(sec=sec)
        self.all = [s for s in self.all if s not in old]
        self.axon = [h.Section(name=f"axon[{i}]", cell=self) for i in range(2)]
        for sec in self.axon:
            sec.L = AXON_STUB_L_UM
            sec.diam = AXON_STUB_DIAM_UM
            sec.nseg = _nseg_rule(sec.L)
        self.axon[0].connect(self.soma[0](0.5), 0)
        self.axon[1].connect(self.axon[0](1), 0)
        self.all.extend(self.axon)

    def _index_segments(self) -> None:
        self.sections = [*self.soma, *self.dend, *self.apic, *self.axon]
        self.section_names = ([f"soma[{i}]" for i in range(len(self.soma))]
                              + [f"dend[{i}]" for i in range(len(self.dend))]
                              + [f"apic[{i}]" for i in range(len(self.apic))]
                              + [f"axon[{i}]" for i in range(len(self.axon))])
        self.section_types = ([b"soma"] * len(self.soma) + [b"dend"] * len(self.dend)
                              + [b"apic"] * len(self.apic) + [b"axon"] * len(self.axon))
        self._sec_index = {sec: i for i, sec in enumerate(self.sections)}
        self._name_index = {n: i for i, n in enumerate(self.section_names)}
        nseg = np.array([sec.nseg for sec in self.sections])
        self._seg_offset = np.concatenate([[0], np.cumsum(nseg)])
        self.segments = [seg for sec in self.sections for seg in sec]
        n_basal = int(nseg[1:1 + len(self.dend)].sum())
        n_apical = int(nseg[1 + len(self.dend):1 + len(self.dend) + len(self.apic)].sum())
        if len(self.segments) != N_SEGMENTS or n_basal + n_apical != N_DENDRITIC_SEGMENTS:
            raise MorphologyError(
                f"morphology file {self.morphology_path} gives {len(self.segments)} segments "
                f"({n_basal} basal, {n_apical} apical) under the nseg rule; the Hay L5PC has "
                f"{N_SEGMENTS} (262 basal, 377 apical)")

    def _record_file_points(self) -> None:
        """Keep the imported 3-D points (float64 copies of NEURON's float32) for placement."""
        self._file_points = []
        for sec in self.sections:
            n = int(sec.n3d())
            pts = np.array([[sec.x3d(i), sec.y3d(i), sec.z3d(i), sec.diam3d(i), sec.arc3d(i)]
                            for i in range(n)], dtype=np.float64).reshape(n, 5)
            self._file_points.append(pts)
        self.soma_centre_file_um = self._interp_points(0, np.array([0.5]))[0]

    def _interp_points(self, sec_i: int, x: np.ndarray) -> np.ndarray:
        """File-coordinate xyz (µm) at normalised arc positions ``x`` of section ``sec_i``."""
        pts = self._file_points[sec_i]
        if len(pts) == 0:
            return np.full((len(x), 3), np.nan)
        arc = pts[:, 4] / pts[-1, 4]
        return np.stack([np.interp(x, arc, pts[:, k]) for k in range(3)], axis=1)

    def _insert_biophysics(self) -> None:
        h = self._h
        lists = dict(somatic=self.somatic, axonal=self.axonal, basal=self.basal, apical=self.apical)
        for name, secs in lists.items():                           # §2.1
            p = bp.PASSIVE[name]
            for sec in secs:
                sec.insert("pas")
                sec.cm, sec.Ra = p["cm"], p["Ra"]
                for seg in sec:
                    seg.pas.g, seg.pas.e = p["g_pas"], p["e_pas"]
        for name, secs in lists.items():                           # §5.1, §4
            for sec in secs:
                for mech in bp.SECTION_MECHANISMS[name]:
                    sec.insert(mech)
                if name != "basal":
                    sec.ek, sec.ena = bp.ION_REVERSALS_MV["ek"], bp.ION_REVERSALS_MV["ena"]
                for param, value in bp.UNIFORM[name].items():
                    setattr(sec, param, value)
                for seg in sec:
                    seg.Ih.ehcn, seg.Ih.vshift = bp.IH_EHCN_MV, bp.IH_VSHIFT_MV
                for param, value in bp.CA_DYNAMICS.get(name, {}).items():
                    setattr(sec, f"{param}_CaDynamics_E2", value)

        # §5.2-5.4: apical distributions on path distance from soma(0.5) (= apic[0](0)).
        origin = self.soma[0](0.5)
        tips = [sec for sec in self.apic if len(sec.children()) == 0]
        self.max_apical_length_um = max(h.distance(origin, sec(1)) for sec in tips)
        for sec in self.apic:
            segs = list(sec)
            for i, seg in enumerate(segs):
                x = 1.0 if i == len(segs) - 1 else seg.x            # last segment: value at the end
                d = h.distance(origin, sec(x))
                seg.Ih.gIhbar = bp.round10(bp.ih_apical(d, self.max_apical_length_um))
                seg.Ca_LVAst.gCa_LVAstbar = bp.round10(bp.ca_lva_apical(d))

    def _insert_synapses(self) -> None:
        h = self._h
        for seg in self.segments[1:1 + N_DENDRITIC_SEGMENTS]:
            exc = h.AmpaNmdaSyn(seg)
            for k, v in EXC_PARAMS.items():
                setattr(exc, k, v)
            inh = h.GabaASyn(seg)
            for k, v in INH_PARAMS.items():
                setattr(inh, k, v)
            self.exc_synapses.append(exc)
            self.inh_synapses.append(inh)

    # ------------------------------------------------------------------ placement

    def set_placement(self, position_um=(0.0, 0.0, 0.0), rotation=None) -> None:
        """Move the cell: ``p' = R (p - soma_centre) + soma_centre + position_um`` (file coordinates p).

        Always relative to the imported points, so repeated calls do not accumulate round-off.
        Electrical properties are untouched up to NEURON's float32 storage of the moved points.
        """
        h = self._h
        position = np.asarray(position_um, dtype=np.float64)
        if position.shape != (3,) or not np.all(np.isfinite(position)):
            raise ValueError(f"position_um must be 3 finite numbers (µm), got {position_um!r}")
        rotation_matrix(rotation)                          # validate before touching anything
        identity = rotation is None and not np.any(position)
        if identity and not getattr(self, "_moved", False):
            self.position_um, self.rotation = position.copy(), None
            return                                         # the imported points are in place
        self.position_um, self.rotation = position.copy(), rotation
        self._moved = not identity
        for sec, pts in zip(self.sections, self._file_points):
            if len(pts) == 0:
                continue
            xyz = pts[:, :3] if identity else place_points(pts[:, :3], self.soma_centre_file_um,
                                                           self.position_um, rotation)
            for i in range(len(pts)):
                h.pt3dchange(i, xyz[i, 0], xyz[i, 1], xyz[i, 2], pts[i, 3], sec=sec)

    @property
    def soma_centre_um(self) -> np.ndarray:
        """Soma centre (soma(0.5)) after placement, µm."""
        return place_points(self.soma_centre_file_um, self.soma_centre_file_um, self.position_um,
                            self.rotation)

    # ------------------------------------------------------------------ addressing

    def section(self, name):
        """The NEURON section for a canonical name (``'apic[36]'``) or a section of this cell."""
        return self.sections[self._section_index(name)]

    def _section_index(self, section) -> int:
        if isinstance(section, str):
            if section not in self._name_index:
                m = _SEC_NAME.match(section)
                hint = "" if m else " (expected soma[0], dend[i], apic[i], axon[0] or axon[1])"
                raise KeyError(f"{self!r} has no section {section!r}{hint}")
            return self._name_index[section]
        try:
            return self._sec_index[section]
        except (KeyError, TypeError):
            raise KeyError(f"{section!r} is not a section of {self!r}") from None

    def segment_index(self, section, x: float) -> int:
        """Canonical index of the segment containing ``x`` in ``section`` (name or Section)."""
        si = self._section_index(section)
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"x must be in [0, 1], got {x}")
        nseg = int(self._seg_offset[si + 1] - self._seg_offset[si])
        return int(self._seg_offset[si] + min(int(x * nseg), nseg - 1))

    def channel(self, section, x: float, kind: str) -> int:
        """Input channel (0..1277) of the ``kind`` ('exc' or 'inh') synapse nearest (section, x)."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'exc' or 'inh', got {kind!r}")
        g = self.segment_index(section, x)
        if not 1 <= g <= N_DENDRITIC_SEGMENTS:
            raise ValueError(f"{self.section_names[self._section_index(section)]} carries no synapses "
                             "(only dend[*] and apic[*] segments do)")
        return (g - 1) + N_DENDRITIC_SEGMENTS * _KINDS[kind]

    def synapse(self, section, x: float, kind: str):
        """The point process (AmpaNmdaSyn / GabaASyn) of the channel at (section, x, kind): a NetCon target."""
        if not self.exc_synapses:
            raise RuntimeError(f"{self!r} was built with synapses=False")
        c = self.channel(section, x, kind)
        return self.synapse_by_channel(c)

    def synapse_by_channel(self, channel: int):
        """The point process of input channel ``channel`` (0..1277)."""
        if not self.exc_synapses:
            raise RuntimeError(f"{self!r} was built with synapses=False")
        if not 0 <= channel < N_CHANNELS:
            raise IndexError(f"channel {channel} outside 0..{N_CHANNELS - 1}")
        pool = self.exc_synapses if channel < N_DENDRITIC_SEGMENTS else self.inh_synapses
        return pool[channel % N_DENDRITIC_SEGMENTS]

    def spike_source(self):
        """The NetCon source of this cell's spikes: a pointer to v at soma(0.5).

        ``h.NetCon(cell.spike_source(), target, SPIKE_THRESHOLD_MV, delay_ms, weight)``;
        for ``pc.cell(gid, nc)`` use :meth:`spike_netcon`.
        """
        return self.soma[0](0.5)._ref_v

    def spike_netcon(self, target=None, *, delay_ms: float = 1.0, weight: float = 0.0):
        """A NetCon from soma(0.5) v with the spike threshold (0 mV, upward crossing)."""
        return self._h.NetCon(self.spike_source(), target, SPIKE_THRESHOLD_MV, delay_ms, weight,
                              sec=self.soma[0])

    # ------------------------------------------------------------------ inputs

    def add_iclamp(self, amp_nA: float, delay_ms: float, dur_ms: float, section="soma[0]", x: float = 0.5):
        """Add a current step (IClamp) at (section, x); returns it (kept alive by the cell)."""
        stim = self._h.IClamp(self.section(section)(x))
        stim.amp, stim.delay, stim.dur = float(amp_nA), float(delay_ms), float(dur_ms)
        self.iclamps.append(stim)
        return stim

    def set_input_events(self, syn_idx, t_ms, weights=None) -> None:
        """Queue input events on the synapse channels at every run's initialisation.

        Replaces any previous events. Each event is delivered at exactly ``t_ms`` (NetCon with
        delay 0, queued by a type-1 FInitializeHandler after the INITIAL blocks, BIOPHYSICS.md §6.1).
        All events are transmitted (deterministic synapses): drop the events of "dead" synapses
        before calling this if the t = 0 silencing of the original must be reproduced (§6.4).

        Parameters
        ----------
        syn_idx : int array [E]
            Channels 0..1277.
        t_ms : float array [E]
            Event times (ms, >= 0).
        weights : float array [E] or scalar, optional
            Weights in units of the reference synapse (default 1). Each distinct (channel, weight)
            pair gets one NetCon.
        """
        from lfdeep_neuron.data.inputs import events_by_channel

        h = self._h
        if not self.exc_synapses:
            raise RuntimeError(f"{self!r} was built with synapses=False; cannot take input events")
        plan = events_by_channel(syn_idx, t_ms, weights, N_CHANNELS)
        self._event_netcons, self._event_plan = [], []
        for c, weight, times in plan:
            nc = h.NetCon(None, self.synapse_by_channel(c))
            # NetCon.event(t) delivers at t whatever the delay; a positive delay only keeps
            # CoreNEURON's minimum-delay check satisfied (it counts these NetCons too).
            nc.delay = 1.0
            nc.weight[0] = weight
            self._event_netcons.append(nc)
            self._event_plan.append((nc, times))
        if self._fih is None:
            # A weak reference: a hoc object holding a bound method would keep the cell alive forever.
            self._fih = h.FInitializeHandler(1, _queue_callback(weakref.ref(self)))

    def clear_input_events(self) -> None:
        """Remove all queued input events."""
        self._event_netcons, self._event_plan = [], []

    def _queue_events(self) -> None:
        for nc, times in self._event_plan:
            for t in times:
                nc.event(t)

    @property
    def n_input_events(self) -> int:
        return sum(len(times) for _, times in self._event_plan)

    # ------------------------------------------------------------------ tables

    def section_table(self) -> dict:
        """Section table: the columns of a record's ``sections/`` group (one row per section)."""
        h = self._h
        parent, parent_x = [], []
        for sec in self.sections:
            pseg = sec.parentseg()
            if pseg is None:
                parent.append(b"")
                parent_x.append(np.nan)
            else:
                parent.append(self.section_names[self._sec_index[pseg.sec]].encode())
                parent_x.append(pseg.x)
        return {
            "L": np.array([sec.L for sec in self.sections]),
            "Ra": np.array([sec.Ra for sec in self.sections]),
            "n3d": np.array([int(sec.n3d()) for sec in self.sections], dtype=np.int64),
            "name": np.array([n.encode() for n in self.section_names]),
            "nseg": np.array([sec.nseg for sec in self.sections], dtype=np.int64),
            "orientation": np.array([h.section_orientation(sec=sec) for sec in self.sections]),
            "parent": np.array(parent),
            "parent_x": np.array(parent_x),
            "type": np.array(self.section_types),
        }

    def segment_table(self) -> dict:
        """Segment table: the columns of a record's ``segments/`` group, in canonical order.

        ``xyz_start``/``xyz_mid``/``xyz_end`` [S, 3] µm are the 3-D points interpolated along arc length
        at x - 0.5/nseg, x, x + 0.5/nseg, after placement (NaN for the axon stubs);
        ``dist_from_soma_um`` is the path distance from soma(0.5); ``parent_seg`` the previous segment
        of the section, else the parent's segment holding the connection point (-1 for the soma);
        ``mech/<param>`` every channel density and passive parameter (0 where absent).
        """
        h = self._h
        origin = self.soma[0](0.5)
        S = len(self.segments)
        xyz = np.full((3, S, 3), np.nan)
        parent_seg = np.empty(S, dtype=np.int32)
        sec_index = np.empty(S, dtype=np.int32)
        for si, sec in enumerate(self.sections):
            a, b = self._seg_offset[si], self._seg_offset[si + 1]
            nseg = b - a
            centres = (np.arange(nseg) + 0.5) / nseg
            for k, xs in enumerate((centres - 0.5 / nseg, centres, centres + 0.5 / nseg)):
                xyz[k, a:b] = self._interp_points(si, xs)
            sec_index[a:b] = si
            parent_seg[a + 1:b] = np.arange(a, b - 1)
            pseg = sec.parentseg()
            parent_seg[a] = -1 if pseg is None else self.segment_index(pseg.sec, pseg.x)
        xyz = place_points(xyz, self.soma_centre_file_um, self.position_um, self.rotation)

        table = {
            "area_um2": np.array([seg.area() for seg in self.segments]),
            "diam_um": np.array([seg.diam for seg in self.segments]),
            "dist_from_soma_um": np.array([h.distance(origin, seg) for seg in self.segments]),
            "length_um": np.array([seg.sec.L / seg.sec.nseg for seg in self.segments]),
            "name": np.array([self.section_names[i].encode() for i in sec_index]),
            "parent_seg": parent_seg,
            "sec_index": sec_index,
            "sec_type": np.array([self.section_types[i] for i in sec_index]),
            "x": np.array([seg.x for seg in self.segments]),
            "xyz_end": xyz[2],
            "xyz_mid": xyz[1],
            "xyz_start": xyz[0],
        }
        for param, needs in bp.MECH_TABLE_PARAMS:
            col = np.zeros(S)
            for si, sec in enumerate(self.sections):
                present = (needs is None or (h.ismembrane(needs, sec=sec) if needs.endswith("_ion")
                                             else sec.has_membrane(needs)))
                if present:
                    a = self._seg_offset[si]
                    col[a:a + sec.nseg] = (sec.Ra if param == "Ra"
                                           else [getattr(seg, param) for seg in sec])
            table[f"mech/{param}"] = col
        return table

    def synapse_table(self) -> dict:
        """Channel table: the columns of a record's ``synapses/`` group except the input-dependent ``dead``."""
        c = np.arange(N_CHANNELS, dtype=np.int32)
        kind = (c >= N_DENDRITIC_SEGMENTS).astype(np.int8)
        return {
            "seg_idx": (c % N_DENDRITIC_SEGMENTS + 1).astype(np.int32),
            "syn_idx": c,
            "type": kind,
            "type_str": np.where(kind == 0, b"exc", b"inh"),
        }
