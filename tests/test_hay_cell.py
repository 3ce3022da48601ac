"""The detailed Hay cell: construction against the reference tables, addressing, placement, errors,
and the runner's recordings. Real NEURON throughout; runs are tens of ms so the file stays fast."""
from __future__ import annotations

import csv
import gc

import h5py
import numpy as np
import pytest

from lfdeep_neuron.hay import (
    N_CHANNELS,
    N_DENDRITIC_SEGMENTS,
    N_SEGMENTS,
    HayL5PC,
    MorphologyError,
    place_points,
    rotation_matrix,
    run_cell,
)


def _read_group(path, group):
    out = {}
    with h5py.File(path, "r") as f:
        f[group].visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def cell(morphology):
    return HayL5PC(morphology)


@pytest.fixture(scope="module")
def reference_file(reference_dir):
    return reference_dir / "synaptic_seed1.h5"


def _assert_table_equal(ours, ref, *, rtol, atol=0.0, skip=()):
    assert set(ours) == set(ref) - set(skip), (sorted(set(ours) ^ (set(ref) - set(skip))))
    for key in ref:
        if key in skip:
            continue
        a, b = np.asarray(ours[key]), np.asarray(ref[key])
        assert a.shape == b.shape, key
        if b.dtype.kind in "SU" or b.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=key)


# ------------------------------------------------------------------ construction vs the reference

def test_segment_table_matches_reference(cell, reference_file):
    ref = _read_group(reference_file, "segments")
    ours = cell.segment_table()
    assert len(ours["name"]) == N_SEGMENTS
    mech = [k for k in ref if k.startswith("mech/")]
    assert len(mech) == 22
    # every channel density and passive parameter to 1e-6 relative (zeros exactly)
    _assert_table_equal({k: ours[k] for k in mech}, {k: ref[k] for k in mech}, rtol=1e-6)
    # geometry (xyz: NaN for the axon stubs in both; the soma contour points differ by <1e-5 µm
    # because hoc prints them with %.8g before storing them as float32)
    _assert_table_equal({k: v for k, v in ours.items() if not k.startswith("mech/")},
                        {k: v for k, v in ref.items() if not k.startswith("mech/")}, rtol=1e-6, atol=1e-5,
                        skip=mech)


def test_section_and_synapse_tables_match_reference(cell, reference_file):
    _assert_table_equal(cell.section_table(), _read_group(reference_file, "sections"), rtol=1e-6)
    syn = cell.synapse_table()
    _assert_table_equal(syn, _read_group(reference_file, "synapses"), rtol=0, skip=("dead",))
    assert len(syn["syn_idx"]) == N_CHANNELS


def test_matches_segments_reference_csv(cell, morphology):
    """Geometry incl. axial resistance and the two distributed densities, per segment (csv rows:
    dendritic segments by synapse index, then soma and the two axon stubs)."""
    rows = list(csv.DictReader(open(morphology.parent / "segments_reference.csv")))
    assert len(rows) == N_SEGMENTS
    table = cell.segment_table()
    for row in rows:
        sec = cell.section(row["section"])
        seg = sec(float(row["x"]))
        g = cell.segment_index(row["section"], float(row["x"]))
        if row["syn_index"]:
            assert g == int(row["syn_index"]) + 1
        np.testing.assert_allclose(
            [seg.area(), seg.diam, seg.ri(), sec.L / sec.nseg, table["mech/gIhbar_Ih"][g],
             table["mech/gCa_LVAstbar_Ca_LVAst"][g]],
            [float(row[k]) for k in ("area_um2", "diam_um", "ri_MOhm", "seg_L_um", "gIhbar", "gCa_LVAstbar")],
            rtol=1e-6, err_msg=row["section"])


