"""The bundled surrogate (``models/DEFAULT``) against NEURON on held-out inputs: a regression guard.

The inputs of ``../shared/hay/reference/synaptic_seed1.h5`` (generator seed 1) were never in the training
data (dataset seed 2026). Bounds are the bundled model's measured numbers (``models/MODEL_CARD.md``) with a
margin: they catch a broken or mismatched checkpoint, a change of binning, time convention or
normalisation, not run-to-run noise (the model is deterministic on the CPU).

* closed loop over the whole 3 s: all-segment and somatic ``v_1ms`` RMSE below the constant baseline
  (the reference's own per-segment time mean, which knows the answer's mean), the somatic RMSE clipped at
  -55 mV, and the spike logit's AUC against the reference's two somatic spikes (a broken or misaligned spike
  output scores ~0.5 or below);
* LFP (16-contact laminar probe) of the first 500 ms from the predicted bin-mean membrane currents
  against NEURON's bin-mean ``i_membrane_``: median correlation over contacts.
"""
from __future__ import annotations

import numpy as np
import pytest

# measured on the bundled model (models/MODEL_CARD.md), with margin
MAX_RMSE_ALL_MV = 4.3            # closed loop, all segments, 3 s (measured 3.78; constant baseline 6.65)
MAX_RMSE_SOMA_MV = 2.8           # closed loop, soma (measured 2.24, no spike; constant baseline 3.54)
MAX_RMSE_SOMA_CLIPPED_MV = 1.35  # closed loop, soma clipped at -55 mV (measured 1.11; constant 2.91)
MIN_SPIKE_AUC = 0.84             # spike logit vs the 2 reference spikes, 1-ms bins (measured 0.92)
MIN_LFP_MEDIAN_CORR = 0.65       # 500 ms without somatic spikes, predicted currents vs NEURON (measured 0.80)


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

    from lfdeep_neuron.data.dataset import spike_indicator
    from lfdeep_neuron.surrogate.metrics import spike_auc

    with h5py.File(out, "r") as f, h5py.File(ref, "r") as g:
        logit, v_soma = f["spike_logit_1ms"][1:], f["v_1ms"][0, 1:]
        true_soma, true_spikes = g["v_1ms"][0, 1:], g["soma_spike_times_ms"][()]
    clipped = float(np.sqrt(np.mean((np.minimum(v_soma, -55.0) - np.minimum(true_soma, -55.0)) ** 2)))
    auc = spike_auc(logit, spike_indicator(true_spikes, 0, logit.size + 1)[1:])
    print(f"soma RMSE clipped at -55 mV {clipped:.3f}, spike AUC {auc:.3f}")
    assert clipped < MAX_RMSE_SOMA_CLIPPED_MV
    assert auc > MIN_SPIKE_AUC


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
    T = 500
    rec = read_record(reference_dir / "synaptic_seed1.h5", require=("input_effective",))
    syn, t = np.asarray(rec["input_effective"]["syn_idx"]), np.asarray(rec["input_effective"]["t_ms"])
    keep = t < T - 1e-9
    cell = HayL5PC(morphology)
    cell.set_input_events(syn[keep], t[keep])
    neuron = run_cell(cell, T, record_imem=True)
    pop = PopulationLFP.from_geometries([SegmentGeometry.from_cell(cell)], laminar_probe())
    phi_n = pop.from_currents(neuron["imem_mean_1ms"][None].astype(np.float64))[1:]    # [T, E]
    x = torch.from_numpy(bin_events(syn, t, model.n_channels, 0, T)[None, :, 1:])
    torch.set_num_threads(1)
    pred = closed_loop(model, x, v0_mV=model.v_rest[None], output="mV")
    phi_s = pop.from_currents(pred.imem.double().numpy())
    a, b = phi_s - phi_s.mean(0, keepdims=True), phi_n - phi_n.mean(0, keepdims=True)
    corr = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    print(f"LFP correlation per contact: {np.round(corr, 3)}")
    assert np.median(corr) > MIN_LFP_MEDIAN_CORR


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
