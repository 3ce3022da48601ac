"""Simulation records: exact round trip of the reference files, atomic writes, clear layout errors."""
from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from lfdeep_neuron.data.records import RecordFormatError, open_record, read_record, write_record


def assert_same(a, b, where=""):
    """Deep equality of records' parts (dtype, shape and values, NaN == NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{where}: values differ"


def _small_record(S=5, T=40, n_syn=8):
    rng = np.random.default_rng(0)
    segments = {"name": np.array([f"dend[{i}]" for i in range(S)]), "x": np.linspace(0.1, 0.9, S),
                "xyz_mid": rng.normal(size=(S, 3)), "mech/g_pas": np.full(S, 3e-5)}
    synapses = {"syn_idx": np.arange(n_syn, dtype=np.int32), "seg_idx": np.arange(n_syn, dtype=np.int32) % S,
                "type": (np.arange(n_syn) >= n_syn // 2).astype(np.int8)}
    traces = {"v_1ms": rng.normal(-70, 5, size=(S, T)).astype(np.float32),
              "t_1ms": np.arange(T, dtype=np.float64)}
    inputs = (np.array([0, 3, 7], dtype=np.int32), np.array([0.0, 2.0, 39.0]))
    return dict(segments=segments, synapses=synapses, traces=traces, inputs=inputs,
                attrs={"protocol": "synthetic", "duration_ms": float(T), "seed": 3})


def test_reference_round_trip_is_exact(reference_dir, tmp_path):
    files = sorted(reference_dir.glob("*.h5"))
    assert files, "no reference records"
    for src in files:
        rec = read_record(src)
        assert rec["v_1ms"].dtype == np.float32 and rec["v_1ms"].shape == (642, 3000)
        assert rec["segments"]["name"][0] == "soma[0]" and rec["segments"]["name"].dtype.kind == "U"
        assert "mech/gIhbar_Ih" in rec["segments"]
        out = write_record(tmp_path / src.name, **rec.write_kwargs())
        again = read_record(out)
        assert_same(dict(rec), dict(again), src.name)
        assert_same(rec.attrs, again.attrs, src.name + "@attrs")
        assert_same(rec.group_attrs, again.group_attrs, src.name + "@group_attrs")
        with h5py.File(out) as f:  # stored types as in the reference: bytes strings, float32 traces
            assert f["segments/name"].dtype.kind == "S"
            assert f["v_1ms"].dtype == np.float32
            assert f["v_1ms"].chunks == (642, 128) and f["v_1ms"].compression == "gzip"
    syn = read_record(reference_dir / "synaptic_seed1.h5", require=("input", "input_effective", "synapses"))
    assert syn["input"]["syn_idx"].dtype == np.int32 and syn["input"]["t_ms"].dtype == np.float64
    assert syn["synapses"]["dead"].sum() == 6


def test_same_content_gives_same_bytes(tmp_path):
    kw = _small_record()
    a = write_record(tmp_path / "a.h5", **kw)
    b = write_record(tmp_path / "b.h5", **kw)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]


def test_failed_write_leaves_nothing(tmp_path):
    kw = _small_record()
    kw["attrs"] = {"bad": None}
    with pytest.raises(TypeError, match="bad"):
        write_record(tmp_path / "x.h5", **kw)
    assert list(tmp_path.iterdir()) == []


def test_mis_shaped_trace_is_named(tmp_path):
    kw = _small_record(S=5)
    kw["traces"]["v_1ms"] = np.zeros((4, 40), np.float32)
    p = write_record(tmp_path / "bad.h5", **kw)
    with pytest.raises(RecordFormatError, match=r"bad\.h5: v_1ms has shape \(4, 40\), expected \(S=5, T\)"):
        read_record(p)


def test_missing_parts_and_foreign_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(RecordFormatError, match=r"foreign\.h5.*missing group '/segments'.*missing dataset '/v_1ms'"):
        read_record(foreign)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(RecordFormatError, match=r"notes\.h5: not a readable HDF5 file"):
        read_record(text)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_record(tmp_path / "nope.h5")
    # a required part that is absent, and events outside the channel table
    kw = _small_record(n_syn=8)
    kw["inputs"] = (np.array([1, 8], dtype=np.int32), np.array([1.0, 2.0]))
    p = write_record(tmp_path / "ev.h5", **kw)
    with pytest.raises(RecordFormatError, match=r"missing group '/input_effective'"):
        read_record(p, require=("input_effective",))
    with pytest.raises(RecordFormatError, match=r"input/syn_idx spans \[1, 8\], outside the 8 channels"):
        read_record(p)
    with pytest.raises(RecordFormatError, match=r"missing root attribute 'celsius'"):
        read_record(p, require=("@celsius",))


def test_lazy_open_reads_slices(tmp_path):
    kw = _small_record(S=6, T=300)
    p = write_record(tmp_path / "r.h5", **kw)
    with open_record(p) as f:
        np.testing.assert_array_equal(f["v_1ms"][:, 100:150], kw["traces"]["v_1ms"][:, 100:150])
