"""Extracellular potentials (LFP) of Hay cells and their surrogates.

The surrogate predicts membrane *voltages*; an extracellular potential needs membrane *currents*.
Both are tied by the cable equation. With the passive axial coupling of a compartmental cell,
Kirchhoff's current law at segment ``k`` reads::

    i_m[k] = sum_j g[k, j] (v[j] - v[k])      (nA = µS · mV)

where ``i_m[k]`` is the net current leaving the cell through segment ``k`` (capacitive + ionic +
synaptic: everything NEURON reports in ``i_membrane_``, minus any electrode current injected
there) and ``g[k, j] = 1 / ri`` (µS) the axial conductance between neighbouring nodes. In matrix
form ``i_m = -L v`` with ``L`` the weighted graph Laplacian of the segment tree (:class:`AxialLaplacian`).
NEURON's tree also has *zero-area* nodes (the ``x = 1`` end of every section and the ``x = 0`` end of
the root section) that carry no membrane; their voltage follows from their neighbours, so they are
eliminated exactly by a Schur complement, leaving a Laplacian over the real segments only.
(A point process placed *on* such an end, x = 0 or 1, breaks that assumption; :class:`AxialLaplacian`
warns, and ``-L v`` then hands its current to the adjacent segments.)

Extracellular potentials are linear in the membrane currents: ``phi = M i_m`` with ``M``
[n_electrodes, S] (mV per nA) from LFPykit's volume-conductor models (``LineSourcePotential``
by default, ``PointSourcePotential`` optional) for a cell placed and rotated in space
(:class:`SegmentGeometry`, :class:`ElectrodeArray`). For a population, ``phi = sum_c M_c (-L v_c)``,
computed in one batched tensor contraction per step on any torch device (:class:`PopulationLFP`).

Caution (docs/ARCHITECTURE.md, "LFP"): ``L`` is a high-pass operator; uncorrelated errors in predicted voltages
are strongly amplified in the currents. Score any surrogate LFP against NEURON's.

Units: mV, nA, µS, MΩ, µm; extracellular conductivity in S/m.

Example
-------
>>> lap = AxialLaplacian.from_cell(cell)                          # needs NEURON, once per morphology
>>> geom = SegmentGeometry.from_table(cell.segment_table())       # or from a record's segments/ group
>>> probe = laminar_probe(n_contacts=16, spacing_um=100.0, x_um=50.0)
>>> cells = [geom.placed((0, 0, 0)), geom.placed((200, 0, 0), rotation=(0, 1.0, 0))]   # HayL5PC's placement
>>> pop = PopulationLFP.from_geometries(cells, probe, lap)
>>> phi_mV = pop.from_voltages(v_mV)                               # v_mV [N=2, S, T] -> [T, n_electrodes]

Orientation: every LFP this package returns is ``[T, E]`` (time first, one column per contact),
like NetPyNE's ``sim.allSimData['LFP']``; inputs keep the records' ``[N, S, T]`` layout.

During a run, :class:`PopulationLFPSink` (surrogates, an engine sink) and :class:`MembraneCurrentLFP`
(detailed NEURON cells, from ``i_membrane_``) accumulate the LFP step by step through the same
electrode mapping; the NetPyNE glue (``record_surrogate_lfp``) uses both.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from lfdeep_neuron.cosim.sinks import EngineSink
from lfdeep_neuron.neuron_callbacks import WeakMethodCall

__all__ = [
    "AxialLaplacian",
    "SegmentGeometry",
    "ElectrodeArray",
    "laminar_probe",
    "PopulationLFP",
    "PopulationLFPSink",
    "MembraneCurrentLFP",
]


# ----------------------------------------------------------------------------------------------
# Membrane currents from voltages: the axial-conductance Laplacian
# ----------------------------------------------------------------------------------------------

def _segment_graph(segments):
    """Axial conductances of the NEURON node tree that holds ``segments``.

    Returns ``(n_real, n_nodes, i, j, g_uS)``: nodes ``0 .. n_real-1`` are the given segments in the
    given order, nodes ``n_real ..`` the zero-area section ends; one edge (i, j, g) per axial resistor.
    """
    segments = list(segments)
    if not segments:
        raise ValueError("AxialLaplacian needs at least one segment")
    index = {}                  # (section, position in section) -> node index
    sections = []               # sections in order of first appearance
    for k, seg in enumerate(segments):
        sec = seg.sec
        segs_of_sec = list(sec)
        pos = int(min(math.floor(seg.x * sec.nseg), sec.nseg - 1))
        if not (0.0 < seg.x < 1.0) or segs_of_sec[pos] != seg:
            raise ValueError(f"segment #{k} ({sec.name()}({seg.x:g})) is not a segment centre; pass the "
                             "segments of each section as `for seg in sec`, not the 0/1 section ends")
        if (sec, pos) in index:
            raise ValueError(f"segment {sec.name()}({seg.x:g}) appears twice in the segment list")
        if pos == 0:
            sections.append(sec)
        index[(sec, pos)] = k
    n_real = len(segments)
    for sec in {seg.sec for seg in segments}:
        missing = [p for p in range(sec.nseg) if (sec, p) not in index]
        if missing:
            raise ValueError(f"section {sec.name()} has nseg={sec.nseg} but segment(s) {missing} are "
                             "missing from the segment list; pass every segment of the cell")

    n_nodes = n_real
    end1 = {}                   # section -> node of its zero-area x=1 end
    end0 = {}                   # root section -> node of its zero-area x=0 end
    for sec in sections:
        end1[sec] = n_nodes
        n_nodes += 1
    in_set = set(sections)

    def node_at(sec, x):
        """The node NEURON connects to at location x of sec (x in [0, 1])."""
        nonlocal n_nodes
        if x >= 1.0:
            return end1[sec]
        if x <= 0.0:
            parent = sec.parentseg()
            if parent is None:
                if sec not in end0:
                    end0[sec] = n_nodes
                    n_nodes += 1
                return end0[sec]
            return node_of_parent(sec, parent)
        pos = int(min(math.floor(x * sec.nseg), sec.nseg - 1))
        return index[(sec, pos)]

    def node_of_parent(child, parent_seg):
        psec = parent_seg.sec
        if psec not in in_set:
            raise ValueError(f"section {child.name()} is attached to {psec.name()}, whose segments are not "
                             "in the segment list; pass every segment of the cell")
        return node_at(psec, parent_seg.x)

    on_ends = [f"{pp.hname()} at {sec.name()}({x:g})" for sec in sections
               for x in ((0.0, 1.0) if sec.parentseg() is None else (1.0,))
               for pp in sec(x).point_processes()]
    if on_ends:
        warnings.warn(f"{len(on_ends)} point process(es) sit on zero-area section ends ({', '.join(on_ends[:3])}"
                      f"{', ...' if len(on_ends) > 3 else ''}): -L v attributes their currents to the "
                      "neighbouring segments (weighted by axial conductance), so it differs from "
                      "i_membrane_ there; place point processes at segment centres (0 < x < 1)", stacklevel=3)

    rows, cols, g = [], [], []

    def edge(a, b, ri_MOhm, what):
        if not (np.isfinite(ri_MOhm) and 0.0 < ri_MOhm < 1e29):
            raise ValueError(f"axial resistance of {what} is {ri_MOhm!r} MΩ; expected a finite positive value")
        rows.append(a)
        cols.append(b)
        g.append(1.0 / ri_MOhm)

    for sec in sections:
        if _section_orientation(sec) != 0.0:
            raise ValueError(f"section {sec.name()} is attached by its x=1 end; only the usual "
                             "child(0) -> parent(x) orientation is supported")
        segs = list(sec)
        first = index[(sec, 0)]
        edge(first, node_at(sec, 0.0), segs[0].ri(), f"{sec.name()}({segs[0].x:g})")
        for p in range(1, len(segs)):
            edge(index[(sec, p)], index[(sec, p - 1)], segs[p].ri(), f"{sec.name()}({segs[p].x:g})")
        edge(end1[sec], index[(sec, len(segs) - 1)], sec(1.0).ri(), f"{sec.name()}(1)")
    return n_real, n_nodes, np.array(rows), np.array(cols), np.array(g, dtype=np.float64)


def _section_orientation(sec) -> float:
    """Which end of ``sec`` (0 or 1) attaches to its parent (NEURON ``section_orientation``)."""
    from neuron import h

    return float(h.section_orientation(sec=sec))


def _laplacian(n, rows, cols, g):
    """Weighted graph Laplacian (n x n, CSR) of undirected edges (rows[e], cols[e], g[e])."""
    off = sp.coo_matrix((np.concatenate([-g, -g]), (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
                        shape=(n, n)).tocsr()
    deg = -np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(deg)).tocsr()


class AxialLaplacian:
    """Axial-conductance Laplacian ``L`` (µS) of a cell's segments: membrane currents ``i_m = -L v``.

    ``L`` is symmetric, [S, S] over the real segments in the order given (for a Hay cell the canonical
    segment order), with zero row sums (axial currents only move charge between segments). It is built
    once from NEURON (:meth:`from_cell`, :meth:`from_segments`) and can be stored as plain arrays
    (:meth:`to_arrays`, :meth:`save`) so that checkpoints and segment tables carry it without NEURON.

    ``currents(v)`` equals NEURON's ``i_membrane_`` (fast_imem, nA) at every segment when ``v`` are
    the voltages at the same instant, except at segments with an ``ELECTRODE_CURRENT`` point process
    (IClamp, SEClamp): there ``i_membrane_ = -L v + i_electrode``. Synaptic point processes are true
    membrane currents and are included in both.

    Parameters
    ----------
    matrix : scipy.sparse matrix or ndarray [S, S]
        The Laplacian in µS.
    names : sequence of str, optional
        Segment names (e.g. ``"apic[36](0.5)"``), kept for reference and checks.
    """

    def __init__(self, matrix, names: Sequence[str] | None = None):
        mat = sp.csr_matrix(matrix, dtype=np.float64)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"Laplacian must be square, got shape {mat.shape}")
        if names is not None and len(names) != mat.shape[0]:
            raise ValueError(f"{len(names)} segment names for a {mat.shape[0]}x{mat.shape[0]} Laplacian")
        self.matrix = mat
        self.names = None if names is None else [str(n) for n in names]
        self._torch_cache = {}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_segments(cls, segments) -> "AxialLaplacian":
        """Build ``L`` from NEURON segments (every segment of a cell, in the wanted order).

        Uses ``seg.ri()`` (MΩ) of every segment and of every section's x=1 end, then eliminates the
        zero-area section ends by a Schur complement: with real nodes R and zero-area nodes Z,
        ``(L v)_Z = 0`` gives ``v_Z = -L_ZZ^-1 L_ZR v_R`` and ``L = L_RR - L_RZ L_ZZ^-1 L_ZR``.
        """
        segments = list(segments)
        n_real, n_nodes, rows, cols, g = _segment_graph(segments)
        full = _laplacian(n_nodes, rows, cols, g)
        l_rr = full[:n_real, :n_real]
        if n_nodes > n_real:
            l_rz = full[:n_real, n_real:].tocsc()
            l_zz = full[n_real:, n_real:].tocsc()
            l_zr = full[n_real:, :n_real].tocsc()
            x = spla.spsolve(l_zz, l_zr)                       # L_ZZ^-1 L_ZR
            x = sp.csr_matrix(x) if not sp.issparse(x) else x.tocsr()
            mat = (l_rr - l_rz @ x).tocsr()
        else:
            mat = l_rr.tocsr()
        mat = 0.5 * (mat + mat.T)                               # exact symmetry against round-off
        mat.eliminate_zeros()
        names = [f"{s.sec.name()}({s.x:.6g})" for s in segments]
        return cls(mat, names=names)

    @classmethod
    def from_cell(cls, cell) -> "AxialLaplacian":
        """Build ``L`` for a cell object with ``.segments`` (e.g. ``HayL5PC``) or a list of segments."""
        segments = getattr(cell, "segments", cell)
        return cls.from_segments(segments)

    # ---- storage -------------------------------------------------------------------------------
    def to_arrays(self) -> dict:
        """Plain numpy arrays (COO, µS) for a checkpoint or an HDF5 group; inverse of :meth:`from_arrays`."""
        coo = self.matrix.tocoo()
        out = {"laplacian_row": coo.row.astype(np.int32), "laplacian_col": coo.col.astype(np.int32),
               "laplacian_uS": coo.data.astype(np.float64),
               "laplacian_shape": np.array(self.matrix.shape, dtype=np.int64)}
        if self.names is not None:
            out["laplacian_names"] = np.array(self.names, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping) -> "AxialLaplacian":
        """Rebuild from the dict of :meth:`to_arrays` (e.g. loaded from ``.npz``, HDF5 or a checkpoint)."""
        need = ("laplacian_row", "laplacian_col", "laplacian_uS", "laplacian_shape")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise KeyError(f"Laplacian arrays lack {missing}; expected the keys of AxialLaplacian.to_arrays()")
        shape = tuple(int(s) for s in np.asarray(arrays["laplacian_shape"]))
        mat = sp.coo_matrix((np.asarray(arrays["laplacian_uS"], dtype=np.float64),
                             (np.asarray(arrays["laplacian_row"]), np.asarray(arrays["laplacian_col"]))),
                            shape=shape)
        names = arrays.get("laplacian_names")
        names = None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return cls(mat.tocsr(), names=names)

    def save(self, path) -> Path:
        """Write the arrays of :meth:`to_arrays` to an ``.npz`` file."""
        path = Path(path)
        np.savez(path, **self.to_arrays())
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path) -> "AxialLaplacian":
        """Read a Laplacian written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as f:
            return cls.from_arrays({k: f[k] for k in f.files})

    # ---- use -------------------------------------------------------------------------------------
    @property
    def n_segments(self) -> int:
        return self.matrix.shape[0]

    def dense(self) -> np.ndarray:
        """``L`` as a dense float64 array [S, S] (µS)."""
        return self.matrix.toarray()

    def currents(self, v_mV, axis: int | None = None):
        """Membrane currents ``i_m = -L v`` (nA) from voltages (mV).

        Parameters
        ----------
        v_mV : ndarray or torch.Tensor
            Voltages of every segment: [S], [S, T] or a batch of cells [N, S, T]. The segment axis is
            axis 0 for 1-D/2-D input and axis 1 for 3-D input, unless ``axis`` says otherwise.
        axis : int, optional
            The segment axis, to override the default.

        Returns
        -------
        Same type and shape as ``v_mV``: outward membrane current of each segment (nA). Each column
        is shifted by its mean before the product (``L 1 = 0``), which changes nothing mathematically
        and avoids cancellation at -70 mV offsets in float32.
        """
        if axis is None:
            if v_mV.ndim not in (1, 2, 3):
                raise ValueError(f"voltages must be [S], [S, T] or [N, S, T]; got shape {tuple(v_mV.shape)}")
            axis = 1 if v_mV.ndim == 3 else 0
        s = self.n_segments
        if v_mV.shape[axis] != s:
            raise ValueError(f"voltages have {v_mV.shape[axis]} segments on axis {axis} "
                             f"(shape {tuple(v_mV.shape)}); this Laplacian has {s}")
        if _is_torch(v_mV):
            import torch

            key = (v_mV.device, v_mV.dtype)
            if key not in self._torch_cache:                  # one dense copy per device and dtype
                self._torch_cache[key] = torch.as_tensor(self.dense(), dtype=v_mV.dtype, device=v_mV.device)
            lap = self._torch_cache[key]
            v = torch.movedim(v_mV, axis, -1)
            v = v - v.mean(dim=-1, keepdim=True)
            return torch.movedim(-(v @ lap), -1, axis)          # L symmetric: v L = (L v)^T
        v = np.moveaxis(np.asarray(v_mV), axis, 0)
        shape = v.shape
        flat = v.reshape(s, -1).astype(np.float64, copy=False)
        flat = flat - flat.mean(axis=0, keepdims=True)
        i = -(self.matrix @ flat)
        return np.moveaxis(i.reshape(shape), 0, axis).astype(np.result_type(v_mV.dtype, np.float32), copy=False)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


