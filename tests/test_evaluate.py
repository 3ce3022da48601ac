"""Evaluation metrics, ``lfdeep-neuron evaluate`` and ``lfdeep-neuron rollout``.

Metric functions are checked on hand-computable cases. ``evaluate`` and ``rollout`` run end to end on
data cut from the Hay reference record (642 segments, real NEURON traces) with an untrained 'tiny' MMoE at
Hay size whose normalisation comes from the data; every reported number checked here is recomputed
independently (direct model calls, direct RMSE) rather than compared with a stored value.
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from lfdeep_neuron.surrogate import metrics as M

N_CH = 1278


# ---------------------------------------------------------------------------------------------------------
# metric functions
# ---------------------------------------------------------------------------------------------------------
def test_coincidence_factor_hand_cases():
    rng = np.random.default_rng(0)
    train = np.sort(rng.uniform(0, 2000, 30))
    train = train[np.diff(np.r_[-100, train]) > 10]           # ISIs > 10 ms: a 5-ms shift cannot re-match
    assert M.coincidence_factor(train, train, 2000) == pytest.approx(1.0, abs=1e-12)
    shifted = M.coincidence_factor(train + 5.0, train, 2000)
    nu = train.size / 2000
    assert shifted == pytest.approx(-2 * nu * 2 / (1 - 2 * nu * 2), abs=1e-12)   # no coincidence at all
    assert abs(shifted) < 0.07
    # 2 of 3 within +-2 ms (52.5 is 2.5 ms off): (2 - 2 nu D N) / (N) / (1 - 2 nu D)
    g = M.coincidence_factor([11.0, 52.5, 90.0], [10.0, 50.0, 90.0], 1000, 2.0)
    assert g == pytest.approx((2 - 2 * 0.003 * 2 * 3) / 3 / (1 - 2 * 0.003 * 2))
    assert M.match_spikes([10.0, 10.5], [10.0]) == 1            # one-to-one
    assert M.match_spikes([8.0, 12.0], [10.0, 10.1]) == 2
    assert math.isnan(M.coincidence_factor([], [], 100))
    assert M.coincidence_factor([], [5.0], 100) == pytest.approx(0.0)


def test_spike_auc_and_logit_spikes():
    assert M.spike_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.spike_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert M.spike_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert M.spike_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    # TPR at a bounded false positive rate: 1000 negatives 0..999, positives at 995.5 and 500.5
    neg, lab = np.arange(1000.0), np.r_[np.zeros(1000), 1, 1]
    lg = np.r_[neg, 995.5, 500.5]
    assert M.spike_tpr_at_fpr(lg, lab, 0.0) == 0.0            # nothing may beat the top negative (999)
    assert M.spike_tpr_at_fpr(lg, lab, 0.004) == 0.5          # 4 negatives (996-999) above 995: one positive
    assert M.spike_tpr_at_fpr(lg, lab, 0.5) == 1.0            # threshold 499
    assert M.spike_tpr_at_fpr(lg, lab, 0.4985) == 0.5         # threshold 501: 498 negatives above it, one positive
    assert np.isnan(M.spike_tpr_at_fpr([1.0, 2.0], [0, 0]))
    with pytest.raises(ValueError, match="fpr must be"):
        M.spike_tpr_at_fpr(lg, lab, 1.0)
    assert math.isnan(M.spike_auc([1, 2], [0, 0]))
    logits = np.array([-5, -5, 3, -5, 0.2, 4.0])
    t = M.spikes_from_logits(logits, 0.0, first_step=1, rule="level")   # steps 3, 5, 6 above 0
    np.testing.assert_allclose(t, [2.5, 4.5, 5.5])
    np.testing.assert_array_equal(np.ceil(t), [3, 5, 6])       # ceil gives the step back (dataset binning)
    t = M.spikes_from_logits(logits, 0.0, first_step=1)        # default: upward crossings only (3, 5)
    np.testing.assert_allclose(t, [2.5, 4.5])
    assert M.spikes_from_logits([1.0, 2.0, -1.0, 3.0], 0.0).tolist() == [-0.5, 2.5]  # above from the start
    with pytest.raises(ValueError, match="spike rule"):
        M.spikes_from_logits(logits, 0.0, rule="edge")


def test_calibrate_threshold_finds_the_separating_logit():
    T = 500
    true = [np.array([100.3, 250.9, 400.0]), np.array([77.2])]
    rng = np.random.default_rng(1)
    logits = []
    for tr in true:
        lg = rng.normal(-6, 1, T - 1)                           # steps 1..T-1
        lg[np.ceil(tr).astype(int) - 1] = 2.0 + rng.uniform(0, 1, tr.size)
        lg[[30, 31]] = 1.0                                      # a decoy below the spikes
        logits.append(lg)
    cal = M.calibrate_threshold(logits, true, [T, T], first_step=1)
    assert cal["gamma"] == pytest.approx(1.0, abs=0.01)
    assert 1.0 < cal["threshold"] < 2.0 and cal["n_pred"] == 4
    # brute force over a grid never beats it
    for thr in np.linspace(-8, 4, 61):
        pred = [M.spikes_from_logits(l, thr, first_step=1) for l in logits]
        assert M.pooled_spike_metrics(pred, true, [T, T])["gamma"] <= cal["gamma"] + 1e-12


def test_calibrate_threshold_count_criterion_matches_the_spike_count():
    """One true spike is missed by the logit and a decoy sits below the hits: maximum Γ leaves the decoy out
    (3 correct spikes), matching the count takes it (4 spikes for 4 true)."""
    T = 500
    true = [np.array([100.3, 250.9, 400.0, 450.5])]
    lg = np.random.default_rng(3).normal(-6, 0.5, T - 1)
    lg[np.ceil(true[0][:3]).astype(int) - 1] = 2.5                # the 4th true spike: no logit peak
    lg[30] = 1.0                                                    # the decoy
    by_gamma = M.calibrate_threshold([lg], true, [T], first_step=1)
    by_count = M.calibrate_threshold([lg], true, [T], first_step=1, criterion="count")
    assert 1.0 < by_gamma["threshold"] < 2.5 and by_gamma["n_pred"] == 3 and by_gamma["criterion"] == "gamma"
    assert by_count["threshold"] < 1.0 and by_count["n_pred"] == 4 and by_count["criterion"] == "count"
    assert by_count["gamma"] < by_gamma["gamma"]
    with pytest.raises(ValueError, match="calibration criterion"):
        M.calibrate_threshold([lg], true, [T], first_step=1, criterion="rate")


def test_rmse_by_group_and_per_segment():
    true = np.zeros((4, 10))
    pred = np.zeros((4, 10))
    pred[0] = 3.0
    pred[2, :5] = 2.0                                          # MSE 2
    rm = M.rmse_per_segment(pred, true)
    np.testing.assert_allclose(rm, [3.0, 0.0, np.sqrt(2.0), 0.0])
    g = M.rmse_by_group(rm ** 2, {"soma": np.array([0]), "basal": np.array([1, 2]), "axon": np.array([], int)})
    assert g["soma"] == pytest.approx(3.0) and g["basal"] == pytest.approx(1.0)
    assert g["all"] == pytest.approx(np.sqrt((9 + 2) / 4)) and "axon" not in g
    sse, n = M.sq_err_per_segment(np.stack([pred, pred]), np.stack([true, true]))
    assert n == 20 and sse[0] == pytest.approx(180.0)


def test_permanent_and_diversity():
    assert M.permanent(np.ones((4, 4))) == pytest.approx(24.0)
    assert M.permanent([[1.0, 2.0], [3.0, 4.0]]) == pytest.approx(1 * 4 + 2 * 3)
    a = np.random.default_rng(2).normal(size=(5, 5))
    brute = sum(np.prod([a[i, p[i]] for i in range(5)]) for p in itertools.permutations(range(5)))
    assert M.permanent(a) == pytest.approx(brute, rel=1e-10)
    # experts: three identical and one different -> distances known
    f = np.zeros((3, 7, 11))
    f[2] = 2.0
    d = M.diversity_metrics(f)
    np.testing.assert_allclose(d["distance"], [[0, 0, 2], [0, 0, 2], [2, 2, 0]])
    assert d["mean"] == pytest.approx(4 / 6) and d["mean_raw"] == pytest.approx(8 / 6)
    Dn = np.array([[0, 0, 1], [0, 0, 1], [1, 1, 0.0]])
    assert d["determinant"] == pytest.approx(np.linalg.det(Dn)) and d["permanent"] == pytest.approx(0.0)
    assert M.diversity_metrics(np.zeros((2, 3)))["mean"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Hay reference based
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(reference_dir):
    from lfdeep_neuron.data.records import read_record

    return read_record(reference_dir / "synaptic_seed1.h5", require=("segments", "synapses", "input_effective"))


def test_segment_groups_of_the_hay_cell(reference):
    seg = reference["segments"]
    g = M.segment_groups(seg)
    assert sum(len(v) for v in g.values()) == 642 and len(np.unique(np.concatenate(list(g.values())))) == 642
    assert g["soma"].tolist() == [0] and g["axon"].tolist() == [640, 641]
    assert len(g["basal"]) == 262
    assert len(g["apical_trunk"]) + len(g["oblique"]) + len(g["tuft"]) == 377
    d = seg["dist_from_soma_um"]
    names = seg["name"]
    trunk_secs = {n.split("(")[0] for n in names[g["apical_trunk"]]}
    assert {"apic[0]", "apic[36]"} <= trunk_secs and "apic[37]" not in trunk_secs
    assert 550 < d[g["apical_trunk"]].max() < 700                 # the main bifurcation of cell1
    assert d[g["tuft"]].min() >= d[g["apical_trunk"]].max() - 1e-9
    assert d[g["oblique"]].min() < 200                           # obliques branch off the proximal trunk
    assert set(names[g["tuft"]]) >= {"apic[37]", "apic[50]"}


def _tiny_model(rec, seed=3, **over):
    from lfdeep_neuron.surrogate.mtl import MMoE

    torch.manual_seed(seed)
    model = MMoE.from_config("tiny", n_segments=642, n_channels=N_CH, **over)
    v = rec["v_1ms"].astype(np.float64)
    model.set_normalization(v.mean(1), v.std(1), v_rest=v[:, 0])
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, _tiny_model(reference), segments=reference["segments"], synapses=reference["synapses"],
                    provenance={"data": "reference (test)"}, metrics={"note": "untrained"})
    return path


def _closed_loop_direct(model, rec, T):
    from lfdeep_neuron.surrogate.stream import closed_loop

    syn, t = rec["input_effective"]["syn_idx"], rec["input_effective"]["t_ms"]
    x = np.zeros((N_CH, T), np.float32)
    k = np.ceil(t).astype(int)
    keep = k < T
    np.add.at(x, (syn[keep], k[keep]), 1.0)
    pred = closed_loop(model, torch.from_numpy(x[None, :, 1:]), v0_mV=model.v_rest[None], output="mV")
    return x, pred.v[0].numpy(), pred.spike_logit[0].numpy()


def test_rollout_record_matches_streamer_and_reader(reference, reference_dir, checkpoint, tmp_path):
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    torch.set_num_threads(1)
    T = 800
    model = load_surrogate(checkpoint)
    x, v_direct, logit_direct = _closed_loop_direct(model, reference, T)
    thr = float(np.quantile(logit_direct, 0.99))
    out = tmp_path / "sur.h5"
    assert main(["rollout", "--model", str(checkpoint), "--inputs", str(reference_dir / "synaptic_seed1.h5"),
                 "--out", str(out), "--duration-ms", str(T), "--spike-threshold", repr(thr), "--no-progress"]) == 0

    # the same reader as NEURON's records, with the same requirements as a generated record
    rec = read_record(out, require=("segments", "synapses", "input", "input_effective", "v_1ms",
                                    "soma_spike_times_ms", "@protocol", "@duration_ms"))
    assert rec["v_1ms"].shape == (642, T) and rec["v_1ms"].dtype == np.float32
    np.testing.assert_array_equal(rec["segments"]["name"], reference["segments"]["name"])
    np.testing.assert_array_equal(rec["input_effective"]["t_ms"], reference["input_effective"]["t_ms"])
    np.testing.assert_array_equal(rec["synapses"]["dead"], reference["synapses"]["dead"])
    assert rec.attrs["protocol"] == "synaptic_beniaguev" and rec.attrs["simulator"] == "lfdeep-neuron surrogate"
    np.testing.assert_allclose(rec["v_1ms"][:, 0], reference["v_1ms"][:, 0], atol=1e-5)   # v_rest = v(0)
    np.testing.assert_allclose(rec["v_1ms"][:, 1:], v_direct, atol=1e-5, rtol=0)
    assert np.ptp(rec["v_1ms"][0]) > 1e-2                           # the trace moves
    np.testing.assert_allclose(rec["spike_logit_1ms"][1:], logit_direct, atol=1e-5)
    steps = np.flatnonzero(M.spike_onsets(logit_direct > thr)) + 1          # upward crossings
    assert steps.size >= 3
    np.testing.assert_allclose(rec["soma_spike_times_ms"], steps - 0.5)

    # the same scoring code on both records
    rm = M.rmse_per_segment(rec["v_1ms"][:, 1:], reference["v_1ms"][:, 1:T])
    np.testing.assert_allclose(rm, np.sqrt(((v_direct - reference["v_1ms"][:, 1:T]) ** 2).mean(1)), rtol=1e-4)


def test_rollout_from_raw_input_drops_dead_synapses(reference, checkpoint, tmp_path):
    from lfdeep_neuron.data.records import RecordFormatError, read_record, write_record
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate
    from lfdeep_neuron.surrogate.rollout import rollout_file

    torch.set_num_threads(1)
    model = load_surrogate(checkpoint)
    T = 300
    assert reference["synapses"]["dead"].any()
    assert reference["input"]["t_ms"].size > reference["input_effective"]["t_ms"].size
    raw = tmp_path / "inputs_only.h5"
    write_record(raw, segments=reference["segments"], synapses=reference["synapses"], traces={},
                 attrs={"protocol": "synaptic_beniaguev", "duration_ms": float(T)}, inputs=reference["input"])
    a = read_record(rollout_file(model, raw, tmp_path / "a.h5", spike_threshold=0.0))
    assert a.attrs["events_used"] == "input minus dead synapses" and a.n_steps == T
    _, v_direct, _ = _closed_loop_direct(model, reference, T)
    np.testing.assert_allclose(a["v_1ms"][:, 1:], v_direct, atol=1e-5)

    empty = tmp_path / "no_events.h5"
    write_record(empty, segments=reference["segments"], traces={}, attrs={"duration_ms": 100.0})
    with pytest.raises(RecordFormatError, match="no /input event group"):
        rollout_file(model, empty, tmp_path / "b.h5")
    bad = tmp_path / "bad_segments.h5"
    seg = {k: v[:10] for k, v in reference["segments"].items()}
    write_record(bad, segments=seg, traces={}, attrs={"duration_ms": 100.0}, inputs=reference["input"])
    with pytest.raises(RecordFormatError, match="10 segments; the model predicts 642"):
        rollout_file(model, bad, tmp_path / "c.h5")


@pytest.fixture(scope="module")
def small_dataset(reference, tmp_path_factory):
    """Windows of the reference as records of a dataset directory: train 2, val 1, test 2 (both spikes in test
    and in val)."""
    from lfdeep_neuron.data.records import write_record

    root = tmp_path_factory.mktemp("ds")
    cuts = {0: (0, 600), 1: (600, 1200), 2: (1150, 1750), 3: (1000, 1600), 4: (1800, 2300)}
    splits = {"train": [0, 1], "val": [2], "test": [3, 4]}
    ev = reference["input_effective"]
    spikes = reference["soma_spike_times_ms"]
    records = []
    for i, (a, b) in cuts.items():
        keep = (ev["t_ms"] > a) & (ev["t_ms"] < b)
        sp = spikes[(spikes > a) & (spikes < b)] - a
        name = f"sim_{i:06d}.h5"
        write_record(root / name, segments=reference["segments"], synapses=reference["synapses"],
                     traces={"v_1ms": reference["v_1ms"][:, a:b], "t_1ms": np.arange(b - a, dtype=float),
                             "soma_spike_times_ms": sp},
                     attrs={"protocol": "synaptic_beniaguev", "duration_ms": float(b - a), "complete": np.int8(1)},
                     inputs_effective={"syn_idx": ev["syn_idx"][keep], "t_ms": ev["t_ms"][keep] - a})
        records.append({"index": i, "file": name})
    (root / "meta.json").write_text(json.dumps({"records": records, "splits": splits}))
    return root, cuts, splits


def test_evaluate_end_to_end(reference, checkpoint, small_dataset, tmp_path):
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate
    from lfdeep_neuron.surrogate.stream import closed_loop

    torch.set_num_threads(1)
    root, cuts, splits = small_dataset
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(checkpoint), "--data", str(root), "--out", str(out),
                 "--update-checkpoint", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for png in ("heatmaps.png", "group_errors.png", "soma_trace.png"):
        assert (out / png).stat().st_size > 10_000
    assert s["data"]["sim_indices"] == splits["test"]

    # recompute the voltage errors directly
    model = load_surrogate(checkpoint)
    mse_tf = np.zeros(642)
    mse_cl = np.zeros(642)
    mse_base = np.zeros(642)
    n = 0
    logits, labels = [], []
    ev = reference["input_effective"]
    for i in splits["test"]:
        a, b = cuts[i]
        T = b - a
        keep = (ev["t_ms"] > a) & (ev["t_ms"] < b)
        x = np.zeros((N_CH, T), np.float32)
        np.add.at(x, (ev["syn_idx"][keep], np.ceil(ev["t_ms"][keep] - a).astype(int)), 1.0)
        v = reference["v_1ms"][:, a:b].astype(np.float32)
        xt, vt = torch.from_numpy(x[None]), torch.from_numpy(v[None])
        with torch.no_grad():
            tf = model(model.make_inputs(xt[..., 1:], vt[..., :-1]))
            cl = closed_loop(model, xt[..., 1:], v0_mV=vt[..., 0], output="mV")
        mse_tf += ((model.to_mV(tf.v)[0].numpy() - v[:, 1:]) ** 2).sum(1)
        mse_cl += ((cl.v[0].numpy() - v[:, 1:]) ** 2).sum(1)
        mse_base += ((model.v_mean.numpy()[:, None].astype(np.float64) - v[:, 1:]) ** 2).sum(1)
        n += T - 1
        logits.append(cl.spike_logit[0].numpy())
        lab = np.zeros(T - 1)
        sp = reference["soma_spike_times_ms"]
        lab[np.ceil(sp[(sp > a) & (sp < b)] - a).astype(int) - 1] = 1
        labels.append(lab)
    vt_ = s["voltage"]
    assert vt_["teacher_forced"]["all"] == pytest.approx(np.sqrt((mse_tf / n).mean()), rel=1e-4)
    assert vt_["closed_loop"]["all"] == pytest.approx(np.sqrt((mse_cl / n).mean()), rel=1e-4)
    assert vt_["baseline_train_mean"]["all"] == pytest.approx(np.sqrt((mse_base / n).mean()), rel=1e-6)
    g = M.segment_groups(reference["segments"])
    for name, idx in g.items():
        if len(idx):
            assert vt_["closed_loop"][name] == pytest.approx(np.sqrt((mse_cl[idx] / n).mean()), rel=1e-4)
    assert s["spikes"]["auc_cl"] == pytest.approx(M.spike_auc(np.concatenate(logits), np.concatenate(labels)))
    assert s["spikes"]["closed_loop"]["n_true"] == 2

    # threshold: calibrated on the val simulation, stored in the checkpoint
    thr = s["spikes"]["threshold_logit"]
    assert s["spikes"]["calibration"]["sim_indices"] == splits["val"]
    assert load_surrogate(checkpoint).meta["metrics"]["spike_threshold_logit"] == pytest.approx(thr)
    assert load_surrogate(checkpoint).meta["metrics"]["note"] == "untrained"      # merged, not replaced
    # experts: 3 experts of the tiny MMoE, distances > 0 for an untrained (random) model
    e = s["experts"]
    assert e["n_experts"] == 3 and 0 < e["mean"] <= 1 and np.array(e["distance"]).shape == (3, 3)
    rows = (out / "per_segment.csv").read_text().splitlines()
    assert len(rows) == 643 and rows[1].startswith("0,soma[0],soma,")


def test_compare_cli_scores_records(reference_dir, tmp_path, capsys):
    """``lfdeep-neuron compare``: a record shifted by 1 mV with one spike missing and one 1.5 ms late."""
    import json

    from lfdeep_neuron.cli import main
    from lfdeep_neuron.data.records import RecordFormatError, read_record, write_record

    ref_path = reference_dir / "synaptic_seed1.h5"
    rec = read_record(ref_path)
    kw = rec.write_kwargs()
    true_sp = np.asarray(rec["soma_spike_times_ms"])
    assert true_sp.size == 2
    kw["traces"] = dict(kw["traces"], v_1ms=(rec["v_1ms"].astype(np.float64) + 1.0).astype(np.float32),
                        soma_spike_times_ms=true_sp[:1] + 1.5)
    shifted = write_record(tmp_path / "shifted.h5", **kw)
    assert main(["compare", "--pred", str(shifted), "--true", str(ref_path), "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["rmse_mV"]["all"] == pytest.approx(1.0, abs=1e-4)
    assert out["rmse_mV"]["soma"] == pytest.approx(1.0, abs=1e-4)
    v = rec["v_1ms"].astype(np.float64)
    assert out["rmse_mV_constant_baseline"]["all"] == pytest.approx(np.sqrt(v.var(axis=1).mean()), rel=1e-6)
    s = out["spikes"]
    assert (s["n_pred"], s["n_true"], s["n_coinc"]) == (1, 2, 1)
    nu = 1 / 3000.0
    assert s["gamma"] == pytest.approx((1 - 2 * nu * 2.0 * 2) / 1.5 / (1 - 2 * nu * 2.0))
    assert "Γ = " in capsys.readouterr().out
    # the same record scores perfectly; a record of another length is refused by name
    assert main(["compare", "--pred", str(ref_path), "--true", str(ref_path)]) == 0
    kw["traces"] = dict(kw["traces"], v_1ms=rec["v_1ms"][:, :100], t_1ms=rec["t_1ms"][:100])
    short = write_record(tmp_path / "short.h5", **kw)
    capsys.readouterr()
    assert main(["compare", "--pred", str(short), "--true", str(ref_path)]) == 2   # bad input: one line, exit 2
    err = capsys.readouterr().err
    assert "v_1ms shapes differ" in err and str(short) in err and len(err.strip().splitlines()) == 1
    with pytest.raises(RecordFormatError, match="v_1ms shapes differ"):          # the Python API raises
        main(["--debug", "compare", "--pred", str(short), "--true", str(ref_path)])


def test_rollout_refuses_non_finite_predictions(reference):
    from lfdeep_neuron.surrogate.rollout import rollout

    model = _tiny_model(reference)
    with torch.no_grad():
        model.towers.b2.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite from step 1 on"):
        rollout(model, np.zeros((N_CH, 20), np.float32))


def test_evaluate_adds_the_checkpoints_spike_waveform(reference, checkpoint, small_dataset, tmp_path):
    """A checkpoint with a spike waveform: evaluate's closed-loop voltages carry it at exactly the predicted
    spikes (upward crossings of the threshold), as the engine and rollout do; nowhere else."""
    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate, write_spike_waveform
    from lfdeep_neuron.surrogate.evaluate import evaluate
    from lfdeep_neuron.surrogate.metrics import spike_onsets
    from lfdeep_neuron.surrogate.waveform import SpikeWaveform

    torch.set_num_threads(1)
    root, _, _ = small_dataset
    kernel = np.zeros((642, 3))
    kernel[0] = [100.0, 40.0, 0.0]
    with_wf = write_spike_waveform(checkpoint, SpikeWaveform(kernel_v_mV=kernel), out=tmp_path / "wf.pt")
    ds = SimulationDataset(root, split="test", fields=("x_syn", "v", "spike"))
    plain = load_surrogate(checkpoint)
    _, a0 = evaluate(plain, ds, spike_threshold=0.0)
    thr = float(np.quantile(a0["logit_cl"], 0.9))        # a threshold the untrained logits do cross
    _, a = evaluate(plain, ds, spike_threshold=thr)
    s, b = evaluate(load_surrogate(with_wf), ds, spike_threshold=thr)
    onsets = np.flatnonzero(spike_onsets(a["logit_cl"] > thr))
    assert onsets.size > 0
    added = b["v_cl"] - a["v_cl"]
    expect = np.zeros(added.shape[1])
    for k in onsets:                                     # a new spike restarts the waveform
        expect[k:k + 3] = kernel[0, :min(3, expect.size - k)]
    np.testing.assert_allclose(added[0], expect, atol=1e-4)
    assert np.abs(added[1:]).max() == 0.0
    assert s["spike_waveform"].startswith("added")


def _history_checkpoint(reference, tmp_path):
    """A tiny untrained spike-history model and its checkpoint (one torch thread)."""
    from lfdeep_neuron.surrogate.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    model = _tiny_model(reference, seed=4, spike_history=True, feedback=False)
    ckpt = save_checkpoint(tmp_path / "hist.pt", model, segments=reference["segments"],
                           synapses=reference["synapses"], provenance={"data": "reference (test)"})
    return model, ckpt


def test_evaluate_calibrates_a_spike_history_model_with_one_run_per_threshold(reference, small_dataset, tmp_path):
    """A model that reads its own spikes: every candidate threshold is scored by its own closed-loop run, and
    the reported calibration and test spikes equal independent closed-loop runs at those thresholds."""
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate
    from lfdeep_neuron.surrogate.stream import closed_loop

    root, cuts, splits = small_dataset
    model, ckpt = _history_checkpoint(reference, tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(root), "--out", str(out), "--update-checkpoint",
                 "--no-progress", "--no-figures"]) == 0
    s = json.loads((out / "summary.json").read_text())
    cal = s["spikes"]["calibration"]
    assert cal["method"].startswith("streamed") and cal["sim_indices"] == splits["val"]
    assert cal["n_candidates"] >= 12 and len(cal["tried"]) == cal["n_candidates"]
    thr = s["spikes"]["threshold_logit"]
    assert thr == cal["threshold"] == pytest.approx(load_surrogate(ckpt).meta["metrics"]["spike_threshold_logit"])

    def run(split, threshold):
        ds = SimulationDataset(root, split=split, window_ms=None, fields=("x_syn", "v", "spike"))
        pred, true, dur = [], [], []
        for pos, rec in enumerate(ds.records):
            item = ds[pos]
            cl = closed_loop(model, item["x_syn"][None, :, 1:], v0_mV=item["v"][None, :, 0],
                             spike_threshold=threshold)
            pred.append(np.flatnonzero(cl.spiked[0].numpy()) + 1 - 0.5)
            true.append(np.asarray(rec.spike_times_ms))
            dur.append(rec.n_steps)
        return M.pooled_spike_metrics(pred, true, dur)

    for t, g, n_pred in cal["tried"][:: max(1, len(cal["tried"]) // 4)]:   # a few of the candidates
        m = run("val", t)
        assert m["n_pred"] == n_pred and (m["gamma"] == pytest.approx(g) or (math.isnan(g) and math.isnan(m["gamma"])))
    assert any(n > 0 for _, _, n in cal["tried"])                           # the candidates do emit spikes
    test = run("test", thr)
    assert s["spikes"]["closed_loop"]["n_pred"] == test["n_pred"]
    assert s["spikes"]["closed_loop"]["n_coinc"] == test["n_coinc"]


def test_evaluate_count_calibration_of_a_spike_history_model(reference, small_dataset, tmp_path):
    """``evaluate --calibrate count``: the chosen candidate is the tried one whose spike count is closest to the
    validation split's true count."""
    from lfdeep_neuron.cli import main

    root, _, _ = small_dataset
    _, ckpt = _history_checkpoint(reference, tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(root), "--out", str(out), "--calibrate", "count",
                 "--no-progress", "--no-figures"]) == 0
    s = json.loads((out / "summary.json").read_text())
    cal = s["spikes"]["calibration"]
    assert cal["criterion"] == "count" and "spike count matched" in s["spikes"]["threshold_source"]
    gap = {t: abs(n - cal["n_true"]) for t, _, n in cal["tried"]}
    assert gap[cal["threshold"]] == min(gap.values())