def test_landmarks(cell):
    """Numbers quoted in BIOPHYSICS.md §1 and §5."""
    assert cell.max_apical_length_um == pytest.approx(1300.5335016, abs=1e-6)
    table = cell.segment_table()
    assert table["area_um2"].sum() == pytest.approx(31192.17, abs=0.01)
    assert int(np.sum(table["mech/gCa_LVAstbar_Ca_LVAst"] > 0.1)) == 29
    nexus = cell.segment_index("apic[50]", 0.9)
    assert table["mech/gCa_LVAstbar_Ca_LVAst"][nexus] == pytest.approx(0.2271264, rel=1e-12)
    assert table["dist_from_soma_um"][nexus] == pytest.approx(678.39, abs=0.01)
    # Ih plateau beyond 0.65 of the longest path
    far = table["dist_from_soma_um"] > 900
    assert np.allclose(table["mech/gIhbar_Ih"][far & (table["sec_type"] == b"apic")], 2.1023962e-3, rtol=1e-7)


# ------------------------------------------------------------------ addressing

def test_channel_addressing(cell):
    assert cell.channel("dend[0]", 0.5, "exc") == 0
    assert cell.channel("dend[0]", 0.5, "inh") == N_DENDRITIC_SEGMENTS
    seg_table = cell.segment_table()
    g = cell.segment_index("apic[36]", 0.7)
    assert seg_table["name"][g] == b"apic[36]"
    c = cell.channel("apic[36]", 0.7, "inh")
    assert c == N_DENDRITIC_SEGMENTS + g - 1
    syn = cell.synapse("apic[36]", 0.7, "inh")
    assert syn.hname().startswith("GabaASyn")
    assert syn.get_segment().sec == cell.section("apic[36]")
    assert syn.get_segment().x == pytest.approx(seg_table["x"][g])
    assert cell.synapse("apic[36]", 0.7, "exc").hname().startswith("AmpaNmdaSyn")
    # x at the ends falls into the first / last segment; a Section object works like its name
    assert cell.channel(cell.section("apic[36]"), 1.0, "exc") == cell.channel("apic[36]", 0.999, "exc")
    with pytest.raises(ValueError, match="carries no synapses"):
        cell.channel("soma[0]", 0.5, "exc")
    with pytest.raises(ValueError, match="kind"):
        cell.channel("dend[3]", 0.5, "ampa")
    with pytest.raises(KeyError, match="apic\\[500\\]"):
        cell.channel("apic[500]", 0.5, "exc")
    with pytest.raises(ValueError, match="x must be"):
        cell.segment_index("dend[3]", 1.5)


