"""The bundled surrogate (``models/DEFAULT``) against NEURON on held-out inputs: a regression guard.

The inputs of ``../shared/hay/reference/synaptic_seed1.h5`` (generator seed 1) were never in the training
data (dataset seed 2026). Bounds are the bundled model's measured numbers (``models/MODEL_CARD.md``) with a
margin: they catch a broken or mismatched checkpoint, a change of binning, time convention or
normalisation, not run-to-run noise (the model is deterministic on the CPU).

* closed loop over the whole 3 s: all-segment and somatic ``v_1ms`` RMSE below the constant baseline
  (the reference's own per-segment time mean, which knows the answer's mean), the somatic RMSE clipped at
  -55 mV, and the time convention (the fit is best without a shift);
* spike placement where the detailed cell fires many times (HayL5PC on held-out `excited` input): spike
  count, Γ ±2 ms, and the spike AUC with a 5-ms-shifted control;
* LFP (16-contact laminar probe) from the predicted bin-mean membrane currents against NEURON's bin-mean
  ``i_membrane_`` (Crank–Nicolson, dt 0.05 ms): median correlation over contacts, over the first 500 ms
  (no somatic spike) and over the whole 3 s (the reference's two spikes included).
"""
from __future__ import annotations

import numpy as np
import pytest

# measured on the bundled model (models/DEFAULT) by these tests' own computations, with margin
MAX_RMSE_ALL_MV = 4.3            # closed loop, all segments, 3 s (measured 3.83; constant baseline 6.65)
MAX_RMSE_SOMA_MV = 2.8           # closed loop, soma (measured 2.26, no spike; constant baseline 3.54)
MAX_RMSE_SOMA_CLIPPED_MV = 1.35  # closed loop, soma clipped at -55 mV (measured 1.15; constant 2.91)
MIN_SPIKE_AUC = 0.85             # spike logit vs the cell's spikes, 3 s of held-out `excited` input (measured 0.889)
MIN_AUC_DROP_5MS = 0.01          # ... minus its AUC against the same labels 5 ms late (measured 0.022)
MIN_GAMMA_2MS = 0.08             # Γ ±2 ms, closed loop, same input (measured 0.126; ±5 ms 0.175)
MIN_COUNT_RATIO, MAX_COUNT_RATIO = 0.5, 1.4   # emitted / true spikes, same input (measured 11 / 17)
MIN_LFP_MEDIAN_CORR = 0.65       # 500 ms without somatic spikes, predicted currents vs NEURON (measured 0.77)
MIN_LFP_MEDIAN_CORR_3S = 0.4     # the whole 3 s, spikes included (measured 0.49)


@pytest.fixture(scope="module")
def bundled():
    from lfdeep_neuron.surrogate.checkpoint import MODELS_DIR, bundled_checkpoint, load_surrogate

    path = bundled_checkpoint()
    assert path is not None and (MODELS_DIR / "DEFAULT").is_file(), "models/DEFAULT must name a bundled checkpoint"
    return path, load_surrogate(path)