def test_generalisation_gap_scores_match_a_direct_computation(reference, checkpoint, small_dataset, benchmark_module):
    """``benchmarks/generalisation_gap.py``: the teacher-forced train/val scores, bin for bin as a per-simulation
    computation gives them (first ``skip_ms`` left out, outputs of step k scored against bin k + 1)."""
    import torch.nn.functional as F

    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    gap = benchmark_module("generalisation_gap")
    root, cuts, splits = small_dataset
    model = load_surrogate(checkpoint)
    ds = SimulationDataset(root, split="test", window_ms=None, fields=("x_syn", "v", "spike"))
    got = gap.split_scores(model, ds, max_sims=2, skip_ms=100, batch=4)
    lg, lb, sq, n, sq_soma = [], [], 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(2):
            it = ds[i]
            x, v, sp = it["x_syn"][None], it["v"][None].float(), it["spike"][None]
            out = model(model.make_inputs(x[..., 1:], v[..., :-1], sp[..., :-1]))
            pred, true = model.to_mV(out.v).float()[0, :, 100:], v[0, :, 101:]
            sq += float(((pred - true) ** 2).sum()); n += true.numel()
            sq_soma += float(((pred[0].clamp_max(-55.0) - true[0].clamp_max(-55.0)) ** 2).sum())
            lg.append(out.spike_logit.float()[0, 100:]); lb.append(sp[0, 101:].float())
    lg, lb = torch.cat(lg), torch.cat(lb)
    assert got["n_sims"] == 2 and got["n_spikes"] == int(lb.sum()) > 0
    assert got["bce"] == pytest.approx(float(F.binary_cross_entropy_with_logits(lg, lb)), rel=1e-5)
    assert got["auc"] == pytest.approx(M.spike_auc(lg.numpy(), lb.numpy() > 0.5))
    assert got["all_mV"] == pytest.approx((sq / n) ** 0.5, rel=1e-5)
    assert got["soma_clip_mV"] == pytest.approx((sq_soma / lb.numel()) ** 0.5, rel=1e-5)
    assert got["all_mV"] > got["soma_clip_mV"] > 0                     # an untrained model: errors everywhere