def test_input_event_validation(cell):
    with pytest.raises(ValueError, match="outside"):
        cell.set_input_events([N_CHANNELS], [1.0])
    with pytest.raises(ValueError, match="equal length"):
        cell.set_input_events([1, 2], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        cell.set_input_events([1], [-1.0])
    cell.clear_input_events()


# ------------------------------------------------------------------ runs

def test_weighted_event_equals_two_unit_events(cell):
    """Weight w adds w*f to the synaptic states: one weight-2 event = two weight-1 events."""
    c = cell.channel("apic[36]", 0.5, "exc")
    g = c + 1
    cell.set_input_events([c], [5.0], weights=[2.0])
    a = run_cell(cell, 30)
    cell.set_input_events([c, c], [5.0, 5.0])
    b = run_cell(cell, 30)
    cell.set_input_events([c], [5.0])
    one = run_cell(cell, 30)
    cell.clear_input_events()
    rest = run_cell(cell, 30)
    np.testing.assert_allclose(a["v_1ms"], b["v_1ms"], atol=2e-4)
    peak2 = np.max(a["v_1ms"][g] - rest["v_1ms"][g])
    peak1 = np.max(one["v_1ms"][g] - rest["v_1ms"][g])
    assert peak1 > 0.5 and peak2 > 1.5 * peak1          # a real EPSP, bigger for weight 2
    assert a["v_1ms"].dtype == np.float32 and a["v_1ms"].shape == (N_SEGMENTS, 30)
    assert np.all(a["t_1ms"] == np.arange(30)) and np.all(a["t_0p1ms"] == np.arange(300) / 10)
    np.testing.assert_allclose(a["v_soma_0p1ms"][::10], a["v_1ms"][0], atol=1e-5)
    assert a["v_1ms"][0, 0] == pytest.approx(-76.0)


def test_imem_bin_means_conserve_current(morphology):
    """Σ over segments of the bin-mean i_membrane_ equals the injected IClamp current (Kirchhoff),
    bin by bin, under both integrators: the bin means are exact time integrals."""
    c = HayL5PC(morphology, synapses=False)
    c.add_iclamp(0.5, 3.3, 20.0)                       # on in (3.3, 23.3) ms
    for integrator in ("cvode", "fixed", "fixed_cn"):
        out = run_cell(c, 30, integrator=integrator, record_imem=True)
        total = out["imem_mean_1ms"].astype(np.float64).sum(axis=0)
        expected = 0.5 * np.clip(np.minimum(np.arange(30), 23.3) - np.maximum(np.arange(30) - 1, 3.3), 0, 1)
        expected[0] = 0.0
        np.testing.assert_allclose(total, expected, atol=2e-4, err_msg=integrator)
        vm = out["v_mean_1ms"]
        assert vm.shape == (N_SEGMENTS, 30)
        # the mean of v over a bin lies between the bin's end-point samples' range during a ramp
        assert np.all(np.abs(vm[:, 1:] - 0.5 * (out["v_1ms"][:, 1:] + out["v_1ms"][:, :-1])) < 2.0)
        assert out["integrator_steps"] > 0
    del c
    gc.collect()


def test_crank_nicolson_closer_to_cvode_than_backward_euler(morphology):
    """Same dt, same cost: Crank-Nicolson tracks a somatic spike train far better than backward Euler."""
    c = HayL5PC(morphology, synapses=False)
    c.add_iclamp(1.2, 2.0, 30.0)
    ref = run_cell(c, 40, integrator="cvode", atol=1e-5)
    be = run_cell(c, 40, integrator="fixed", dt_ms=0.025)
    cn = run_cell(c, 40, integrator="fixed_cn", dt_ms=0.025)
    assert be["integrator_steps"] == cn["integrator_steps"] == 1600
    spikes = ref["soma_spike_times_ms"]
    n = len(spikes)
    assert n >= 2 and len(cn["soma_spike_times_ms"]) == n and len(be["soma_spike_times_ms"]) >= n
    err_be = np.abs(be["soma_spike_times_ms"][:n] - spikes).max()     # (BE even adds a spike here)
    err_cn = np.abs(cn["soma_spike_times_ms"] - spikes).max()
    assert err_cn < 0.5 * err_be, (err_cn, err_be)
    with pytest.raises(ValueError, match="integrator"):
        run_cell(c, 5, integrator="rk4")
    with pytest.raises(ValueError, match="whole number"):
        run_cell(c, 2.5)
    del c
    gc.collect()


def test_two_cells_in_one_process_are_independent(morphology, cell):
    """A second instance: distinct NEURON names, canonical names identical, events of one cell do
    not reach the other."""
    other = HayL5PC(morphology)
    assert other.soma[0].name() != cell.soma[0].name()
    assert other.section_names == cell.section_names
    c = other.channel("apic[50]", 0.5, "exc")
    other.set_input_events([c] * 5, [5.0, 6.0, 7.0, 8.0, 9.0])
    cell.clear_input_events()
    # fixed step: the two cells' trajectories do not share CVODE's step choices, so a cell that
    # receives nothing must be bit-for-bit at rest
    both = run_cell(cell, 25, integrator="fixed"), run_cell(other, 25, integrator="fixed")
    other.clear_input_events()
    rest = run_cell(other, 25, integrator="fixed")
    g = c + 1
    assert np.max(both[1]["v_1ms"][g] - rest["v_1ms"][g]) > 2.0      # the driven cell responds
    assert np.max(np.abs(both[0]["v_1ms"] - rest["v_1ms"])) < 1e-9   # the other stays at rest
    del other
    gc.collect()


def test_placement_moves_points_not_electrics(morphology, cell):
    position, angles = np.array([120.0, -40.0, 300.0]), (0.3, -1.1, 2.0)
    moved = HayL5PC(morphology, position_um=position, rotation=angles, synapses=False)
    a, b = cell.segment_table(), moved.segment_table()
    centre = cell.soma_centre_um
    for k in ("xyz_start", "xyz_mid", "xyz_end"):
        np.testing.assert_allclose(b[k], place_points(a[k], centre, position, angles), atol=1e-9)
    np.testing.assert_allclose(moved.soma_centre_um, centre + position, atol=1e-9)
    # rigid: pairwise distances kept
    pa, pb = a["xyz_mid"][:-2], b["xyz_mid"][:-2]
    np.testing.assert_allclose(np.linalg.norm(pa - pa[0], axis=1), np.linalg.norm(pb - pb[0], axis=1), atol=1e-6)
    # NEURON's own 3-D points moved too
    sec = moved.section("apic[36]")
    pts = np.array([[sec.x3d(i), sec.y3d(i), sec.z3d(i)] for i in range(int(sec.n3d()))])
    ref = cell.section("apic[36]")
    pts0 = np.array([[ref.x3d(i), ref.y3d(i), ref.z3d(i)] for i in range(int(ref.n3d()))])
    np.testing.assert_allclose(pts, place_points(pts0, centre, position, angles), atol=1e-3)
    # densities are those of the file geometry; lengths, areas and axial resistances change only by
    # NEURON's float32 storage of the moved points (~1e-7 of the coordinates: < 2e-5 relative)
    for k in ("mech/gIhbar_Ih", "mech/gCa_LVAstbar_Ca_LVAst", "mech/g_pas", "mech/gNaTs2_tbar_NaTs2_t"):
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k in ("area_um2", "length_um", "dist_from_soma_um"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
    ri = np.array([seg.ri() for seg in cell.segments[1:-2]])
    ri_moved = np.array([seg.ri() for seg in moved.segments[1:-2]])
    np.testing.assert_allclose(ri_moved, ri, rtol=2e-5)
    # ... so the same stimulus gives the same response (fixed step: no shared step-size control)
    cell.clear_input_events()
    for c in (cell, moved):
        c.add_iclamp(1.5, 2.0, 10.0)
    try:
        out = run_cell(cell, 20, integrator="fixed"), run_cell(moved, 20, integrator="fixed")
    finally:
        for c in (cell, moved):
            c.iclamps.clear()
    assert len(out[0]["soma_spike_times_ms"]) >= 1
    np.testing.assert_allclose(out[1]["soma_spike_times_ms"], out[0]["soma_spike_times_ms"], atol=1e-3)
    np.testing.assert_allclose(out[1]["v_1ms"], out[0]["v_1ms"], atol=0.05)
    # placement is always relative to the imported points: moving back restores them exactly
    moved.set_placement((0.0, 0.0, 0.0), None)
    back = moved.segment_table()
    for k in ("area_um2", "length_um", "xyz_mid"):
        np.testing.assert_array_equal(back[k], a[k], err_msg=k)
    with pytest.raises(ValueError, match="rotation"):
        moved.set_placement((0.0, 0.0, 0.0), np.ones((3, 3)))
    np.testing.assert_allclose(rotation_matrix(angles) @ rotation_matrix(angles).T, np.eye(3), atol=1e-12)
    del moved
    gc.collect()


# ------------------------------------------------------------------ errors

def test_morphology_errors(tmp_path, monkeypatch, morphology):
    with pytest.raises(MorphologyError, match="does not exist"):
        HayL5PC(tmp_path / "nope.asc")
    with pytest.raises(MorphologyError, match="not a regular file"):
        HayL5PC(tmp_path)
    empty = tmp_path / "empty.asc"
    empty.write_text("")
    with pytest.raises(MorphologyError, match="empty"):
        HayL5PC(empty)
    garbage = tmp_path / "garbage.asc"
    garbage.write_text("hello world\n(((\n")
    with pytest.raises(MorphologyError, match=r"garbage\.asc does not have the Hay L5PC structure"):
        HayL5PC(garbage)
    truncated = tmp_path / "truncated.asc"
    truncated.write_bytes(morphology.read_bytes()[:100_000])
    with pytest.raises(MorphologyError, match=r"truncated\.asc"):
        HayL5PC(truncated)
    binary = tmp_path / "binary.asc"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n\x00\x00")
    with pytest.raises(MorphologyError, match="binary"):
        HayL5PC(binary)
    monkeypatch.delenv("LFDEEP_HAY_MORPHOLOGY", raising=False)
    with pytest.raises(MorphologyError, match="LFDEEP_HAY_MORPHOLOGY"):
        HayL5PC()
    monkeypatch.setenv("LFDEEP_HAY_MORPHOLOGY", str(morphology))
    from_env = HayL5PC(synapses=False)
    assert from_env.morphology_path == morphology
    del from_env
    gc.collect()


# ------------------------------------------------------------------ replay CLI on a small file

def test_replay_cli_on_small_inputs_file(tmp_path, morphology):
    """Events given only as /input: the CLI drops the events of synapses hit at t = 0 (the original's
    silencing), records them as dead, and writes a complete record; bad files give exit code 2."""
    from lfdeep_neuron.cli import main

    c = 300                                      # an apical excitatory channel

    def replay(name, syn, t, *extra):
        inputs, out = tmp_path / f"{name}_in.h5", tmp_path / f"{name}.h5"
        with h5py.File(inputs, "w") as f:
            f["input/syn_idx"] = np.array(syn, dtype=np.int32)
            f["input/t_ms"] = np.array(t, dtype=np.float64)
            f.attrs.update(protocol="synaptic_beniaguev", duration_ms=12.0, v_init_mV=-76.0, seed=7)
        assert main(["replay", "--morphology", str(morphology), "--inputs", str(inputs), "--out", str(out),
                     "--no-progress", *extra]) == 0
        return h5py.File(out, "r")

    with replay("dead", [5, 5, c, c, c], [0.0, 4.0, 3.0, 4.0, 5.0], "--record-imem") as f, \
            replay("live", [c, c, c], [3.0, 4.0, 5.0]) as g, replay("none", [], []) as z:
        assert f["v_1ms"].shape == (N_SEGMENTS, 12) and f["imem_mean_1ms"].shape == (N_SEGMENTS, 12)
        np.testing.assert_array_equal(f["input_effective/syn_idx"][()], [c, c, c])
        np.testing.assert_array_equal(f["input/syn_idx"][()], [5, 5, c, c, c])
        np.testing.assert_array_equal(np.flatnonzero(f["synapses/dead"][()]), [5])
        assert f.attrs["seed"] == 7 and f.attrs["integrator"] == "cvode"
        np.testing.assert_array_equal(f["v_1ms"][()], g["v_1ms"][()])       # the dead synapse is silent
        assert f["v_1ms"][c + 1, 8] - z["v_1ms"][c + 1, 8] > 1.0            # the live one acted
    gc.collect()

    inputs = tmp_path / "dead_in.h5"
    empty = tmp_path / "noinputs.h5"
    with h5py.File(empty, "w") as f:
        f.attrs["duration_ms"] = 10.0
    assert main(["replay", "--morphology", str(morphology), "--inputs", str(empty),
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert main(["replay", "--morphology", str(tmp_path / "missing.asc"), "--inputs", str(inputs),
                 "--out", str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()