def test_closed_loop_voltages_beat_the_constant_baseline(bundled, reference_dir, tmp_path):
    from lfdeep_neuron.cli import main
    from lfdeep_neuron.surrogate.compare import compare_records

    path, _ = bundled
    ref = reference_dir / "synaptic_seed1.h5"
    out = tmp_path / "rollout.h5"
    assert main(["rollout", "--model", str(path), "--inputs", str(ref), "--out", str(out), "--no-progress"]) == 0
    c = compare_records(out, ref)
    rmse, base = c["rmse_mV"], c["rmse_mV_constant_baseline"]
    print(f"bundled model closed loop on synaptic_seed1: RMSE {rmse}, constant baseline {base}, spikes {c['spikes']}")
    assert rmse["all"] < min(MAX_RMSE_ALL_MV, base["all"])
    assert rmse["soma"] < min(MAX_RMSE_SOMA_MV, base["soma"])
    import h5py

    with h5py.File(out, "r") as f, h5py.File(ref, "r") as g:
        v_pred, v_true = f["v_1ms"][()].astype(np.float64), g["v_1ms"][()].astype(np.float64)
    clipped = float(np.sqrt(np.mean((np.minimum(v_pred[0, 1:], -55.0) - np.minimum(v_true[0, 1:], -55.0)) ** 2)))
    print(f"soma RMSE clipped at -55 mV {clipped:.3f}")
    assert clipped < MAX_RMSE_SOMA_CLIPPED_MV
    # Time convention (fault: the prediction 2 ms late passed the bounds above, 4.135 / 2.269 / 1.160 mV):
    # the prediction must fit the truth best without a shift, all segments and the clipped soma alike.
    def err(shift):
        a, b = v_pred[:, 100 + shift:2900 + shift], v_true[:, 100:2900]
        return (float(np.sqrt(np.mean((a - b) ** 2))),
                float(np.sqrt(np.mean((np.minimum(a[0], -55) - np.minimum(b[0], -55)) ** 2))))
    errors = {shift: err(shift) for shift in (-2, -1, 0, 1, 2)}
    print("RMSE (all, soma clipped) by shift of the prediction:", errors)
    for shift in (-2, -1, 1, 2):
        assert errors[0][0] < errors[shift][0] and errors[0][1] < errors[shift][1], shift


def test_spike_placement_on_held_out_input_where_the_cell_fires(bundled, morphology):
    """Issue: with the reference's two spikes the AUC check passed labels shifted by ±20 ms (0.921) while the
    model emitted no spike. Here the detailed cell fires many times (3 s of the `excited` generator, a seed no
    corpus uses); the bundled surrogate, closed loop, must emit about as many spikes and place them (Γ ±2 ms).
    The AUC stays, beside it, with the labels shifted by 5 ms as its control."""
    from lfdeep_neuron.data.dataset import bin_events, spike_indicator
    from lfdeep_neuron.equivalence import NetworkSpec, background_events, run_detailed
    from lfdeep_neuron.surrogate.metrics import coincidence_factor, spike_auc
    from lfdeep_neuron.surrogate.rollout import rollout

    _, model = bundled
    T = 3000
    syn, t = background_events(0, model.meta["segments"], model.meta["synapses"], T, "excited", dataset_seed=9301)
    cell = run_detailed(NetworkSpec(1, T, {0: (syn, t)}), morphology)
    true = cell["spike_t_ms"][cell["spike_t_ms"] >= 100]
    out = rollout(model, bin_events(syn, t, model.n_channels, 0, T))
    pred = out["soma_spike_times_ms"][out["soma_spike_times_ms"] >= 100]
    gamma = coincidence_factor(pred - 100, true - 100, T - 100, 2.0)
    gamma5 = coincidence_factor(pred - 100, true - 100, T - 100, 5.0)
    logit = out["spike_logit_1ms"][1:]
    labels = spike_indicator(cell["spike_t_ms"], 0, T)[1:]
    auc = spike_auc(logit, labels)
    auc_shifted = spike_auc(logit, np.roll(labels, 5))
    print(f"cell {true.size} spikes, surrogate {pred.size}; Γ ±2 ms {gamma:.3f}, ±5 ms {gamma5:.3f}; "
          f"AUC {auc:.4f} (labels 5 ms late: {auc_shifted:.4f})")
    assert true.size >= 8                                            # the input makes the cell fire (the test's premise)
    assert MIN_COUNT_RATIO * true.size <= pred.size <= MAX_COUNT_RATIO * true.size
    assert gamma > MIN_GAMMA_2MS
    assert auc > MIN_SPIKE_AUC and auc - auc_shifted > MIN_AUC_DROP_5MS