# ----------------------------------------------------------------------------------------------
# Geometry: segments as line sources in space
# ----------------------------------------------------------------------------------------------

def _as_str_array(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()])


@dataclass(eq=False)
class SegmentGeometry:
    """Start/end points and diameters of a cell's segments, in µm (the input LFPykit needs).

    Build it from a segment table (:meth:`from_table`: a record's ``segments/`` group, a checkpoint's
    table, or ``HayL5PC.segment_table()``), then place it in the network with :meth:`placed`, which
    uses the same rigid motion as ``HayL5PC(position_um=..., rotation=...)``::

        p' = R (p - c) + c + position_um,    c = soma centre (xyz_mid of the soma segment)

    so that a surrogate cell and a detailed cell given the same placement occupy the same space.

    Attributes
    ----------
    xyz_start_um, xyz_end_um : ndarray [S, 3]
        Segment end points (µm).
    diam_um : ndarray [S]
        Segment diameters (µm).
    names : ndarray [S] of str, optional
        Section names of the segments (``"apic[36]"``), if known.
    soma_centre_um : ndarray [3]
        The centre ``c`` of rotations (µm).
    """

    xyz_start_um: np.ndarray
    xyz_end_um: np.ndarray
    diam_um: np.ndarray
    names: np.ndarray | None = None
    soma_centre_um: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self):
        self.xyz_start_um = np.asarray(self.xyz_start_um, dtype=np.float64)
        self.xyz_end_um = np.asarray(self.xyz_end_um, dtype=np.float64)
        self.diam_um = np.asarray(self.diam_um, dtype=np.float64).ravel()
        self.soma_centre_um = np.asarray(self.soma_centre_um, dtype=np.float64).ravel()
        s = self.diam_um.shape[0]
        for name in ("xyz_start_um", "xyz_end_um"):
            if getattr(self, name).shape != (s, 3):
                raise ValueError(f"{name} must be [S, 3] with S = {s} (len(diam_um)); "
                                 f"got {getattr(self, name).shape}")
        if self.soma_centre_um.shape != (3,):
            raise ValueError(f"soma_centre_um must be 3 numbers, got {self.soma_centre_um.shape}")
        bad = ~(np.isfinite(self.xyz_start_um).all(1) & np.isfinite(self.xyz_end_um).all(1)
                & np.isfinite(self.diam_um) & (self.diam_um > 0))
        if bad.any():
            which = np.flatnonzero(bad)[:5].tolist()
            raise ValueError(f"{bad.sum()} segment(s) lack finite geometry or a positive diameter "
                             f"(first indices {which}); fill missing points first (SegmentGeometry.from_table "
                             "does this for segments without 3-D points)")
        if self.names is not None:
            self.names = _as_str_array(self.names)
            if self.names.shape[0] != s:
                raise ValueError(f"{self.names.shape[0]} names for {s} segments")

    @property
    def n_segments(self) -> int:
        return self.diam_um.shape[0]

    @classmethod
    def from_table(cls, table: Mapping, stub_direction=None) -> "SegmentGeometry":
        """Geometry from a segment table (keys ``xyz_start``, ``xyz_end``, ``diam_um``, ``sec_type``,
        ``parent_seg``, ``length_um``; ``name`` optional).

        Segments without 3-D points (NaN rows: the Hay axon stubs ``axon[0]``, ``axon[1]``, 30 µm each)
        are given a straight path: each starts where its parent connects (the soma centre if the parent
        is the soma segment, else the parent's end point) and runs ``length_um`` along
        ``stub_direction``. The default direction is opposite to the apical dendrite (from the mean
        apical segment midpoint through the soma centre), i.e. the axon initial segment leaves the soma
        at the base of the cell, as in a real L5 pyramidal cell; ``-y`` if the cell has no apical
        segments. Because the default is computed from the points themselves it turns with the cell.

        Parameters
        ----------
        table : mapping of arrays
            The segment table (canonical order); bytes or str names both work.
        stub_direction : array-like [3], optional
            Direction (any length) for segments without 3-D points.
        """
        need = ("xyz_start", "xyz_end", "diam_um", "sec_type", "parent_seg")
        missing = [k for k in need if k not in table]
        if missing:
            raise KeyError(f"segment table lacks {missing}; expected the columns of a record's segments/ group")
        start = np.array(table["xyz_start"], dtype=np.float64)
        end = np.array(table["xyz_end"], dtype=np.float64)
        diam = np.asarray(table["diam_um"], dtype=np.float64)
        kind = _as_str_array(table["sec_type"])
        parent = np.asarray(table["parent_seg"], dtype=np.int64)
        s = diam.shape[0]
        if start.shape != (s, 3) or end.shape != (s, 3) or kind.shape != (s,) or parent.shape != (s,):
            raise ValueError(f"segment table columns disagree on the number of segments ({s} diameters; "
                             f"xyz_start {start.shape}, xyz_end {end.shape}, sec_type {kind.shape}, "
                             f"parent_seg {parent.shape})")
        soma = np.flatnonzero(kind == "soma")
        if soma.size == 0:
            raise ValueError("segment table has no segment of sec_type 'soma'")
        if "xyz_mid" in table and np.isfinite(np.asarray(table["xyz_mid"], dtype=np.float64)[soma[0]]).all():
            centre = np.asarray(table["xyz_mid"], dtype=np.float64)[soma[0]]
        else:
            centre = 0.5 * (start[soma[0]] + end[soma[0]])

        todo = ~(np.isfinite(start).all(1) & np.isfinite(end).all(1))
        if todo.any():
            if "length_um" not in table:
                raise KeyError("segment table has segments without 3-D points but no length_um column "
                               "to lay them out")
            length = np.asarray(table["length_um"], dtype=np.float64)
            if stub_direction is None:
                mids = 0.5 * (start + end)
                apical = (kind == "apic") & ~todo
                axis = mids[apical].mean(0) - centre if apical.any() else np.array([0.0, 1.0, 0.0])
                stub_direction = -axis
            u = np.asarray(stub_direction, dtype=np.float64)
            if u.shape != (3,) or not np.isfinite(u).all() or np.linalg.norm(u) == 0:
                raise ValueError(f"stub_direction must be 3 finite numbers, not all 0; got {stub_direction!r}")
            u = u / np.linalg.norm(u)
            while todo.any():                               # parents first, in as many passes as needed
                progress = False
                for k in np.flatnonzero(todo):
                    p = parent[k]
                    if p < 0 or todo[p]:
                        continue
                    start[k] = centre if kind[p] == "soma" else end[p]
                    end[k] = start[k] + length[k] * u
                    todo[k] = False
                    progress = True
                if not progress:
                    raise ValueError(f"cannot lay out segments {np.flatnonzero(todo)[:5].tolist()} without 3-D "
                                     "points: their parent segments have no geometry either")
        names = table.get("name")
        return cls(start, end, diam, names=None if names is None else _as_str_array(names),
                   soma_centre_um=centre)

    @classmethod
    def from_cell(cls, cell, stub_direction=None) -> "SegmentGeometry":
        """Geometry of a NEURON cell object with ``segment_table()`` (e.g. ``HayL5PC``), as placed."""
        return cls.from_table(cell.segment_table(), stub_direction=stub_direction)

    def placed(self, position_um=(0.0, 0.0, 0.0), rotation=None) -> "SegmentGeometry":
        """A copy moved by the rigid motion ``p' = R (p - c) + c + position_um`` (HayL5PC's convention).

        Parameters
        ----------
        position_um : array-like [3]
            Translation (µm) applied after the rotation.
        rotation : None, 3 angles (rad) or a 3x3 matrix
            Angles ``(rx, ry, rz)`` rotate about x, then y, then z (``R = Rz Ry Rx``) around the soma
            centre; NetPyNE-style random rotation of a pyramidal cell about its apical axis is
            ``(0, angle, 0)``.
        """
        from lfdeep_neuron.hay.morphology import rotation_matrix

        r = rotation_matrix(rotation)
        pos = np.asarray(position_um, dtype=np.float64)
        if pos.shape != (3,) or not np.isfinite(pos).all():
            raise ValueError(f"position_um must be 3 finite numbers (µm), got {position_um!r}")
        c = self.soma_centre_um
        move = lambda p: (p - c) @ r.T + c + pos              # noqa: E731
        return SegmentGeometry(move(self.xyz_start_um), move(self.xyz_end_um), self.diam_um.copy(),
                               names=self.names, soma_centre_um=c + pos)

    def to_lfpykit(self):
        """An ``lfpykit.CellGeometry`` of these segments."""
        from lfpykit import CellGeometry

        a, b = self.xyz_start_um, self.xyz_end_um
        return CellGeometry(x=np.stack([a[:, 0], b[:, 0]], 1), y=np.stack([a[:, 1], b[:, 1]], 1),
                            z=np.stack([a[:, 2], b[:, 2]], 1), d=self.diam_um.copy())