def test_inference_benchmark_times_a_checkpoint(checkpoint, benchmark_module, tmp_path):
    """``benchmarks/inference.py --model CKPT`` times that checkpoint (not the untrained --archs/--configs),
    one row per population size, its speed-up the given NEURON cost over the timed step."""
    import json

    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    bench = benchmark_module("inference")
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(checkpoint), "--n-cells", "1", "3", "--device", "cpu", "--threads", "1",
                       "--neuron-ms-per-ms", "9", "--budget-s", "0.01", "--min-steps", "2", "--max-steps", "3",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    model = load_surrogate(checkpoint)
    assert [(r["arch"], r["config"], r["n_cells"]) for r in rows] == [(model.arch, "tiny", 1), (model.arch, "tiny", 3)]
    for r in rows:
        assert r["params"] == model.num_parameters() and r["s_per_step"] > 0
        assert r["speedup_vs_neuron"] == pytest.approx(9e-3 * r["n_cells"] / r["s_per_step"])
    # bad input: one error naming the file, before any timing (NEURON's included)
    from lfdeep_neuron.errors import InputError

    quick = ["--n-cells", "1", "--device", "cpu", "--threads", "1"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        bench.main(["--model", str(tmp_path / "missing.pt"), *quick])
    with pytest.raises(InputError, match="--set"):
        bench.main(["--model", str(checkpoint), "--set", "channels=64", *quick])
