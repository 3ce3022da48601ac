"""Replay the reference recordings of the original Hay implementation and compare (issue 2, "done when").

Each file in ``shared/hay/reference`` is replayed with the real console command
``lfdeep-neuron replay`` (CVODE atol 1e-3, as the references) and compared with its recorded output.
The bounds are what this code achieves against the published solver (measured under NEURON 9.0.2 on
2026-12-08, margins stated at each bound), so that a replay that is merely close -- Crank-Nicolson at
dt 0.05 ms, the generator's default, measured alongside -- fails (issue 33, "Why" item 3: the old
bounds of +-1 ms, RMSE < 1 mV and counts +-1 passed CN at dt 0.1 with 0.5 mV and wrong counts):

* ``synaptic_seed1.h5`` (3 s of synaptic bombardment): the same somatic spikes to 1e-4 ms, all-segment
  ``v_1ms`` RMSE <= 1e-5 mV and max <= 1e-3 mV, soma ``v_soma_0p1ms`` max <= 1e-2 mV, CVODE steps +-2;
* ``step_0p619.h5``, ``step_0p793.h5`` (Hay's somatic current steps): exactly the reference's spike count,
  first spike to 1e-3 ms, every segment to 1e-4 mV until that spike; after it repetitive firing drifts in
  phase at atol 1e-3 (measured <= 2.04 ms), bounded at 3 ms;
* every ``segments/mech/*`` value to 1e-6 relative, geometry, and the record layout.

The synaptic replay takes ~1.5 minutes of one core (3 s of a 642-compartment cell at ~20 CVODE steps/ms).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

FILES = ("synaptic_seed1", "step_0p619", "step_0p793")


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "lfdeep-neuron"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lfdeep_neuron.cli"]


@pytest.fixture(scope="module")
def replays(tmp_path_factory, reference_dir, morphology):
    """Run the replay CLI once per reference file; map name -> (ours, reference) paths."""
    out_dir = tmp_path_factory.mktemp("replay")
    done = {}
    for name in FILES:
        ref = reference_dir / f"{name}.h5"
        if not ref.exists():
            pytest.skip(f"reference {ref} missing")
        out = out_dir / f"{name}.h5"
        proc = subprocess.run(_cli() + ["replay", "--morphology", str(morphology), "--inputs", str(ref),
                                        "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=1200,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert out.exists() and f"wrote {out}" in proc.stdout
        done[name] = (out, ref)
    return done


def _spikes(path):
    with h5py.File(path, "r") as f:
        return f["soma_spike_times_ms"][()]


def test_synaptic_seed1_spikes_and_voltages(replays):
    ours_path, ref_path = replays["synaptic_seed1"]
    ours, ref = _spikes(ours_path), _spikes(ref_path)
    print(f"synaptic_seed1 spikes ours {ours} reference {ref}")
    assert len(ref) >= 1
    assert len(ours) == len(ref), (ours, ref)
    # measured 3.7e-6 ms; bound 1e-4 ms (margin ~27x). CN dt 0.05: 0.085 and 0.37 ms -> fails by ~850x.
    assert np.max(np.abs(ours - ref)) <= 1e-4, (ours, ref)
    with h5py.File(ours_path, "r") as a, h5py.File(ref_path, "r") as b:
        va, vb = a["v_1ms"][()].astype(np.float64), b["v_1ms"][()].astype(np.float64)
        assert va.shape == vb.shape == (642, 3000)
        rmse = float(np.sqrt(np.mean((va - vb) ** 2)))
        v_max = float(np.max(np.abs(va - vb)))
        soma_max = float(np.max(np.abs(a["v_soma_0p1ms"][()].astype(np.float64) - b["v_soma_0p1ms"][()])))
        steps, ref_steps = int(a.attrs["integrator_steps"]), int(b.attrs["integrator_steps"])
        print(f"synaptic_seed1 all-segment v_1ms RMSE {rmse:.3g} mV, max |dv| {v_max:.3g} mV, soma 0.1-ms "
              f"max |dv| {soma_max:.3g} mV, steps {steps} (reference {ref_steps})")
        # measured RMSE 2.6e-7 mV (float32 rounding of the records), max 3.3e-5 mV, soma 7.6e-4 mV; bounds
        # 1e-5 / 1e-3 / 1e-2 mV (margins ~40x, 30x, 13x). CN dt 0.05: 0.22 / 45 / 64 mV.
        assert rmse <= 1e-5
        assert v_max <= 1e-3
        assert soma_max <= 1e-2
        # CVODE's step count is a fingerprint of the equations and tolerances: measured 62797 vs 62796
        assert abs(steps - ref_steps) <= 2
        # the events replayed are the reference's effective ones, copied into the output
        for g in ("input", "input_effective"):
            for k in ("syn_idx", "t_ms"):
                np.testing.assert_array_equal(a[f"{g}/{k}"][()], b[f"{g}/{k}"][()])
        np.testing.assert_array_equal(a["synapses/dead"][()], b["synapses/dead"][()])


@pytest.mark.parametrize("name", ["step_0p619", "step_0p793"])
def test_current_steps_count_and_first_spike(replays, name):
    ours_path, ref_path = replays[name]
    with h5py.File(ref_path, "r") as f:
        delay, dur = float(f.attrs["step_delay_ms"]), float(f.attrs["step_dur_ms"])
    ours, ref = _spikes(ours_path), _spikes(ref_path)
    in_step = lambda s: s[(s >= delay) & (s < delay + dur)]  # noqa: E731
    with h5py.File(ours_path, "r") as a, h5py.File(ref_path, "r") as b:
        first = int(np.floor(ref[0]))                 # every bin before the reference's first spike
        pre = float(np.max(np.abs(a["v_1ms"][:, :first].astype(np.float64) - b["v_1ms"][:, :first])))
    shift = np.max(np.abs(ours - ref)) if len(ours) == len(ref) else np.inf
    print(f"{name}: {len(in_step(ours))} spikes in the step (reference {len(in_step(ref))}), first at "
          f"{in_step(ours)[:1]} ms (reference {in_step(ref)[:1]}), all segments before it max |dv| {pre:.3g} mV, "
          f"max shift of paired spikes {shift} ms")
    assert len(in_step(ref)) >= 10
    assert len(in_step(ours)) == len(in_step(ref))            # exact: measured 20/20 and 28/28
    assert len(ours) - len(in_step(ours)) == len(ref) - len(in_step(ref)) == 0   # silent outside the step
    # measured 8e-7 ms and 4e-11 ms; bound 1e-3 ms. CN dt 0.05: 0.245 and 0.050 ms.
    assert abs(in_step(ours)[0] - in_step(ref)[0]) <= 1e-3
    # measured 7.6e-6 mV (one float32 step) on both; bound 1e-4 mV. CN dt 0.05: 8.3 and 0.42 mV.
    assert pre <= 1e-4
    # later spikes drift in phase at atol 1e-3: measured max shift 2.04 ms (0.619 nA) and 0.57 ms
    # (0.793 nA); bound 3 ms (margin ~1.5x). CN dt 0.05: 6.4 and 4.5 ms.
    assert shift <= 3.0


@pytest.mark.parametrize("name", FILES)
def test_replayed_record_layout_and_parameters(replays, name):
    """Same groups, columns and root attributes as the reference; mech to 1e-6 relative."""
    ours_path, ref_path = replays[name]
    with h5py.File(ours_path, "r") as a, h5py.File(ref_path, "r") as b:
        def datasets(f):
            out = []
            f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
            return set(out)
        assert datasets(b) <= datasets(a), datasets(b) - datasets(a)
        for key in ("protocol", "duration_ms", "v_init_mV", "celsius", "integrator", "cvode_atol",
                    "neuron_version", "integrator_steps", "n_soma_spikes"):
            assert key in a.attrs, key
        assert a.attrs["protocol"] == b.attrs["protocol"]
        assert a.attrs["integrator"] == "cvode" and a.attrs["cvode_atol"] == 1e-3
        for k in b["segments/mech"]:
            np.testing.assert_allclose(a[f"segments/mech/{k}"][()], b[f"segments/mech/{k}"][()], rtol=1e-6,
                                       err_msg=k)
        for k in ("area_um2", "diam_um", "length_um", "dist_from_soma_um"):
            np.testing.assert_allclose(a[f"segments/{k}"][()], b[f"segments/{k}"][()], rtol=1e-6, err_msg=k)
        for k in ("name", "sec_type", "parent_seg", "sec_index"):
            np.testing.assert_array_equal(a[f"segments/{k}"][()], b[f"segments/{k}"][()], err_msg=k)
        np.testing.assert_array_equal(a["t_1ms"][()], b["t_1ms"][()])
        np.testing.assert_array_equal(a["t_0p1ms"][()], b["t_0p1ms"][()])
        assert a["v_1ms"].dtype == np.float32
        # before anything can differ (first 20 ms: rest relaxation, no spikes) the traces agree closely
        np.testing.assert_allclose(a["v_1ms"][:, :20], b["v_1ms"][:, :20], atol=1e-3)