# ----------------------------------------------------------------------------------------------
# Electrodes and the current-to-potential mapping
# ----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class ElectrodeArray:
    """Point contacts in space and the medium around them.

    Attributes
    ----------
    xyz_um : ndarray [E, 3]
        Contact positions (µm).
    sigma_S_per_m : float
        Extracellular conductivity (S/m) of the infinite homogeneous medium; 0.3 S/m is LFPykit's
        default (cortical grey matter).
    labels : list of str, optional
        One name per contact (e.g. ``"ch00"``).
    """

    xyz_um: np.ndarray
    sigma_S_per_m: float = 0.3
    labels: list | None = None

    def __post_init__(self):
        self.xyz_um = np.atleast_2d(np.asarray(self.xyz_um, dtype=np.float64))
        if self.xyz_um.ndim != 2 or self.xyz_um.shape[1] != 3 or self.xyz_um.shape[0] == 0:
            raise ValueError(f"electrode positions must be [E, 3] µm with E >= 1, got {self.xyz_um.shape}")
        if not np.isfinite(self.xyz_um).all():
            raise ValueError("electrode positions must be finite")
        if not (np.isfinite(self.sigma_S_per_m) and self.sigma_S_per_m > 0):
            raise ValueError(f"sigma_S_per_m must be a positive conductivity (S/m), got {self.sigma_S_per_m!r}")
        if self.labels is None:
            self.labels = [f"ch{k:02d}" for k in range(self.n_electrodes)]
        elif len(self.labels) != self.n_electrodes:
            raise ValueError(f"{len(self.labels)} labels for {self.n_electrodes} electrodes")

    @property
    def n_electrodes(self) -> int:
        return self.xyz_um.shape[0]

    def mapping(self, geometry: SegmentGeometry, method: str = "linesource") -> np.ndarray:
        """The linear map M [E, S] (mV per nA) from membrane currents of ``geometry``'s segments.

        Parameters
        ----------
        geometry : SegmentGeometry
            The cell as placed in space.
        method : {"linesource", "pointsource"}
            ``lfpykit.LineSourcePotential`` (each segment a line of uniform current density: the
            default, accurate near the cell) or ``lfpykit.PointSourcePotential`` (each segment's
            current at its midpoint: cruder close to the cell).
        """
        from lfpykit import LineSourcePotential, PointSourcePotential

        models = {"linesource": LineSourcePotential, "pointsource": PointSourcePotential}
        if method not in models:
            raise ValueError(f"unknown LFP method {method!r}; choose one of {sorted(models)}")
        if not isinstance(geometry, SegmentGeometry):
            raise TypeError(f"geometry must be a SegmentGeometry, got {type(geometry).__name__}")
        cell = geometry.to_lfpykit()
        x, y, z = self.xyz_um.T
        model = models[method](cell, x=x.copy(), y=y.copy(), z=z.copy(), sigma=float(self.sigma_S_per_m))
        return np.asarray(model.get_transformation_matrix(), dtype=np.float64)


