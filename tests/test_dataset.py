"""SimulationDataset: alignment of bins, shapes, splits, statistics, spike balance, bad files.

Records here are synthetic (written with records.write_record) so that every expected number is known;
tests/test_generate.py reads a real generated dataset.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lfdeep_neuron.data.dataset import SimulationDataset, bin_events, spike_indicator
from lfdeep_neuron.data.records import RecordFormatError, write_record
from lfdeep_neuron.data.simulate import assign_splits
from lfdeep_neuron.errors import InputError

torch.set_num_threads(1)
S, C = 7, 1278


def _record(path, index, T=100, spikes=(), events=None, rng=None):
    rng = rng or np.random.default_rng(index)
    segments = {"name": np.array(["soma[0]"] + [f"dend[{i}]" for i in range(S - 1)]),
                "x": np.full(S, 0.5), "length_um": np.full(S, 10.0)}
    synapses = {"syn_idx": np.arange(C, dtype=np.int32), "seg_idx": np.arange(C, dtype=np.int32) % S,
                "type": (np.arange(C) >= C // 2).astype(np.int8)}
    v = (-70 + 3 * index + rng.normal(size=(S, T))).astype(np.float32)
    imem = rng.normal(scale=0.01, size=(S, T)).astype(np.float32)
    if events is None:
        n = 300
        events = (rng.integers(0, C, n).astype(np.int32), np.sort(rng.uniform(0, T - 1, n)))
    traces = {"v_1ms": v, "t_1ms": np.arange(T, dtype=np.float64), "imem_mean_1ms": imem,
              "soma_spike_times_ms": np.asarray(spikes, dtype=np.float64)}
    write_record(path, segments=segments, synapses=synapses, traces=traces, inputs=events,
                 inputs_effective=events, attrs={"protocol": "synthetic", "sim_index": index})
    return v, imem, events


@pytest.fixture
def synthetic_dir(tmp_path):
    d = tmp_path / "ds"
    data = {}
    for i in range(10):
        spikes = [10.2, 57.0] if i % 2 == 0 else []
        data[i] = _record(d / f"sim_{i:06d}.h5", i, spikes=spikes)
    return d, data


def test_bin_and_spike_alignment():
    syn = np.array([5, 5, 5, 5, 9])
    t = np.array([0.0, 2.5, 3.0, 3.0001, 99.0])
    x = bin_events(syn, t, 10, 0, 100)
    assert x[5, 0] == 1 and x[5, 3] == 2 and x[5, 4] == 1 and x[9, 99] == 1 and x.sum() == 5
    # a window starting at 3: bin 0 of the window is absolute bin 3 = (2, 3] ms
    xw = bin_events(syn, t, 10, 3, 2, weights=[1, 1, 0.5, 0.25, 1])
    assert xw[5].tolist() == [1.5, 0.25] and xw.sum() == 1.75
    s = spike_indicator([10.2, 11.0, 57.0], 0, 100)
    assert np.flatnonzero(s).tolist() == [11, 57]


def test_items_match_records(tmp_path):
    d = tmp_path / "one"
    ev = (np.array([0, 3, 3, 700, 1277], dtype=np.int32), np.array([0.0, 4.0, 4.5, 4.5, 99.0]))
    v, imem, _ = _record(d / "sim_000000.h5", 0, T=100, spikes=[30.5], events=ev)
    ds = SimulationDataset(d / "sim_000000.h5", split=None)
    item = ds[0]
    assert set(item) == {"x_syn", "v", "imem", "spike", "sim_index", "t0_ms"}
    assert item["x_syn"].shape == (C, 100) and item["v"].shape == (S, 100) and item["spike"].shape == (100,)
    assert item["x_syn"].dtype == item["v"].dtype == item["imem"].dtype == item["spike"].dtype == torch.float32
    x = item["x_syn"].numpy()
    assert x[0, 0] == 1 and x[3, 4] == 1 and x[3, 5] == 1 and x[700, 5] == 1 and x[1277, 99] == 1
    assert x.sum() == 5
    np.testing.assert_array_equal(item["v"].numpy(), v)
    np.testing.assert_array_equal(item["imem"].numpy(), imem)
    assert np.flatnonzero(item["spike"].numpy()).tolist() == [31]
    # windows: starts 0, 20, 40, 60 for W = 30, stride 20
    win = SimulationDataset(d, split=None, window_ms=30, stride_ms=20)
    assert len(win) == 4
    it = win[1]
    assert int(it["t0_ms"]) == 20 and it["v"].shape == (S, 30)
    np.testing.assert_array_equal(it["v"].numpy(), v[:, 20:50])
    assert np.flatnonzero(it["spike"].numpy()).tolist() == [11]
    it0 = win[0]
    assert it0["x_syn"][3].numpy().nonzero()[0].tolist() == [4, 5]
    assert win.segments["name"][0] == "soma[0]" and win.synapses["syn_idx"].shape == (C,)


def test_splits_by_simulation(synthetic_dir):
    d, _ = synthetic_dir
    parts = {s: SimulationDataset(d, split=s) for s in ("train", "val", "test")}
    sims = {s: {int(r.index) for r in ds.records} for s, ds in parts.items()}
    assert sims["train"] and sims["val"] and sims["test"]
    assert not (sims["train"] & sims["val"]) and not (sims["train"] & sims["test"]) and not (sims["val"] & sims["test"])
    assert sims["train"] | sims["val"] | sims["test"] == set(range(10))
    assert sims == {k: set(v) for k, v in assign_splits(range(10), 0).items()}
    # growing the dataset never moves an existing simulation
    big = assign_splits(range(1000), 0)
    where = {i: k for k, v in big.items() for i in v}
    assert all(where[i] == k for k, v in assign_splits(range(100), 0).items() for i in v)
    assert 0.05 < len(big["val"]) / 1000 < 0.15 and 0.05 < len(big["test"]) / 1000 < 0.15


def test_stats_over_train_split_cached(synthetic_dir):
    d, data = synthetic_dir
    ds = SimulationDataset(d, split="val", window_ms=50)
    st = ds.stats
    train = assign_splits(range(10), 0)["train"]
    v = np.concatenate([data[i][0] for i in train], axis=1).astype(np.float64)
    im = np.concatenate([data[i][1] for i in train], axis=1).astype(np.float64)
    np.testing.assert_allclose(st["v_mean"], v.mean(1), rtol=1e-6)
    np.testing.assert_allclose(st["v_std"], v.std(1), rtol=1e-5)
    np.testing.assert_allclose(st["imem_mean"], im.mean(1), atol=1e-8)
    np.testing.assert_allclose(st["imem_std"], im.std(1), rtol=1e-5)
    counts = np.zeros(C)
    for i in train:
        np.add.at(counts, data[i][2][0], 1)
    np.testing.assert_allclose(st["x_rate"], counts / (100 * len(train)), rtol=1e-6)
    assert st["v_mean"].shape == (S,) and st["x_rate"].shape == (C,)
    np.testing.assert_allclose(st["v0"], np.mean([data[i][0][:, 0] for i in train], axis=0), rtol=1e-6)
    assert ds.provenance["split"] == "val" and ds.provenance["n_sims"] == len(ds.records)
    cache = d / "stats.npz"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    again = SimulationDataset(d, split="train").stats
    assert cache.stat().st_mtime_ns == mtime
    for k in st:
        np.testing.assert_array_equal(again[k], st[k])


def test_spike_balance_and_loader(synthetic_dir):
    d, _ = synthetic_dir
    ds = SimulationDataset(d, split="train", window_ms=20, stride_ms=10, spike_balance=1 / 3, seed=4)
    n = len(ds)
    assert n == len(ds.records) * 9
    assert ds.spiking_fraction == pytest.approx(round(n / 3) / n)
    items = [ds[k] for k in range(n)]
    n_spiking = sum(int(it["spike"].sum() > 0) for it in items)
    assert n_spiking == round(n / 3)
    first = [(int(ds[k]["sim_index"]), int(ds[k]["t0_ms"])) for k in range(n)]
    ds.set_epoch(1)
    assert [(int(ds[k]["sim_index"]), int(ds[k]["t0_ms"])) for k in range(n)] != first
    assert ds.spiking_fraction == pytest.approx(round(n / 3) / n)
    ds.set_epoch(0)
    assert [(int(ds[k]["sim_index"]), int(ds[k]["t0_ms"])) for k in range(n)] == first
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["x_syn"].shape == (4, C, 20) and batch["v"].shape == (4, S, 20) and batch["spike"].shape == (4, 20)
    # worker processes started by spawn (the dataset is pickled; its open files are not)
    spawned = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=1,
                                          multiprocessing_context="spawn")
    again = next(iter(spawned))
    for k in ("x_syn", "v", "imem", "spike", "sim_index", "t0_ms"):
        assert torch.equal(again[k], batch[k])
    plain = SimulationDataset(d, split="train", window_ms=20, stride_ms=10)
    assert plain.spiking_fraction < 1 / 3


def test_foreign_and_malformed_files(synthetic_dir, tmp_path):
    d, _ = synthetic_dir
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 2))
    with pytest.raises(RecordFormatError, match=r"foreign\.h5.*missing group '/segments'.*missing dataset '/v_1ms'"):
        SimulationDataset(foreign, split=None)
    # a record without membrane currents: named, and readable when imem is not asked for
    bad = tmp_path / "noimem" / "sim_000000.h5"
    _record(bad, 0)
    with h5py.File(bad, "a") as f:
        del f["imem_mean_1ms"]
    with pytest.raises(RecordFormatError, match=r"sim_000000\.h5.*missing dataset '/imem_mean_1ms'"):
        SimulationDataset(bad, split=None)
    assert SimulationDataset(bad, split=None, fields=("x_syn", "v", "spike"))[0]["v"].shape == (S, 100)
    # a foreign file dropped into a dataset directory is reported, not skipped
    (d / "zz_notes.h5").write_bytes(foreign.read_bytes())
    with pytest.raises(RecordFormatError, match=r"zz_notes\.h5"):
        SimulationDataset(d, split=None)
    with pytest.raises(ValueError, match="window_ms"):
        SimulationDataset(bad, split=None, window_ms=500, fields=("v",))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no simulation records"):
        SimulationDataset(empty)


def test_several_dataset_directories_are_one_dataset(tmp_path):
    """A list of dataset directories: each keeps its own splits (a training-only folder adds to train only),
    simulations are numbered apart, and the statistics cover the train records of all of them."""
    import json

    from lfdeep_neuron.data.dataset import DATASET_INDEX_STRIDE, SimulationDataset
    from lfdeep_neuron.data.records import write_record

    def make(d: Path, n: int, fractions: dict, v0: float) -> None:
        d.mkdir()
        for i in range(n):
            T = 20
            write_record(d / f"sim_{i:06d}.h5", segments={"name": np.array(["soma[0](0.5)", "dend[0](0.5)"])},
                         synapses={"syn_idx": np.arange(4)},
                         traces={"v_1ms": np.full((2, T), v0 + i, np.float16), "soma_spike_times_ms": np.zeros(0)},
                         attrs={"duration_ms": float(T)}, inputs_effective=(np.array([1, 2]), np.array([3.0, 7.5])))
        (d / "meta.json").write_text(json.dumps({"format": "lfdeep-neuron simulation dataset", "records": [],
                                                 "generation": {"seed": 3, "split_fractions": fractions}}))

    a, b = tmp_path / "published", tmp_path / "excited"
    make(a, 10, {"train": 0.6, "val": 0.2, "test": 0.2}, -70.0)
    make(b, 4, {"train": 1.0, "val": 0.0, "test": 0.0}, -50.0)
    single = {s: SimulationDataset(a, split=s, fields=("x_syn", "v")) for s in ("train", "val", "test")}
    both = {s: SimulationDataset([a, b], split=s, fields=("x_syn", "v")) for s in ("train", "val", "test")}
    for s in ("val", "test"):
        assert [r.index for r in both[s].records] == [r.index for r in single[s].records]
    extra = sorted(r.index for r in both["train"].records if r.index >= DATASET_INDEX_STRIDE)
    assert extra == [DATASET_INDEX_STRIDE + i for i in range(4)]
    assert len(both["train"].records) == len(single["train"].records) + 4
    v_mean = both["train"].stats["v_mean"]
    assert v_mean[0] > single["train"].stats["v_mean"][0]            # the excited folder's voltages count
    item = both["train"][len(both["train"]) - 1]
    assert item["v"].dtype == torch.float32 and int(item["sim_index"]) >= DATASET_INDEX_STRIDE
    # a training budget takes the folders' first simulations alternately (20-ms records: 0.02 s each)
    both["train"].restrict(0.06)
    first = sorted(r.index for r in single["train"].records)[:2]
    assert sorted(r.index for r in both["train"].records) == [*first, DATASET_INDEX_STRIDE]
    with pytest.raises(InputError, match=rf"^{a},{b}: split 'train' holds .* fewer than the 99 s asked for"):
        both["train"].restrict(99.0)                                   # the folders named plainly


def test_restrict_keeps_nested_subsets_that_survive_corpus_growth(tmp_path):
    """restrict(S): the shortest prefix of the generation order reaching S simulated seconds; a smaller budget
    keeps a subset of a larger one; more simulations on disk leave a subset unchanged; asking for more than
    there is is an InputError."""
    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.data.records import write_record
    from lfdeep_neuron.errors import InputError

    def write(i):
        write_record(tmp_path / f"sim_{i:06d}.h5", segments={"name": np.array(["soma[0](0.5)"])},
                     traces={"v_1ms": np.full((1, 500), -70.0 + i, np.float32), "soma_spike_times_ms": np.zeros(0)},
                     attrs={"duration_ms": 500.0})

    for i in range(10):
        write(i)
    small = SimulationDataset(tmp_path, split=None, window_ms=100, fields=("v",))
    small.restrict(2.5)
    for i in range(10, 12):     # the corpus grows
        write(i)
    sets = {}
    for budget in (1.0, 2.5, 6.0):
        ds = SimulationDataset(tmp_path, split=None, window_ms=100, fields=("v",))
        ds.restrict(budget)
        assert budget <= ds.simulated_s < budget + 0.5
        assert len(ds) == len(ds.records) * 5
        sets[budget] = {r.index for r in ds.records}
    assert sets[1.0] < sets[2.5] < sets[6.0]
    assert sets[6.0] == set(range(12)) and sets[2.5] == {r.index for r in small.records} == set(range(5))
    with pytest.raises(InputError, match="fewer than"):
        SimulationDataset(tmp_path, split=None, fields=("v",)).restrict(7.0)


def test_decompressed_cache_serves_the_same_windows_and_follows_rewrites(synthetic_dir, tmp_path):
    """cache_dir: windows come from memory-mapped uncompressed copies, equal to the records bit for bit; a
    rewritten record gets a fresh copy."""
    import os
    d, data = synthetic_dir
    cache = tmp_path / "cache"
    plain = SimulationDataset(d, split=None, window_ms=30, stride_ms=20)
    cached = SimulationDataset(d, split=None, window_ms=30, stride_ms=20, cache_dir=cache)
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)
    copies = sorted(p.name for p in next(cache.iterdir()).iterdir())
    assert copies == sorted(["input_effective__syn_idx.npy", "input_effective__t_ms.npy", "imem_mean_1ms.npy",
                             "v_1ms.npy"])
    assert not any(p.name.endswith(".tmp") for p in cache.rglob("*"))
    # the record is rewritten (new values): the cache follows, the old copy is not served
    path = d / "sim_000000.h5"
    v_new, _, _ = _record(path, 0, rng=np.random.default_rng(99))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = SimulationDataset(d, split=None, window_ms=30, stride_ms=20, cache_dir=cache)
    first = next(i for i in range(len(fresh)) if int(fresh[i]["sim_index"]) == 0)
    np.testing.assert_array_equal(fresh[first]["v"].numpy(), v_new[:, 0:30])
    assert len([p for p in cache.iterdir() if p.name.startswith("sim_000000-")]) == 2


def test_stats_pool_per_record_moments_and_reuse_them(synthetic_dir):
    """Pooled per-record moments equal the statistics of the concatenated records; each record's moments are
    cached beside it and reused while it is unchanged, recomputed when it changes."""
    from lfdeep_neuron.data.dataset import STATS_PARTS_DIR, combine_moments, compute_stats, record_moments

    d, data = synthetic_dir
    paths = sorted(d.glob("*.h5"))
    fresh = compute_stats(paths, C)
    v = np.concatenate([data[i][0] for i in range(len(paths))], axis=1).astype(np.float64)
    np.testing.assert_allclose(fresh["v_std"], v.std(1), rtol=1e-5)
    pooled = combine_moments(record_moments(p, C) for p in paths)
    for k in fresh:
        np.testing.assert_allclose(pooled[k], fresh[k], rtol=1e-6)
    cached = compute_stats(paths, C, cache=True)
    parts = sorted((d / STATS_PARTS_DIR).glob("*.npz"))
    assert [p.stem for p in parts] == [p.stem for p in paths]
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = compute_stats(paths, C, cache=True)
    assert [p.stat().st_mtime_ns for p in parts] == stamps            # reused, not rewritten
    for k in fresh:
        np.testing.assert_array_equal(again[k], cached[k])
        np.testing.assert_allclose(cached[k], fresh[k], rtol=1e-6)
    # a changed record invalidates its part only
    import h5py
    with h5py.File(paths[0], "r+") as f:
        f["v_1ms"][0, :] = f["v_1ms"][0, :] + 10.0
    changed = compute_stats(paths, C, cache=True)
    assert parts[0].stat().st_mtime_ns != stamps[0]
    assert [p.stat().st_mtime_ns for p in parts[1:]] == stamps[1:]
    np.testing.assert_allclose(changed["v_mean"][0], fresh["v_mean"][0] + 10.0 / len(paths), rtol=1e-6)


def test_first_n_simulations_of_a_folder_are_a_fixed_subset(tmp_path):
    """DIR:first=N: the folder's simulations 0..N-1 with the splits they have in the whole folder, alone or
    joined to other folders; the set does not change as the folder grows; a gap or N = 0 is one InputError
    naming the folder."""
    import json

    from lfdeep_neuron.data.dataset import DATASET_INDEX_STRIDE, parse_folder_spec

    def write(d, i):
        write_record(d / f"sim_{i:06d}.h5", segments={"name": np.array(["soma[0](0.5)"])},
                     traces={"v_1ms": np.full((1, 20), -70.0 + i, np.float32), "soma_spike_times_ms": np.zeros(0)},
                     attrs={"duration_ms": 20.0})

    a, b = tmp_path / "a", tmp_path / "b"
    for d, n in ((a, 12), (b, 6)):
        d.mkdir()
        for i in range(n):
            write(d, i)
        (d / "meta.json").write_text(json.dumps({"format": "lfdeep-neuron simulation dataset", "records": [],
                                                 "generation": {"seed": 5, "split_fractions":
                                                                {"train": 0.5, "val": 0.25, "test": 0.25}}}))
    assert parse_folder_spec(f"{a}:first=7") == (a, 7) and parse_folder_spec(a) == (a, None)
    whole = {s: {r.index for r in SimulationDataset(a, split=s, fields=("v",)).records}
             for s in ("train", "val", "test")}
    part = {s: {r.index for r in SimulationDataset(f"{a}:first=7", split=s, fields=("v",)).records}
            for s in ("train", "val", "test")}
    for s in whole:
        assert part[s] == {i for i in whole[s] if i < 7}
    assert set().union(*part.values()) == set(range(7))
    for i in range(12, 15):                                  # the folder grows: the subset stays
        write(a, i)
    again = SimulationDataset(f"{a}:first=7", split="train", fields=("v",))
    assert {r.index for r in again.records} == part["train"]
    assert again.stats["v_mean"][0] != SimulationDataset(a, split="train", fields=("v",)).stats["v_mean"][0]
    joined = SimulationDataset([str(b), f"{a}:first=7"], split="train", fields=("v",))
    b_train = {r.index for r in SimulationDataset(b, split="train", fields=("v",)).records}
    assert {r.index for r in joined.records} == b_train | {DATASET_INDEX_STRIDE + i for i in part["train"]}
    assert joined.provenance["root"] == [str(b), f"{a}:first=7"]
    (a / "sim_000003.h5").unlink()                           # a gap among the first N
    with pytest.raises(InputError, match=rf"^{a}:first=7: only 6 of its simulations 0\.\.6 are complete"):
        SimulationDataset(f"{a}:first=7", split="train", fields=("v",))
    with pytest.raises(InputError, match=rf"^{b}:first=0: N must be >= 1"):
        SimulationDataset([str(a), f"{b}:first=0"], split="train", fields=("v",))
