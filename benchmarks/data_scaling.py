"""How a surrogate's accuracy scales with the amount of ground truth: one recipe, nested training sets.

    python benchmarks/data_scaling.py --data data/corpus/published,data/corpus/excited \\
        --test-data data/corpus/published --recipe spike_lstm_mh --seconds 150 600 2400 all \\
        --steps 3000 --out runs/scaling [--time-limit-min 60]

For every budget S (simulated seconds of the train split; ``all`` = everything there), trains the recipe with
``lfdeep-neuron train --train-seconds S`` (each folder's first simulations in generation order, nested: the
150-s set lies inside the 600-s one, and it stays the same while the corpus grows) for the **same number of optimiser steps** at every point, then scores it with ``lfdeep-neuron evaluate``
on the same held-out simulations: the first ``--test-sims`` of the test split (closed loop, spike threshold
calibrated on the first ``--val-sims`` of the validation split; fixed counts, because the splits grow with
the corpus). Prints and writes ``OUT/scaling.md``, ``OUT/scaling.json`` and ``OUT/scaling.png``: spike AUC, coincidence factor Γ
(±2 ms), somatic RMSE clipped at -55 mV and all-segment RMSE (with the constant baseline) per budget.

Every step resumes: a training interrupted by ``--time-limit-min`` (or anything else) continues from its
``CKPT.last`` when the same command is rerun, and scored points are not scored again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COLUMNS = (("spike_auc_cl", "spike AUC"), ("spike_gamma_cl", "Γ ±2 ms"),
           ("test_soma_clipped_rmse_mV_cl", "soma RMSE, clipped (mV)"),
           ("test_rmse_mV_cl", "all-segment RMSE (mV)"), ("test_rmse_mV_baseline", "constant baseline (mV)"))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lfdeep_neuron.cli", *map(str, args)]


def _short_splits(args) -> str:
    """Which of the fixed scoring sets the corpus cannot fill yet ('' when both can): every point is scored
    on the same simulations, so none is scored on fewer."""
    from lfdeep_neuron.data.dataset import SimulationDataset

    short = []
    for split, n in (("test", args.test_sims), ("val", args.val_sims)):
        have = len(SimulationDataset(args.test_data, split=split, fields=("v",)).records)
        if have < n:
            short.append(f"the {split} split holds {have} simulations, fewer than the {n} asked for")
    return "; ".join(short)


def training_finished(ckpt: Path, steps: int) -> bool:
    """Whether ``ckpt`` holds a training that ran all ``steps``: a run stopped by ``--time-limit-min`` also
    writes ``CKPT`` (usable, marked ``stopped_by_time_limit``), and such a point must not be scored."""
    from lfdeep_neuron.surrogate.checkpoint import load_checkpoint

    if not Path(ckpt).exists():
        return False
    meta = load_checkpoint(ckpt)
    return (not (meta.get("metrics") or {}).get("stopped_by_time_limit")
            and int((meta.get("provenance") or {}).get("steps", 0)) >= int(steps))


def run_point(budget: str, args) -> dict | None:
    """Train (or resume) and score one budget; None while its training is unfinished or the corpus cannot
    fill the scoring sets yet."""
    out = Path(args.out)
    ckpt = out / f"s{budget}.pt"
    cmd = _cli("train", "--recipe", args.recipe, "--data", args.data, "--out", ckpt, "--steps", args.steps,
               "--seed", args.seed, *args.train_args)
    if budget != "all":
        cmd += ["--train-seconds", budget]
    if args.time_limit_min:
        cmd += ["--time-limit-min", str(args.time_limit_min)]
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise SystemExit(f"training for budget {budget} failed (exit {res.returncode}): {' '.join(map(str, cmd))}")
    if not training_finished(ckpt, args.steps):
        print(f"budget {budget}: training stopped early (time limit); rerun the same command to continue")
        return None
    ev = out / f"s{budget}_eval"
    summary = ev / "summary.json"
    if not summary.exists():
        short = _short_splits(args)
        if short:
            print(f"{args.test_data}: {short}; budget {budget} is trained, its scoring waits for a larger corpus")
            return None
        res = subprocess.run(_cli("evaluate", "--model", ckpt, "--data", args.test_data, "--split", "test",
                                  "--out", ev, *args.eval_args))
        if res.returncode != 0:
            raise SystemExit(f"evaluation of {ckpt} failed (exit {res.returncode})")
    s = json.loads(summary.read_text())
    from lfdeep_neuron.surrogate.checkpoint import load_checkpoint

    provenance = load_checkpoint(ckpt).get("provenance", {})
    row = {k: s["metrics_for_checkpoint"].get(k) for k, _ in COLUMNS}
    row.update(budget=budget, checkpoint=str(ckpt), steps=int(args.steps),
               train_simulated_s=(provenance.get("dataset") or {}).get("simulated_s"))
    return row


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    lines = [f"# {title}", "", "| train simulated s | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "–" for k, _ in COLUMNS]
        lines.append(f"| {r['train_simulated_s'] or r['budget']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    print(text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [float(r["train_simulated_s"] or 0) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, keys, ylabel in ((axes[0], ("spike_auc_cl", "spike_gamma_cl"), "AUC / Γ"),
                             (axes[1], ("test_soma_clipped_rmse_mV_cl",), "mV"),
                             (axes[2], ("test_rmse_mV_cl", "test_rmse_mV_baseline"), "mV")):
        for k in keys:
            ax.plot(x, [r[k] for r in rows], "o-", label=dict(COLUMNS)[k])
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x], rotation=45, ha="right")   # the budgets themselves, no minor labels
        ax.minorticks_off()
        ax.set_xlabel("training data (simulated s)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training data folder(s), DIR1,DIR2 (as train --data)")
    p.add_argument("--test-data", required=True, help="folder whose test (and val) split scores every point")
    p.add_argument("--recipe", required=True)
    p.add_argument("--seconds", nargs="+", default=["150", "600", "2400", "all"],
                   help="training budgets in simulated seconds ('all' = the whole train split)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps, the same at every budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--time-limit-min", type=float, default=None, help="per training call (resumable)")
    p.add_argument("--test-sims", type=int, default=15,
                   help="score every point on the first N test simulations (the split grows with the corpus: a "
                        "fixed N keeps the points comparable)")
    p.add_argument("--val-sims", type=int, default=20, help="calibrate the threshold on the first N val simulations")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of every train and evaluate call (default: torch's own)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for every `train` call (last on the line)")
    args = p.parse_args(argv)
    args.eval_args = ["--max-sims", str(args.test_sims), "--max-val-sims", str(args.val_sims)]
    if args.threads:
        args.eval_args += ["--threads", str(args.threads)]
        args.train_args = ["--threads", str(args.threads), *args.train_args]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.recipe}: {args.steps} steps per point, test split of {args.test_data}"
    rows = []
    for budget in args.seconds:
        row = run_point(budget, args)
        if row is None:
            if rows:
                write_outputs(rows, out, title + " (budgets so far)")
            return 3
        rows.append(row)
    write_outputs(rows, out, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