def laminar_probe(n_contacts: int = 16, spacing_um: float = 100.0, x_um: float = 50.0,
                  z_um: float = 0.0, first_um: float = -300.0, axis: str = "y",
                  sigma_S_per_m: float = 0.3) -> ElectrodeArray:
    """A straight laminar probe: ``n_contacts`` contacts ``spacing_um`` apart along one axis.

    The default spans the Hay L5PC as it lies in its morphology file (apical dendrite along +y,
    tuft ~1.2 mm above the soma): 16 contacts at y = -300, -200, ..., 1200 µm, 50 µm beside the
    soma in x.

    Parameters
    ----------
    n_contacts : int
        Number of contacts (>= 1).
    spacing_um : float
        Distance between neighbouring contacts (µm, > 0).
    x_um, z_um : float
        Position of the probe's shaft in the two other coordinates (µm); with ``axis="x"`` or
        ``"z"`` they are the coordinates of the remaining axes in (y, z) or (x, y) order.
    first_um : float
        Coordinate of the first contact along ``axis`` (µm).
    axis : {"x", "y", "z"}
        Direction of the shaft.
    sigma_S_per_m : float
        Extracellular conductivity (S/m).
    """
    if int(n_contacts) != n_contacts or n_contacts < 1:
        raise ValueError(f"n_contacts must be a positive integer, got {n_contacts!r}")
    if not spacing_um > 0:
        raise ValueError(f"spacing_um must be > 0, got {spacing_um!r}")
    if axis not in ("x", "y", "z"):
        raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")
    along = first_um + spacing_um * np.arange(int(n_contacts), dtype=np.float64)
    k = "xyz".index(axis)
    others = [i for i in range(3) if i != k]
    xyz = np.empty((int(n_contacts), 3))
    xyz[:, k] = along
    xyz[:, others[0]] = x_um
    xyz[:, others[1]] = z_um
    return ElectrodeArray(xyz, sigma_S_per_m=sigma_S_per_m)


