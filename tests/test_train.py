"""Training: the CLI end to end on synthetic data, loss pieces, and resumption after interruption."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lfdeep_neuron.cli import main as cli_main
from lfdeep_neuron.surrogate.checkpoint import CheckpointError, load_checkpoint, load_surrogate
from lfdeep_neuron.surrogate.mtl import MMoE
from lfdeep_neuron.errors import InputError
from lfdeep_neuron.surrogate.train import (RECIPES_DIR, Windows, lbtw_weights, parse_args, prepare_batch, train,
                                           with_own_feedback)

torch.set_num_threads(1)
DATA = "synthetic:segments=5,sims=4,duration=600"


SHORT = ["--window-ms", "100", "--skip-ms", "50"]         # 600-ms synthetic trials


def _args(out, *extra):
    return parse_args(["--data", DATA, "--arch", "mmoeex", "--config", "tiny", "--out", str(out),
                       "--batch", "4", *SHORT, "--no-progress", *extra])


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _closed_loop_rmse_mV(model, sims) -> float:
    """All-segment RMSE (mV) of ``model`` run in closed loop over whole synthetic trials (600 ms from rest)."""
    from lfdeep_neuron.surrogate.stream import closed_loop

    x, v = torch.from_numpy(sims.data["x_syn"]), torch.from_numpy(sims.data["v"])
    with torch.no_grad():
        pred = closed_loop(model, x[..., 1:], v0_mV=v[..., 0], output="mV", spike_threshold=1e9).v
    return float((pred.double() - v[..., 1:]).pow(2).mean().sqrt())


def test_cli_trains_and_writes_checkpoint_log_and_state(tmp_path):
    """The CLI trains a feedback model that is better in closed loop than it was untrained.

    Issue 33, "Why" item 4: the validation metrics were only checked to lie in (0, 50) and learning was judged
    on the training loss; this run's 150 steps (no rollout loss) ended at closed-loop RMSE 8.03 mV against
    7.61 untrained -- training made the model worse in closed loop and the test passed. A feedback model
    trained teacher-forced only learns to lean on true feedback; with the rollout loss (its own predictions
    fed back, what it meets in closed loop) it learns. Now asserted, on the val split and on held-out trials
    (the synthetic 'test' split, seen by neither training nor validation), against the same model untrained
    (same seed: same initial weights; one step at lr 1e-12 leaves them) and a model-free baseline."""
    from lfdeep_neuron.surrogate.synthetic import SyntheticDataset

    common = ["--data", DATA, "--arch", "mh", "--config", "tiny", "--batch", "4", *SHORT, "--val-windows", "4",
              "--no-progress", "--set", "feedback=true", "--rollout", "10"]
    out = tmp_path / "mh.pt"
    rc = cli_main(["train", *common, "--out", str(out), "--steps", "300", "--lr", "3e-3", "--eval-every", "100"])
    assert rc == 0
    model = load_surrogate(out, expected_segments=5)
    assert model.arch == "mh" and model.n_segments == 5 and model.n_channels == 8
    meta = model.meta
    assert meta["provenance"]["data"] == DATA and meta["provenance"]["steps"] == 300
    assert meta["provenance"]["versions"]["torch"] == torch.__version__
    assert list(meta["segments"]["name"][:2]) == ["soma[0]", "dend[0]"]
    from lfdeep_neuron.surrogate.train import VAL_METRICS
    assert set(VAL_METRICS) == {k for k in meta["metrics"] if k.startswith("val_")}   # --keep-best's choices
    # normalisation comes from the training data (v0 of the synthetic cell: rest at -70 mV)
    torch.testing.assert_close(model.v_rest, torch.full((5,), -70.0))
    rows = _log(tmp_path / "mh.pt.jsonl")
    assert [r["step"] for r in rows] == list(range(10, 301, 10))
    assert [r["step"] for r in rows if "val_rmse_mV_cl" in r] == [100, 200, 300]
    first, end = (sum(float(r["loss_v"]) for r in rs) / 3 for rs in (rows[:3], rows[-3:]))
    assert end < 0.6 * first                                           # the training loss fell
    assert load_checkpoint(tmp_path / "mh.pt.last")["train_state"]["step"] == 300

    # -- the closed loop improved ------------------------------------------------------------------------
    assert cli_main(["train", *common, "--out", str(tmp_path / "untrained.pt"), "--steps", "1", "--lr", "1e-12",
                     "--eval-every", "0"]) == 0
    untrained = load_surrogate(tmp_path / "untrained.pt", expected_segments=5)
    val, val0 = meta["metrics"]["val_rmse_mV_cl"], untrained.meta["metrics"]["val_rmse_mV_cl"]
    held_out = SyntheticDataset(None, "test", None, n_segments=5, n_sims=4, duration_ms=600, seed=0)
    test, test0 = _closed_loop_rmse_mV(model, held_out), _closed_loop_rmse_mV(untrained, held_out)
    v = torch.from_numpy(held_out.data["v"])[..., 1:].double()
    constant = float((v - model.v_mean.double()[None, :, None]).pow(2).mean().sqrt())   # the training mean
    print(f"closed-loop RMSE (mV): val {val:.3f} (untrained {val0:.3f}), held-out trials {test:.3f} "
          f"(untrained {test0:.3f}, the training mean as a constant {constant:.3f})")
    # measured (2026-12-08): val 5.73 vs 7.61 mV (ratio 0.75), held out 5.16 vs 6.66 (0.77); ratios 0.72-0.78
    # with --seed 0, 1, 2. Bound: at least 15 % lower than untrained.
    assert val <= 0.85 * val0
    assert test <= 0.85 * test0
    # and clearly better than knowing nothing of the inputs: measured 0.82 (seeds 1, 2: 0.75, 0.77); bound 0.9
    assert test <= 0.9 * constant

    # a second run with the same --out has nothing left to do
    summary = train(parse_args([*common, "--out", str(out), "--steps", "300", "--lr", "3e-3"]))
    assert summary["steps_done"] == 300 and summary["resumed_from"] == 300


def test_resume_after_stop_reproduces_uninterrupted_run(tmp_path):
    # dropout, LBTW, the rollout loss and feedback noise all draw on state that must survive the restart
    extra = ["--steps", "12", "--save-every", "4", "--eval-every", "0", "--val-windows", "2", "--lbtw-alpha", "0.5",
             "--rollout", "2", "--rollout-p", "0.7", "--fb-noise", "0.05", "--set", "dropout=0.1", "--imem",
             "--set", "feedback=true"]
    whole = train(_args(tmp_path / "a.pt", *extra))
    assert whole["steps_done"] == 12
    part = train(_args(tmp_path / "b.pt", *extra, "--stop-after", "5"))
    assert part["steps_done"] == 5 and not (tmp_path / "b.pt").exists()
    assert load_checkpoint(tmp_path / "b.pt.last")["train_state"]["step"] == 5
    rest = train(_args(tmp_path / "b.pt", *extra))
    assert rest["resumed_from"] == 5 and rest["steps_done"] == 12
    model = load_surrogate(tmp_path / "b.pt")
    assert model.config.imem_tasks and model.n_tasks == 2 * 5 + 1 and model.config.dropout == 0.1
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in _log(tmp_path / "b.pt.jsonl")] == [5, 10, 12]   # no duplicated rows after resuming


def test_keep_best_writes_the_best_validated_weights_and_survives_a_resume(tmp_path, capsys):
    extra = ["--steps", "40", "--eval-every", "10", "--val-windows", "3", "--val-sims", "1", "--lr", "3e-3",
             "--keep-best", "val_loss_v_tf"]
    part = train(_args(tmp_path / "k.pt", *extra, "--stop-after", "20"))
    assert part["best"]["step"] in (10, 20)
    summary = train(_args(tmp_path / "k.pt", *extra))
    rows = [r for r in _log(tmp_path / "k.pt.jsonl") if "val_loss_v_tf" in r]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    want = min(rows, key=lambda r: r["val_loss_v_tf"])
    assert summary["best"]["step"] == want["step"] and summary["best"]["value"] == want["val_loss_v_tf"]
    assert [r["step"] for r in rows if r.get("best")][-1] == want["step"]
    best = load_checkpoint(tmp_path / "k.pt.best")
    assert best["provenance"]["steps"] == want["step"] and best["metrics"]["best_of"] == "val_loss_v_tf"
    assert "train_state" not in best
    if want["step"] != 40:                                    # the best weights are not the last ones
        last = load_checkpoint(tmp_path / "k.pt")["state_dict"]
        assert any(not torch.equal(v, last[k]) for k, v in best["state_dict"].items())
    # --val-sims: the validation windows come from the first val simulations only
    from lfdeep_neuron.surrogate.train import _open_windows
    _, _, val1 = _open_windows(_args(tmp_path / "x.pt", "--val-sims", "1"), None)
    _, _, val_all = _open_windows(_args(tmp_path / "x.pt"), None)
    assert set(val1.index[:, 0]) == {0} and len(val_all) > len(val1)
    n_val = len(val_all.sims.records)
    _open_windows(_args(tmp_path / "x.pt", "--val-sims", str(n_val + 5)), None)
    assert f"--val-sims {n_val + 5}: the validation split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(tmp_path / "x.pt", "--keep-best", "val_nonsense")


def test_resume_refuses_a_different_model(tmp_path):
    train(_args(tmp_path / "c.pt", "--steps", "3", "--stop-after", "2", "--eval-every", "0"))
    with pytest.raises(CheckpointError, match="was written for arch 'mmoeex'.*pass --restart"):
        train(parse_args(["--data", DATA, "--arch", "mh", "--config", "tiny", "--out", str(tmp_path / "c.pt"),
                          "--steps", "3", "--batch", "4", *SHORT, "--no-progress"]))
    summary = train(parse_args(["--data", DATA, "--arch", "mh", "--config", "tiny", "--out",
                                str(tmp_path / "c.pt"), "--steps", "3", "--batch", "4", *SHORT,
                                "--no-progress", "--restart", "--val-windows", "2"]))
    assert summary["resumed_from"] == 0 and summary["steps_done"] == 3


def test_init_warm_starts_from_another_checkpoint(tmp_path):
    base = ["--steps", "4", "--eval-every", "0", "--val-windows", "2"]
    train(_args(tmp_path / "a.pt", *base))
    a = load_checkpoint(tmp_path / "a.pt")
    # --stop-after 0 would do nothing; one step at lr ~0 leaves the warm-started weights almost unchanged
    train(_args(tmp_path / "b.pt", "--init", str(tmp_path / "a.pt"), "--steps", "1", "--lr", "1e-12",
                "--eval-every", "0", "--val-windows", "2", "--threads", "1"))
    b = load_checkpoint(tmp_path / "b.pt")
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    assert b["provenance"]["args"]["init"] == str(tmp_path / "a.pt")
    assert b["provenance"]["init"]["path"] == str(tmp_path / "a.pt")
    assert b["provenance"]["init"]["provenance"]["steps"] == 4            # the chain of trainings is recorded
    # dropout is a training setting, not part of the function: a warm start may change it
    train(_args(tmp_path / "b2.pt", "--init", str(tmp_path / "a.pt"), "--set", "dropout=0.3", "--steps", "1",
                "--lr", "1e-12", "--eval-every", "0", "--val-windows", "2", "--threads", "1"))
    assert load_checkpoint(tmp_path / "b2.pt")["config"]["dropout"] == 0.3
    fresh = train(_args(tmp_path / "c.pt", "--steps", "1", "--lr", "1e-12", "--eval-every", "0",
                        "--val-windows", "2"))
    c = load_checkpoint(tmp_path / "c.pt")
    assert fresh["steps_done"] == 1
    assert any(not torch.allclose(c["state_dict"][k], v) for k, v in a["state_dict"].items())
    # a checkpoint of another architecture is refused with one clear error
    with pytest.raises(CheckpointError, match="--init .*written for arch 'mmoeex'"):
        train(parse_args(["--data", DATA, "--arch", "mh", "--config", "tiny", "--out", str(tmp_path / "d.pt"),
                          "--init", str(tmp_path / "a.pt"), "--steps", "1", "--batch", "4", *SHORT,
                          "--no-progress"]))


def test_killed_process_resumes_from_its_last_checkpoint(tmp_path):
    """A real interruption: SIGKILL the training process after its first save, then run it again."""
    out = tmp_path / "k.pt"
    cmd = [sys.executable, "-m", "lfdeep_neuron.cli", "train", "--data", DATA, "--arch", "mh", "--config", "tiny",
           "--out", str(out), "--steps", "3000", "--batch", "4", *SHORT, "--save-every", "25",
           "--eval-every", "0", "--val-windows", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = Path(str(out) + ".last")
    try:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), proc.stdout.read().decode() if proc.poll() is not None else "no checkpoint in 120 s"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_checkpoint(last)["train_state"]["step"]               # whole file despite the kill
    assert saved % 25 == 0 and 25 <= saved < 3000
    res = subprocess.run(cmd[:cmd.index("--steps") + 1] + [str(saved + 10)] + cmd[cmd.index("--steps") + 2:],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming at step {saved}" in res.stdout
    assert load_checkpoint(out)["provenance"]["steps"] == saved + 10


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed next to this python")
def test_torchrun_two_cpu_processes(tmp_path):
    """DistributedDataParallel path (gloo on CPU): two processes train one model."""
    out = tmp_path / "ddp.pt"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "lfdeep_neuron.cli", "train", "--data", DATA,
           "--arch", "mmoe", "--config", "tiny", "--out", str(out), "--steps", "6", "--batch", "2",
           *SHORT, "--save-every", "3", "--eval-every", "0", "--val-windows", "2", "--no-progress"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    ckpt = load_checkpoint(Path(str(out) + ".last"))
    assert ckpt["train_state"]["step"] == 6 and len(ckpt["train_state"]["rng_cpu"]) == 2
    assert load_surrogate(out).n_segments == 5


def test_lbtw_weights():
    base = torch.tensor([0.25, 0.25, 0.5])
    losses = torch.tensor([1.0, 0.5, 2.0])
    initial = torch.tensor([1.0, 1.0, 1.0])
    w = lbtw_weights(base, losses, initial, alpha=1.0)
    torch.testing.assert_close(w.sum(), base.sum())
    ratio = w / base
    torch.testing.assert_close(ratio / ratio[0], torch.tensor([1.0, 0.5, 2.0]))   # (L / L0) ** alpha
    assert torch.equal(lbtw_weights(base, losses, initial, alpha=0.0), base)


def test_own_feedback_shifts_predictions_by_one_step():
    m = MMoE.from_config("tiny", n_segments=3, n_channels=4)
    x = torch.arange(2 * 7 * 5, dtype=torch.float32).view(2, 7, 5)
    pred = -torch.rand(2, 3, 5)
    y = with_own_feedback(m, x, pred, p=1.0)
    assert torch.equal(y[:, :4], x[:, :4])                            # synaptic rows untouched
    assert torch.equal(y[:, 4:, 0], x[:, 4:, 0])                      # first step: true feedback
    assert torch.equal(y[:, 4:, 1:], pred[..., :-1])                  # then the previous prediction
    torch.manual_seed(0)
    mixed = with_own_feedback(m, x, pred, p=0.5)[:, 4:, 1:]
    own = (mixed == pred[..., :-1]).all(dim=1)
    true = (mixed == x[:, 4:, 1:]).all(dim=1)
    assert torch.all(own ^ true) and 0 < own.float().mean() < 1


def test_time_limit_stops_early_and_writes_a_final_checkpoint(tmp_path, benchmark_module):
    out = tmp_path / "t.pt"
    summary = train(_args(out, "--steps", "100000", "--time-limit-min", "0.05", "--eval-every", "0",
                          "--val-windows", "2"))
    done = summary["steps_done"]
    assert 0 < done < 100000
    model = load_surrogate(out, expected_segments=5)
    meta = model.meta
    assert meta["provenance"]["steps"] == done and meta["metrics"]["stopped_by_time_limit"] == 1.0
    # the metrics written are those of the weights written (issue 33, "Why" item 4: checked to lie in (0, 50),
    # which any number passes): recomputed here on the validation windows (evenly spaced, --val-windows 2)
    from lfdeep_neuron.surrogate.stream import closed_loop
    from lfdeep_neuron.surrogate.train import _open_windows

    _, _, val_ds = _open_windows(_args(out), None)
    idx = np.unique(np.linspace(0, len(val_ds) - 1, num=min(2, len(val_ds))).astype(int))
    b = {k: torch.stack([val_ds[int(i)][k] for i in idx]) for k in ("x_syn", "v")}
    with torch.no_grad():
        pred = closed_loop(model, b["x_syn"][..., 1:], v0_mV=b["v"][..., 0], output="mV").v
    rmse = float((pred.double() - b["v"][..., 1:]).pow(2).mean().sqrt())
    assert meta["metrics"]["val_rmse_mV_cl"] == pytest.approx(rmse, rel=1e-5)
    assert load_checkpoint(tmp_path / "t.pt.last")["train_state"]["step"] == done
    # the data-scaling benchmark must not score such a point as if it were trained
    data_scaling = benchmark_module("data_scaling")
    assert not data_scaling.training_finished(out, 100000)
    assert data_scaling.training_finished(out, done) is False          # marked stopped, whatever steps asked
    assert not data_scaling.training_finished(tmp_path / "absent.pt", 1)


def test_time_limited_runs_resume_to_the_uninterrupted_result(tmp_path, benchmark_module):
    """Rerunning the same time-limited command until done ends where one uninterrupted run ends."""
    extra = ["--steps", "14", "--save-every", "100", "--eval-every", "0", "--val-windows", "2",
             "--set", "dropout=0.1", "--spike-balance", "0.5"]
    whole = train(_args(tmp_path / "a.pt", *extra))
    assert whole["steps_done"] == 14
    starts = []
    for _ in range(20):
        s = train(_args(tmp_path / "b.pt", *extra, "--time-limit-min", "0.0001"))   # stops after every step
        starts.append(s["resumed_from"])
        if s["steps_done"] >= 14 and "stopped_by_time_limit" not in s["metrics"]:
            break
    assert starts[:3] == [0, 1, 2] and s["steps_done"] == 14
    assert benchmark_module("data_scaling").training_finished(tmp_path / "b.pt", 14)     # finished: scored
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert b["provenance"]["steps"] == 14
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    assert load_checkpoint(tmp_path / "b.pt.last")["train_state"]["data_position"] == 14


def test_recipes_build_and_flags_override_them(tmp_path):
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert {"spike_lstm_mh", "spike_lstm_mh_spikefocus", "spike_lstm_mmoe", "spike_lstm_mmoeex",
            "spike_elm_mh"} <= set(names)
    for name in names:
        args = parse_args(["--recipe", name, "--data", DATA, "--out", str(tmp_path / "x.pt")])
        assert args.arch in ("mh", "mmoe", "mmoeex") and args.steps >= 1000
    # every bundled model l5pc_NAME.pt was trained with the settings of recipe NAME (a one-stage recipe run as
    # it is, a fine-tune from its stage 1); models/DEFAULT names one of them. The checkpoints that left models/
    # (docs/removed_checkpoints.md) are checked through their provenance, kept in tests/data/removed_checkpoints.json.
    from lfdeep_neuron.surrogate.checkpoint import MODELS_DIR, bundled_checkpoint

    removed = json.loads((Path(__file__).resolve().parent / "data" / "removed_checkpoints.json").read_text())

    def provenance(file):
        return removed[file] if file in removed else load_checkpoint(MODELS_DIR / file)["provenance"]

    one_stage = ("spike_lstm_mh_8k", "spike_lstm_mh_history_8k", "spike_lstm_mh_history_128_8k",
                 "spike_lstm_mh_history_128_16k")
    # fine-tune recipe: (its --init's recipe, the --init file it was trained from, which was l5pc_BASE.pt)
    fine_tunes = {"spike_lstm_mh_history_128_own": ("spike_lstm_mh_history_128_8k",
                                                    "l5pc_spike_lstm_mh_history_128_8k.pt"),
                  "spike_lstm_mh_history_128_16k_own": ("spike_lstm_mh_history_128_16k", "cand16k.pt"),
                  "spike_lstm_mh_history_128_16k_volleys": ("spike_lstm_mh_history_128_16k_own",
                                                            "l5pc_spike_lstm_mh_history_128_16k_own.pt")}
    default = Path(bundled_checkpoint())
    assert default.stem in {f"l5pc_{n}" for n in (*one_stage, *fine_tunes)}
    shipped = {p.name for p in MODELS_DIR.glob("*.pt")}
    assert default.name in shipped and not shipped & set(removed), "a removed checkpoint is back in models/"
    for name, (base, init) in fine_tunes.items():   # a fine-tune of a one-stage model, by its own recipe
        prov = provenance(f"l5pc_{name}.pt")
        recipe = parse_args(["--recipe", name, "--data", DATA, "--out", "x.pt"])
        assert f"l5pc_{base}.pt" in shipped | set(removed)
        assert Path(prov["args"]["init"]).name == init and prov["steps"] == recipe.steps
        for key in ("arch", "config", "imem", "steps", "batch", "window_ms", "skip_ms", "lr", "spike_weight",
                    "soma_weight", "model", "seed", "history_own", "history_own_threshold", "history_own_passes"):
            assert getattr(recipe, key) == prov["args"][key], (name, key)
    # the default's recipe warm-starts from its stage 2, and that one's from stage 1: models/ keeps both
    assert (MODELS_DIR / "l5pc_spike_lstm_mh_history_128_16k.pt").is_file()
    assert (MODELS_DIR / "l5pc_spike_lstm_mh_history_128_16k_own.pt").is_file()
    for name in one_stage:
        prov = provenance(f"l5pc_{name}.pt")
        recipe = parse_args(["--recipe", name, "--data", DATA, "--out", "x.pt"])
        assert prov["init"] is None and prov["steps"] == recipe.steps
        for key in ("arch", "config", "imem", "steps", "batch", "window_ms", "skip_ms", "lr", "spike_weight",
                    "soma_weight", "voltage_weight", "imem_weight", "spike_pos_weight", "model", "seed", "val_sims",
                    "val_windows", "keep_best"):
            assert getattr(recipe, key) == prov["args"][key], (name, key)
    # the first corpus model (the --init of the spike-history warm starts): two recipes, stage 2 warm-started
    # from stage 1
    first = removed["l5pc_spike_lstm_mh.pt"]
    stages = (first, first["init_provenance"])
    for name, prov in zip(("spike_lstm_mh_spikefocus", "spike_lstm_mh"), stages):
        recipe = parse_args(["--recipe", name, "--data", DATA, "--out", "x.pt"])
        assert prov["recipe"] == f"{name}.toml" and prov["args"]["imem"] is True
        for key in ("arch", "batch", "window_ms", "skip_ms", "lr", "spike_weight", "soma_weight", "spike_pos_weight",
                    "model"):
            assert getattr(recipe, key) == prov["args"][key], (name, key)
    assert stages[0]["args"]["init"].endswith("spike_lstm_mh_corpus.pt") and stages[0]["steps"] == 3000
    # each removed checkpoint is named in docs/removed_checkpoints.md with the commit that holds it
    note = (Path(__file__).resolve().parent.parent / "docs" / "removed_checkpoints.md").read_text()
    for file, prov in removed.items():
        assert f"`{file}` | `{prov['commit']}`" in note, file
        if shutil.which("git") and (MODELS_DIR.parent / ".git").exists():     # a clone with its history
            git = subprocess.run(["git", "rev-parse", f"{prov['commit']}:models/{file}"], capture_output=True,
                                 text=True, cwd=MODELS_DIR.parent)
            assert git.stdout.strip() == prov["blob"], (file, git.stderr)
    # flags beat the recipe, --set beats its [model] table
    args = parse_args(["--recipe", "spike_lstm_mh", "--data", DATA, "--out", "x.pt", "--steps", "7",
                       "--set", "channels=12"])
    assert args.steps == 7 and args.model == {"channels": 12} and args.window_ms == 400
    # a spike recipe trains end to end on the synthetic cell (sections = its segments)
    out = tmp_path / "s.pt"
    summary = train(parse_args(["--recipe", "spike_lstm_mmoe", "--data", DATA, "--out", str(out), "--steps", "6",
                                *SHORT, "--batch", "2", "--val-windows", "2", "--no-progress",
                                "--set", "channels=6", "--set", "compressor=3"]))
    model = load_surrogate(out)
    assert summary["steps_done"] == 6 and model.config.backbone == "lstm" and model.config.n_branches == 4
    assert model.config.soma_clip_mV == -55.0 and not model.config.feedback
    assert model.routing.target.tolist() == list(range(4)) + list(range(4, 8))   # one section per dendrite
    assert "val_spike_auc" in summary["metrics"]


def test_bad_recipes_and_data_are_one_line_input_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('arch = "mh"\nstpes = 3\n')
    with pytest.raises(InputError, match=r"bad.toml: unknown recipe keys \['stpes'\]"):
        parse_args(["--recipe", str(bad), "--data", DATA, "--out", "x.pt"])
    bad.write_text('arch = "mh"\ncache_dir = "c"\n')             # how to read, not what to train: a flag only
    with pytest.raises(InputError, match=r"bad.toml: unknown recipe keys \['cache_dir'\]"):
        parse_args(["--recipe", str(bad), "--data", DATA, "--out", "x.pt"])
    assert parse_args(["--arch", "mh", "--data", DATA, "--out", "x.pt", "--cache-dir", "c"]).cache_dir == "c"
    bad.write_text('arch = "mh"\nsteps = \n')
    with pytest.raises(InputError, match="bad.toml: not a valid TOML recipe"):
        parse_args(["--recipe", str(bad), "--data", DATA, "--out", "x.pt"])
    bad.write_text('arch = "mh"\nconfig = "tiny"\n[model]\nchanels = 3\n')
    with pytest.raises(InputError, match=r"bad.toml: unknown config keys \['chanels'\]"):
        train(parse_args(["--recipe", str(bad), "--data", DATA, "--out", str(tmp_path / "m.pt"), *SHORT]))
    with pytest.raises(InputError, match="--recipe nosuch: no such file, nor a bundled recipe"):
        parse_args(["--recipe", "nosuch", "--data", DATA, "--out", "x.pt"])
    with pytest.raises(InputError, match=r"--arch is required \(or in the recipe\)"):
        parse_args(["--data", DATA, "--out", "x.pt"])
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match=rf"--cache-dir {blocker}/c: cannot be a cache folder \({blocker} is not"):
        train(parse_args(["--data", str(empty), "--arch", "mh", "--out", str(tmp_path / "o" / "m.pt"),
                          "--cache-dir", str(blocker / "c")]))
    for d, what in ((missing, "no such directory"), (empty, r"no simulation records \(\*.h5\) in this folder")):
        with pytest.raises(InputError, match=f"--data {d}: {what}"):
            train(parse_args(["--data", str(d), "--arch", "mh", "--out", str(tmp_path / "o" / "m.pt")]))
    assert not (tmp_path / "o").exists()                                 # nothing written, not even the folder
    res = subprocess.run([sys.executable, "-m", "lfdeep_neuron.cli", "train", "--data", str(empty), "--arch", "mh",
                          "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "no simulation records" in res.stderr


def test_windows_skip_the_start_and_soma_target_is_clipped():
    from lfdeep_neuron.surrogate.synthetic import SyntheticDataset

    sims = SyntheticDataset(None, "train", None, n_segments=5, n_sims=2, duration_ms=600, seed=1)
    w = Windows(sims, 100, 50, skip_ms=500)
    assert len(w) == 2 and w.index.tolist() == [[0, 500], [1, 500]]
    item = w[1]
    torch.testing.assert_close(item["v"], torch.from_numpy(sims.data["v"][1, :, 500:600]))
    assert len(Windows(sims, 100, 50, skip_ms=0)) == 2 * 11
    for bad in (0.0, 1.0, 1.5):                                        # f = 1 would ask for infinite copies
        with pytest.raises(ValueError, match="spike_balance"):
            Windows(sims, 100, 50, skip_ms=0, spike_balance=bad)
    m = MMoE.from_config("tiny", n_segments=5, n_channels=8, soma_clip_mV=-55.0, feedback=False)
    m.set_normalization(torch.full((5,), -65.0), torch.full((5,), 5.0))
    b = {k: torch.stack([Windows(sims, 100, 50, 0)[i][k] for i in range(22)]) for k in ("x_syn", "v", "spike")}
    assert b["v"][:, 0].max() > -55.0                                   # the synthetic soma spikes (+30 mV)
    _, tgt = prepare_batch(m, b, "cpu")
    torch.testing.assert_close(m.to_mV(tgt["v"])[:, 0], b["v"][:, 0, 1:].clamp_max(-55.0))
    torch.testing.assert_close(m.to_mV(tgt["v"])[:, 1:], b["v"][:, 1:, 1:])   # other segments unclipped


def test_spike_history_trains_and_warm_starts_from_a_model_without_it(tmp_path):
    """A spike-history model trains on the true spikes (teacher-forced), and ``--init`` from the same model
    without spike history widens its input weights by a zero column: the warm-started model computes exactly
    what the old one did until its new input is trained."""
    from lfdeep_neuron.surrogate.train import open_data

    base = ["--steps", "3", "--eval-every", "0", "--val-windows", "2"]
    train(_args(tmp_path / "plain.pt", *base))
    train(_args(tmp_path / "hist.pt", "--init", str(tmp_path / "plain.pt"), "--set", "spike_history=true",
                "--steps", "1", "--lr", "1e-12", "--eval-every", "0", "--val-windows", "2"))
    plain, hist = load_surrogate(tmp_path / "plain.pt"), load_surrogate(tmp_path / "hist.pt")
    assert hist.config.spike_history and hist.n_inputs == plain.n_inputs + 1
    assert load_checkpoint(tmp_path / "hist.pt")["provenance"]["init"]["path"] == str(tmp_path / "plain.pt")
    train_sims, _ = open_data(_args(tmp_path / "x.pt"))
    item = Windows(train_sims, 100, 50, 50)[0]
    x, v, spike = item["x_syn"][None], item["v"][None], item["spike"][None].float()
    with torch.no_grad():
        a = plain(plain.make_inputs(x[..., 1:], v[..., :-1]))
        b = hist(hist.make_inputs(x[..., 1:], v[..., :-1], spike[..., :-1]))
    torch.testing.assert_close(b.v, a.v, rtol=0, atol=1e-4)               # lr 1e-12: the zero column stays ~0
    torch.testing.assert_close(b.spike_logit, a.spike_logit, rtol=0, atol=1e-4)
    # trained for real, the spike row's weights move away from zero
    train(_args(tmp_path / "hist2.pt", "--init", str(tmp_path / "plain.pt"), "--set", "spike_history=true",
                "--steps", "3", "--eval-every", "0", "--val-windows", "2"))
    w = load_checkpoint(tmp_path / "hist2.pt")["state_dict"]
    w0 = load_checkpoint(tmp_path / "plain.pt")["state_dict"]
    widened = [k for k, t in w.items() if t.shape != w0[k].shape]
    assert widened, "no weight reads the spike row"
    for k in widened:
        grow = [d for d in range(w[k].dim()) if w[k].shape[d] != w0[k].shape[d]][0]
        assert float(w[k].narrow(grow, w0[k].shape[grow], 1).abs().max()) > 0, k
    # an unrelated config change is still refused
    with pytest.raises(CheckpointError, match="--init .*written for"):
        train(_args(tmp_path / "bad.pt", "--init", str(tmp_path / "plain.pt"), "--set", "spike_history=true",
                    "--set", "n_experts=2", "--steps", "1", "--eval-every", "0", "--val-windows", "2"))


def test_spike_history_noise_drops_and_adds_spikes_and_trains(tmp_path):
    from lfdeep_neuron.surrogate.train import corrupt_spike_history

    torch.manual_seed(0)
    s = (torch.rand(4, 20000) < 0.01).float()
    assert torch.equal(corrupt_spike_history(s, 0.0, 0.0), s)
    assert corrupt_spike_history(s, 1.0, 0.0).sum() == 0
    dropped = corrupt_spike_history(s, 0.3, 0.0)
    assert (dropped <= s).all() and abs(dropped.sum() / s.sum() - 0.7) < 0.05
    added = corrupt_spike_history(torch.zeros(4, 20000), 0.0, 50.0)        # 50 Hz = 0.05 per 1-ms bin
    assert set(added.unique().tolist()) <= {0.0, 1.0} and abs(added.mean() - 0.05) < 0.005
    with pytest.raises(InputError, match="--history-drop must be in"):
        train(_args(tmp_path / "h.pt", "--history-drop", "1.5"))
    # a spike-history model trains with both, and the noise is part of the resumable run
    extra = ["--set", "spike_history=true", "--history-drop", "0.2", "--history-extra-hz", "5", "--eval-every", "0"]
    full = train(_args(tmp_path / "a.pt", "--steps", "4", *extra))
    train(_args(tmp_path / "b.pt", "--steps", "4", "--stop-after", "2", *extra))
    again = train(_args(tmp_path / "b.pt", "--steps", "4", *extra))
    assert again["resumed_from"] == 2
    a, b = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert load_checkpoint(tmp_path / "a.pt")["provenance"]["args"]["history_drop"] == 0.2
    clean = train(_args(tmp_path / "c.pt", "--steps", "4", *extra[:2], "--eval-every", "0"))
    c = load_checkpoint(tmp_path / "c.pt")["state_dict"]
    assert clean["steps_done"] == 4 and any(not torch.equal(v, c[k]) for k, v in a.items())   # the noise was used


def test_own_spike_history_is_the_streamers_crossing_rule_and_trains(tmp_path):
    from lfdeep_neuron.surrogate.train import emitted_spike_history

    logit = torch.tensor([[-3.0, -1.0, 0.5, 0.7, -2.0, 1.0, 2.0, -4.0],
                          [1.0, 2.0, -5.0, -5.0, -5.0, -5.0, 3.0, 3.0]])
    first = torch.tensor([1.0, 0.0])
    h = emitted_spike_history(logit, -1.5, first)
    # spikes at the upward crossings (steps 1 and 5 of row 0; 0 and 6 of row 1), read back one step later
    assert h.tolist() == [[1, 0, 1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0, 1]]
    with pytest.raises(InputError, match="--history-own must be in"):
        train(_args(tmp_path / "h.pt", "--history-own", "2"))
    with pytest.raises(InputError, match="--history-own-threshold must be a finite"):
        train(_args(tmp_path / "h.pt", "--history-own", "0.5", "--history-own-threshold", "nan"))
    # a spike-history model trains with its own spikes, resumably; the own history changes the result
    extra = ["--set", "spike_history=true", "--history-own", "1", "--history-own-threshold", "-3",
             "--eval-every", "0"]
    full = train(_args(tmp_path / "a.pt", "--steps", "4", *extra))
    train(_args(tmp_path / "b.pt", "--steps", "4", "--stop-after", "2", *extra))
    again = train(_args(tmp_path / "b.pt", "--steps", "4", *extra))
    assert full["steps_done"] == 4 and again["resumed_from"] == 2
    a, b = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert load_checkpoint(tmp_path / "a.pt")["provenance"]["args"]["history_own"] == 1.0
    clean = train(_args(tmp_path / "c.pt", "--steps", "4", *extra[:2], "--eval-every", "0"))
    c = load_checkpoint(tmp_path / "c.pt")["state_dict"]
    assert clean["steps_done"] == 4 and any(not torch.equal(v, c[k]) for k, v in a.items())


def test_own_spike_history_feeds_back_what_the_model_emits():
    from lfdeep_neuron.surrogate.mtl import build_model
    from lfdeep_neuron.surrogate.train import emitted_spike_history, with_own_spike_history

    torch.manual_seed(0)
    model = build_model("mh", "tiny", n_channels=6, n_segments=4, spike_history=True, feedback=False)
    x = model.make_inputs(torch.rand(3, 6, 50) * 2, torch.zeros(3, 4, 50), (torch.rand(3, 50) < 0.1).float())
    S, dev = model.n_segments, torch.device("cpu")
    assert torch.equal(with_own_spike_history(model, x, 0.0, -1.0, 2, dev, {"enabled": False}), x)
    with torch.no_grad():
        thr = float(model(x, all_tasks=True)[:, S].median())      # a threshold that the logits cross
        once = x.clone()
        once[:, -1] = emitted_spike_history(model(x, all_tasks=True)[:, S], thr, x[:, -1, 0])
        twice = once.clone()
        twice[:, -1] = emitted_spike_history(model(once, all_tasks=True)[:, S], thr, x[:, -1, 0])
    model.train()
    got1 = with_own_spike_history(model, x, 1.0, thr, 1, dev, {"enabled": False})
    got2 = with_own_spike_history(model, x, 1.0, thr, 2, dev, {"enabled": False})
    assert torch.equal(got1, once) and torch.equal(got2, twice) and model.training
    assert not torch.equal(got1[:, -1], x[:, -1]) and torch.equal(got1[:, :-1], x[:, :-1])


def test_spike_timing_loss_is_the_cross_entropy_of_the_spike_millisecond(tmp_path):
    from lfdeep_neuron.surrogate.train import spike_timing_loss

    logit = torch.tensor([[0.0, 1.0, 3.0, 1.0, 0.0, -1.0, 2.0, 0.0],
                          [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    spike = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    # spike (0, 2): bins 0..4; (0, 6): bins 4..7 (the window's end), (1, 0): bins 0..2 (its start)
    want = torch.stack([-torch.log_softmax(torch.tensor([0.0, 1.0, 3.0, 1.0, 0.0]), 0)[2],
                        -torch.log_softmax(torch.tensor([0.0, -1.0, 2.0, 0.0]), 0)[2],
                        -torch.log_softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[0]]).mean()
    assert torch.allclose(spike_timing_loss(logit, spike, 2), want)
    # another true spike inside the window (a burst) is not a competitor: (0, 2) and (0, 4) with W = 2
    burst = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    want = torch.stack([-torch.log_softmax(torch.tensor([0.0, 1.0, 3.0, 1.0]), 0)[2],
                        -torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 2.0]), 0)[1]]).mean()
    assert torch.allclose(spike_timing_loss(logit[:1], burst, 2), want)
    # a sharp peak at the right bin costs ~0, a peak 1 ms late a lot; gradients flow; no spike gives 0
    sharp = torch.full((1, 9), -10.0)
    sharp[0, 4] = 10.0
    one = torch.zeros(1, 9)
    one[0, 4] = 1.0
    assert spike_timing_loss(sharp, one, 3) < 1e-6 < 10.0 < spike_timing_loss(sharp.roll(1, -1), one, 3)
    g = logit.clone().requires_grad_()
    spike_timing_loss(g, spike, 2).backward()
    assert g.grad[0, 2] < 0 < g.grad[0, 1] and torch.isfinite(g.grad).all()
    assert float(spike_timing_loss(logit, torch.zeros_like(spike), 2)) == 0.0
    # in training: logged, changes the weights, refuses bad values in one line
    with pytest.raises(InputError, match=r"--spike-balance must be a fraction in \(0, 1\), got 1.0"):
        parse_args(["--data", DATA, "--arch", "mh", "--out", "x.pt", "--spike-balance", "1"])
    for bad in (["--spike-timing-weight", "-1"], ["--spike-timing-ms", "0"]):
        with pytest.raises(InputError,
                           match="--spike-timing-weight must be a finite number >= 0 and --spike-timing-ms"):
            parse_args(["--data", DATA, "--arch", "mh", "--out", "x.pt", *bad])
    base = ["--steps", "3", "--eval-every", "0", "--spike-balance", "0.9"]
    train(_args(tmp_path / "a.pt", *base))
    train(_args(tmp_path / "t.pt", *base, "--spike-timing-weight", "1", "--spike-timing-ms", "3"))
    rows = _log(tmp_path / "t.pt.jsonl")
    assert all(r["loss_timing"] > 0 for r in rows if "loss" in r)
    assert "loss_timing" not in _log(tmp_path / "a.pt.jsonl")[-1]
    a, t = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "t.pt")["state_dict"]
    assert any(not torch.equal(v, t[k]) for k, v in a.items())


def test_input_jitter_moves_events_by_one_bin_and_keeps_counts():
    import torch

    from lfdeep_neuron.surrogate.train import jitter_input_events

    torch.manual_seed(0)
    x = (torch.rand(4, 50, 400) < 0.05).float() * torch.randint(1, 3, (4, 50, 400)).float()
    y = jitter_input_events(x, 0.2)
    assert torch.equal(y.sum(-1), x.sum(-1))                     # no event created or lost, per channel
    assert (y >= 0).all()
    changed = (y != x).float().sum() / (x > 0).float().sum()
    assert 0.2 < changed < 0.9                                   # about 20 % of occupied bins gave an event away
    # Each occupied bin gives at most one event, to a neighbour: across every bin boundary at most one event
    # moves each way, so the cumulative counts differ by at most 1 (issue 33, "Why" item 7: this allowed 2,
    # and no cumulative bound sees an event moved by 5 bins, which shifts it by 1 over 5 boundaries).
    assert ((y.cumsum(-1) - x.cumsum(-1)).abs() <= 1).all()
    # Where the move is visible: isolated single events (4 bins apart) each end up in the bin before, at or
    # after their own, and nowhere else; about `fraction` of them moved, each way about equally often.
    iso = torch.zeros(64, 50, 400)
    t0 = 2 + 4 * torch.randint(0, 99, (64, 50))
    iso.scatter_(2, t0[..., None], 1.0)
    out = jitter_input_events(iso, 0.2)
    near = torch.stack([out.gather(2, (t0 + d)[..., None])[..., 0] for d in (-1, 0, 1)], dim=-1)   # [64, 50, 3]
    assert torch.equal(near.sum(-1), torch.ones(64, 50)) and out.sum() == iso.sum()   # nothing further away
    moved = 1.0 - near[..., 1].mean()
    assert abs(moved - 0.2) < 0.02                               # 3200 events: sd of the fraction 0.007
    assert abs(near[..., 0].sum() - near[..., 2].sum()) < 0.2 * near[..., [0, 2]].sum()
    assert torch.equal(jitter_input_events(x, 0.0), x)
    with pytest.raises(ValueError, match="fraction"):
        jitter_input_events(x, 1.5)
    with pytest.raises(ValueError, match="event weights"):
        jitter_input_events(x * 0.5, 0.1)


def test_input_jitter_trains_resumably_and_bad_values_are_refused(tmp_path):
    with pytest.raises(InputError, match="--input-jitter must be a fraction"):
        train(_args(tmp_path / "j.pt", "--input-jitter", "2"))
    extra = ["--input-jitter", "0.2", "--eval-every", "0"]
    train(_args(tmp_path / "a.pt", "--steps", "4", *extra))
    train(_args(tmp_path / "b.pt", "--steps", "4", "--stop-after", "2", *extra))
    assert train(_args(tmp_path / "b.pt", "--steps", "4", *extra))["resumed_from"] == 2
    a, b = load_checkpoint(tmp_path / "a.pt")["state_dict"], load_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())             # the jitter is part of the resumable run
    assert load_checkpoint(tmp_path / "a.pt")["provenance"]["args"]["input_jitter"] == 0.2
    train(_args(tmp_path / "c.pt", "--steps", "4", "--eval-every", "0"))
    c = load_checkpoint(tmp_path / "c.pt")["state_dict"]
    assert any(not torch.equal(v, c[k]) for k, v in a.items())         # and it was used