def test_lfp_from_predicted_currents_follows_neuron(bundled, reference_dir, morphology):
    import torch

    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.data.records import read_record
    from lfdeep_neuron.hay import HayL5PC
    from lfdeep_neuron.hay.simulate import run_cell
    from lfdeep_neuron.lfp import PopulationLFP, SegmentGeometry, laminar_probe
    from lfdeep_neuron.surrogate.stream import closed_loop

    _, model = bundled
    if not model.config.imem_tasks:
        pytest.skip("the bundled model has no membrane-current tasks")
    T = 3000
    rec = read_record(reference_dir / "synaptic_seed1.h5", require=("input_effective",))
    syn, t = np.asarray(rec["input_effective"]["syn_idx"]), np.asarray(rec["input_effective"]["t_ms"])
    cell = HayL5PC(morphology)
    cell.set_input_events(syn, t)
    neuron = run_cell(cell, T, integrator="fixed_cn", dt_ms=0.05, record_imem=True)
    pop = PopulationLFP.from_geometries([SegmentGeometry.from_cell(cell)], laminar_probe())
    phi_n = pop.from_currents(neuron["imem_mean_1ms"][None].astype(np.float64))[1:]    # [T, E]
    x = torch.from_numpy(bin_events(syn, t, model.n_channels, 0, T)[None, :, 1:])
    torch.set_num_threads(1)
    pred = closed_loop(model, x, v0_mV=model.v_rest[None], output="mV")
    phi_s = pop.from_currents(pred.imem.double().numpy())

    def median_corr(n):
        a, b = phi_s[:n] - phi_s[:n].mean(0, keepdims=True), phi_n[:n] - phi_n[:n].mean(0, keepdims=True)
        return float(np.median((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))))

    c500, c3s = median_corr(499), median_corr(T - 1)
    print(f"LFP median correlation over contacts: first 500 ms {c500:.3f}, whole 3 s {c3s:.3f}")
    assert c500 > MIN_LFP_MEDIAN_CORR
    assert c3s > MIN_LFP_MEDIAN_CORR_3S


def test_lfp_example_true_spikes_equal_closed_loop_given_the_same_spikes(bundled, reference_dir):
    """`examples/lfp_single_cell.py --true-spikes` scores the surrogate with NEURON's spikes in place of its
    own (one teacher-forced pass, AP added at them). Handed the spikes the model emits itself, that pass must
    reproduce the closed-loop currents exactly: the spike history is the model's only feedback."""
    import importlib.util
    from pathlib import Path

    from lfdeep_neuron.data.dataset import bin_events
    from lfdeep_neuron.data.records import read_record

    _, model = bundled
    if not model.config.imem_tasks:
        pytest.skip("the bundled model has no membrane-current tasks")
    path = Path(__file__).resolve().parent.parent / "examples" / "lfp_single_cell.py"
    spec = importlib.util.spec_from_file_location("lfp_single_cell_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    T = 1500
    rec = read_record(reference_dir / "synaptic_seed1.h5", require=("input_effective",))
    # every synaptic weight x 1.2: the test needs spikes of the model's own, and the bundled model emits none on
    # synaptic_seed1 as it is (model card; 3 near 1.35 s with this drive)
    x = 1.2 * bin_events(rec["input_effective"]["syn_idx"], rec["input_effective"]["t_ms"], model.n_channels, 0, T)
    _, imem_cl, spikes = example.run_surrogate(model, x)
    assert spikes.size >= 1, "the bundled model emits a spike in the first 1.5 s of synaptic_seed1 at 1.2x drive"
    imem_forced = example.run_with_true_spikes(model, x, spikes)
    np.testing.assert_allclose(imem_forced, imem_cl, atol=1e-5 * np.abs(imem_cl).max())   # measured 4e-7 of the max
    imem_none = example.run_with_true_spikes(model, x, np.array([]))   # no spike: no AP in the currents
    assert np.abs(imem_none - imem_cl).max() > 0.1 * np.abs(imem_cl).max()