# ----------------------------------------------------------------------------------------------
# Population LFP on a torch device
# ----------------------------------------------------------------------------------------------

class PopulationLFP:
    """Extracellular potential of a population: ``phi = sum_c M_c (-L v_c)`` (mV), batched on a device.

    All cells share one morphology, hence one Laplacian ``L`` [S, S]; each has its own mapping
    ``M_c`` [E, S] from its placement. The voltage-to-potential transfer ``K_c = -M_c L`` is
    precomputed in float64 and kept as one [E, N*S] matrix, so a step is a single matrix-vector
    product over all cells and segments (no loop over cells).

    Under MPI each rank holds its own cells; the network LFP is the sum of the ranks' results
    (e.g. ``pc.allreduce`` or ``mpi4py`` ``Allreduce``), which the caller does.

    Parameters
    ----------
    mappings : array [N, E, S], [E, S] or sequence of [E, S]
        Current-to-potential maps (mV per nA), one per cell (:meth:`ElectrodeArray.mapping`).
    laplacian : AxialLaplacian or array [S, S], optional
        Needed for voltages (:meth:`step`, :meth:`from_voltages`); not for :meth:`from_currents`.
    device : str or torch.device
        Where the maps live and the sums are computed ("cpu", "cuda", ...).
    dtype : torch.dtype
        Computation dtype. Default float64: a single cell's LFP is a small residual of large terms,
        and float32 loses ~2e-4 of it (relative to the peak) even though each cell's voltages are
        centred before the product (``K_c 1 = 0``; without centring float32 loses ~2e-3).
    """

    def __init__(self, mappings, laplacian=None, device="cpu", dtype=None):
        import torch

        if isinstance(mappings, (list, tuple)):
            maps = np.stack([np.asarray(m, dtype=np.float64) for m in mappings])
        else:
            maps = np.asarray(mappings.detach().cpu() if _is_torch(mappings) else mappings, dtype=np.float64)
            if maps.ndim == 2:
                maps = maps[None]
        if maps.ndim != 3 or 0 in maps.shape:
            raise ValueError(f"mappings must be [N, E, S] (or one [E, S]), got shape {maps.shape}")
        n, e, s = maps.shape
        self.device = torch.device(device)
        self.dtype = torch.float64 if dtype is None else dtype

        def to_device(a):                                       # [N, E, S] -> [E, N, S] on the device
            return torch.as_tensor(np.ascontiguousarray(a.transpose(1, 0, 2)), dtype=self.dtype,
                                   device=self.device)

        self._mapping = to_device(maps)                          # mV / nA
        self._transfer = None                                    # mV / mV
        if laplacian is not None:
            lap = laplacian if isinstance(laplacian, AxialLaplacian) else AxialLaplacian(laplacian)
            if lap.n_segments != s:
                raise ValueError(f"Laplacian has {lap.n_segments} segments but the mappings have {s}")
            k = -(lap.matrix @ maps.reshape(n * e, s).T).T.reshape(n, e, s)   # -(M L), L symmetric
            self._transfer = to_device(k)

    @classmethod
    def from_geometries(cls, geometries: Sequence[SegmentGeometry], electrodes: ElectrodeArray,
                        laplacian=None, method: str = "linesource", device="cpu", dtype=None,
                        progress: bool | None = None) -> "PopulationLFP":
        """Population of placed cells (one :class:`SegmentGeometry` each) seen by ``electrodes``.

        LFPykit builds each cell's map (5-15 ms per cell for 16 contacts and 642 segments on this machine);
        ``progress`` shows a tqdm bar (default: on for more than 100 cells).
        """
        if isinstance(geometries, SegmentGeometry):
            geometries = [geometries]
        geometries = list(geometries)
        if len(geometries) == 0:
            raise ValueError("PopulationLFP needs at least one cell geometry")
        sizes = {g.n_segments for g in geometries}
        if len(sizes) != 1:
            raise ValueError(f"all cells must have the same segments; got segment counts {sorted(sizes)}")
        if progress is None:
            progress = len(geometries) > 100
        if progress:
            from tqdm import tqdm

            geometries = tqdm(geometries, desc="LFP mappings", unit="cell", leave=False)
        maps = [electrodes.mapping(g, method=method) for g in geometries]
        return cls(maps, laplacian=laplacian, device=device, dtype=dtype)

    @classmethod
    def from_cells(cls, cells, electrodes: ElectrodeArray, laplacian=None, method: str = "linesource",
                   device="cpu", dtype=None) -> "PopulationLFP":
        """Population of NEURON cells with ``segment_table()`` and ``segments`` (e.g. ``HayL5PC``),
        each where it was placed; the Laplacian is built from the first cell unless given."""
        cells = list(cells)
        if not cells:
            raise ValueError("PopulationLFP.from_cells needs at least one cell")
        if laplacian is None:
            laplacian = AxialLaplacian.from_cell(cells[0])
        geoms = [SegmentGeometry.from_cell(c) for c in cells]
        return cls.from_geometries(geoms, electrodes, laplacian, method=method, device=device, dtype=dtype)

    @property
    def n_cells(self) -> int:
        return self._mapping.shape[1]

    @property
    def n_electrodes(self) -> int:
        return self._mapping.shape[0]

    @property
    def n_segments(self) -> int:
        return self._mapping.shape[2]

    @property
    def mapping(self):
        """Current-to-potential maps ``M`` [N, E, S] (mV per nA), a view on the device."""
        return self._mapping.permute(1, 0, 2)

    @property
    def transfer(self):
        """Voltage-to-potential maps ``K = -M L`` [N, E, S] (mV per mV), a view; None without a Laplacian."""
        return None if self._transfer is None else self._transfer.permute(1, 0, 2)

    # ---- evaluation ----------------------------------------------------------------------------
    def _tensor(self, x, what: str, ndim: int, layout: str):
        import torch

        t = x if _is_torch(x) else torch.as_tensor(np.ascontiguousarray(x))
        want = {"N": self.n_cells, "S": self.n_segments}
        ok = t.ndim == ndim and all(t.shape[i] == want[c] for i, c in enumerate(layout) if c in want)
        if not ok:
            expect = "[" + ", ".join(f"{c}={want[c]}" if c in want else c for c in layout) + "]"
            raise ValueError(f"{what} must have shape {expect} (cells, segments, time steps); "
                             f"got {tuple(t.shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    def _need_transfer(self):
        if self._transfer is None:
            raise ValueError("this PopulationLFP has no Laplacian: pass laplacian=... to use voltages, "
                             "or use from_currents()")

    def step(self, v_mV):
        """Potential at every electrode (mV, [E] torch tensor on the device) from one step of voltages.

        Parameters
        ----------
        v_mV : tensor or array [N, S]
            Voltages of all segments of all cells at one instant.
        """
        self._need_transfer()
        v = self._tensor(v_mV, "v_mV", 2, "NS")
        v = v - v.mean(dim=1, keepdim=True)
        return self._transfer.reshape(self.n_electrodes, -1) @ v.reshape(-1)

    def step_currents(self, i_nA):
        """Potential at every electrode (mV, [E] torch tensor on the device) from one step of membrane
        currents ``i_nA`` [N, S] (e.g. a surrogate's predicted bin-mean currents)."""
        i = self._tensor(i_nA, "i_nA", 2, "NS")
        return self._mapping.reshape(self.n_electrodes, -1) @ i.reshape(-1)

    def from_voltages(self, v_mV, per_cell: bool = False):
        """Potentials (mV) from recorded voltages ``v_mV`` [N, S, T].

        Returns ``[T, E]`` (summed over cells; time first, as NetPyNE's ``recordLFP``) or ``[N, T, E]``
        with ``per_cell=True``; numpy in gives numpy out, a tensor gives a tensor on the device.
        """
        self._need_transfer()
        v = self._tensor(v_mV, "v_mV", 3, "NST")
        v = v - v.mean(dim=1, keepdim=True)
        return self._contract(self._transfer, v, per_cell, like=v_mV)

    def from_currents(self, i_nA, per_cell: bool = False):
        """Potentials (mV) from membrane currents ``i_nA`` [N, S, T] (e.g. a record's ``imem_mean_1ms``,
        NEURON's ``i_membrane_``, or a surrogate's current predictions). Output as in :meth:`from_voltages`."""
        i = self._tensor(i_nA, "i_nA", 3, "NST")
        return self._contract(self._mapping, i, per_cell, like=i_nA)

    @staticmethod
    def _contract(k_ens, x_nst, per_cell, like):
        import torch

        if per_cell:
            out = torch.einsum("ens,nst->nte", k_ens, x_nst)
        else:
            e = k_ens.shape[0]
            out = (k_ens.reshape(e, -1) @ x_nst.reshape(-1, x_nst.shape[-1])).T
        return out if _is_torch(like) else out.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Step-by-step LFP during a run: surrogates (engine sink) and detailed cells (i_membrane_)
# ----------------------------------------------------------------------------------------------

def _resolve(n_steps):
    return n_steps() if callable(n_steps) else n_steps


class _LFPBuffer:
    """[T, E] samples (mV): preallocated when the number of steps is known, else growing."""

    def __init__(self, n_electrodes: int, n_steps: int | None):
        self.n_electrodes = n_electrodes
        self.fixed = n_steps is not None
        self.array = np.zeros((n_steps if self.fixed else 0, n_electrodes))
        self.rows: list = []

    def put(self, k: int, phi: np.ndarray):
        if self.fixed:
            if k < len(self.array):
                self.array[k] = phi
        else:
            while len(self.rows) <= k:
                self.rows.append(np.zeros(self.n_electrodes))
            self.rows[k] = phi

    def value(self) -> np.ndarray:
        if self.fixed:
            return self.array
        return np.array(self.rows, np.float64).reshape(-1, self.n_electrodes)


class PopulationLFPSink(EngineSink):
    """Engine sink: the LFP of surrogate instances, accumulated every step on the engine's device.

    Attach with ``engine.add_sink(sink)`` (keep a reference to it). At each ``finitialize`` it places
    its cells (``cell.segment_table()``: position and rotation) in front of ``electrodes`` and then adds
    one row per surrogate step: ``phi = sum_c K_c v_c`` from the predicted voltages (``K = -M L``, needs
    ``laplacian``) or ``sum_c M_c i_c`` from the predicted bin-mean membrane currents (``laplacian=None``;
    models with current tasks).

    Parameters
    ----------
    electrodes : ElectrodeArray
        Contacts and conductivity.
    laplacian : AxialLaplacian, optional
        The cell's Laplacian for voltages; None: use the predicted currents.
    cells : sequence of SurrogateL5PC, or a callable returning one, optional
        The instances to include (default: all local instances of the engine); a callable is asked
        at every ``finitialize`` (cells created after the sink was made).
    method : {'linesource', 'pointsource'}
        LFPykit model of the mapping.
    device : torch device of the sums (default: the engine's).
    n_steps : int or callable, optional
        Preallocate ``[n_steps, E]`` (samples k >= n_steps are dropped; ``lfp_mV`` is then one array
        filled in place during the run); a callable is asked at every ``finitialize``; default: grow.
    on_reset : callable, optional
        ``on_reset(sink)`` after every reset (e.g. to hand the preallocated ``lfp_mV`` to a store).

    Attributes
    ----------
    lfp_mV : ndarray [T, E]
        Sample k is the potential at t0 + k·Δ (from voltages: a point sample; from currents: the mean
        over (t0 + (k-1)·Δ, t0 + k·Δ], zero at k = 0). Time first, like NetPyNE's ``recordLFP``.
    t_ms : ndarray [T]
        Sample times (ms).
    """

    def __init__(self, electrodes: ElectrodeArray, laplacian=None, *, cells=None, method: str = "linesource",
                 device=None, n_steps=None, on_reset=None):
        if not isinstance(electrodes, ElectrodeArray):
            raise TypeError(f"electrodes must be an ElectrodeArray, got {type(electrodes).__name__}")
        if method not in ("linesource", "pointsource"):
            raise ValueError(f"method must be 'linesource' or 'pointsource', got {method!r}")
        self.electrodes, self.laplacian, self.method = electrodes, laplacian, method
        self._cells, self.device, self.n_steps, self.on_reset = cells, device, n_steps, on_reset
        self.population: PopulationLFP | None = None
        self._buffer = _LFPBuffer(electrodes.n_electrodes, None)
        self._t0, self._step_ms = 0.0, 1.0

    def _chosen_cells(self, engine) -> list:
        cells = self._cells() if callable(self._cells) else self._cells
        return engine.cells if cells is None else list(cells)

    def reset(self, engine):
        """Place the cells, forget old samples; the rows are the chosen cells' instance indices."""
        if self.laplacian is None and not engine.predicts_currents:
            raise ValueError("PopulationLFPSink without a Laplacian uses predicted membrane currents, but this "
                             "surrogate predicts voltages only: pass laplacian= (AxialLaplacian of the cell)")
        if self.laplacian is not None and self.laplacian.n_segments != len(engine.segments["name"]):
            raise ValueError(f"the Laplacian has {self.laplacian.n_segments} segments, the surrogate "
                             f"{len(engine.segments['name'])}")
        cells = self._chosen_cells(engine)
        for c in cells:
            if c.engine is not engine:
                raise ValueError("PopulationLFPSink: a cell belongs to another SurrogateEngine")
        self._t0, self._step_ms = engine.step_time(0), engine.step_ms
        self._buffer = _LFPBuffer(self.electrodes.n_electrodes, _resolve(self.n_steps))
        self.population = None
        if cells:
            geoms = [SegmentGeometry.from_table(c.segment_table()) for c in cells]
            self.population = PopulationLFP.from_geometries(geoms, self.electrodes, self.laplacian,
                                                            method=self.method,
                                                            device=self.device or engine.device)
        if self.on_reset is not None:
            self.on_reset(self)
        return [c.index for c in cells]

    def append(self, step):
        """Add the step's potential at every contact (one matrix-vector product for all cells)."""
        if self.population is None:
            self._buffer.put(step.k, np.zeros(self.electrodes.n_electrodes))
            return
        if self.laplacian is None:
            phi = self.population.step_currents(step.imem_nA)
        else:
            phi = self.population.step(step.v_mV)
        self._buffer.put(step.k, phi.cpu().numpy())

    @property
    def lfp_mV(self) -> np.ndarray:
        return self._buffer.value()

    @property
    def t_ms(self) -> np.ndarray:
        return self._t0 + self._step_ms * np.arange(len(self.lfp_mV))


class MembraneCurrentLFP:
    """LFP of detailed NEURON cells from ``i_membrane_``, sampled every ``step_ms`` during a run.

    The counterpart of :class:`PopulationLFPSink` for cells that NEURON integrates (e.g. ``HayL5PC``):
    at every ``finitialize`` it places the cells (``segment_table()``), turns on
    ``cvode.use_fast_imem``, gathers the ``i_membrane_`` (nA) of all their segments through one
    ``PtrVector`` at t0 + k·step_ms (k = 0, 1, ...; point samples, as the voltage-based surrogate LFP,
    whose ``-L v`` equals them) and adds ``M i`` (one matrix-vector product for all cells).

    Parameters
    ----------
    cells : sequence of cells, or a callable returning one
        NEURON cells with ``segments`` (canonical order) and ``segment_table()``; a callable is asked
        at every ``finitialize``.
    electrodes : ElectrodeArray
    method : {'linesource', 'pointsource'}
    step_ms : float
        Sampling interval (ms), 1 ms like the surrogates.
    n_steps : int or callable, optional
        Preallocate ``[n_steps, E]`` (filled in place; later samples are dropped); a callable is
        asked at every ``finitialize``.
    on_reset : callable, optional
        ``on_reset(recorder)`` after every ``finitialize``.

    Attributes
    ----------
    lfp_mV : ndarray [T, E]; t_ms : ndarray [T]
    """

    def __init__(self, cells, electrodes: ElectrodeArray, *, method: str = "linesource", step_ms: float = 1.0,
                 n_steps=None, on_reset=None):
        from neuron import h

        if not isinstance(electrodes, ElectrodeArray):
            raise TypeError(f"electrodes must be an ElectrodeArray, got {type(electrodes).__name__}")
        if not step_ms > 0:
            raise ValueError(f"step_ms must be > 0, got {step_ms!r}")
        self._cells, self.electrodes, self.method = cells, electrodes, method
        self.step_ms, self.n_steps, self.on_reset = float(step_ms), n_steps, on_reset
        self._buffer = _LFPBuffer(electrodes.n_electrodes, None)
        self._t0, self._k, self._map, self._pointers, self._gathered = 0.0, 0, None, None, None
        self._cvode = h.CVode()                      # NEURON's one integrator (stdrun's h.cvode)
        self._cvode.use_fast_imem(1)
        self._callback = WeakMethodCall(self, "_sample")
        self._fih = h.FInitializeHandler(1, WeakMethodCall(self, "_start"))

    def _start(self):
        from neuron import h

        cells = list(self._cells() if callable(self._cells) else self._cells)
        self._t0, self._k = float(h.t), 0
        self._n_max = _resolve(self.n_steps)
        self._buffer = _LFPBuffer(self.electrodes.n_electrodes, self._n_max)
        self._map = None
        if cells:
            self._cvode.use_fast_imem(1)
            maps = [self.electrodes.mapping(SegmentGeometry.from_cell(c), method=self.method) for c in cells]
            self._map = np.hstack(maps)                                  # [E, sum S] mV / nA
            segments = [seg for c in cells for seg in c.segments]
            self._pointers = h.PtrVector(len(segments))
            for i, seg in enumerate(segments):                            # once per init, not per step
                self._pointers.pset(i, seg._ref_i_membrane_)
            self._gathered = h.Vector(len(segments))
        if self.on_reset is not None:
            self.on_reset(self)
        if self._n_max is None or self._n_max > 0:
            self._cvode.event(self._t0, self._callback)

    def _sample(self):
        from neuron import h

        if self._map is None:
            self._buffer.put(self._k, np.zeros(self.electrodes.n_electrodes))
        else:
            self._pointers.gather(self._gathered)
            self._buffer.put(self._k, self._map @ self._gathered.as_numpy())
        self._k += 1
        if self._n_max is None or self._k < self._n_max:
            self._cvode.event(self._t0 + self._k * self.step_ms, self._callback)

    @property
    def lfp_mV(self) -> np.ndarray:
        return self._buffer.value()

    @property
    def t_ms(self) -> np.ndarray:
        return self._t0 + self.step_ms * np.arange(len(self.lfp_mV))
