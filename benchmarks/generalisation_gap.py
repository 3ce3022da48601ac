"""Does a surrogate overfit? The same teacher-forced scores on training and on held-out simulations.

    python benchmarks/generalisation_gap.py --data data/corpus/published --max-sims 30 \\
        --models models/l5pc_spike_lstm_mh_history_128_16k.pt models/l5pc_spike_lstm_mh_history_128_16k_own.pt

For every checkpoint, on the first ``--max-sims`` simulations of the train split and of the validation split
of ``--data`` (one folder: both splits come from the same generator), each simulation's first ``--skip-ms``
left out as training leaves them out, one teacher-forced pass (true spike history, true fed-back voltages):

* ``bce``: the spike output's binary cross-entropy per 1-ms bin (the loss training minimises, without
  ``pos_weight``);
* ``auc``: its per-bin spike AUC;
* ``all_mV``: RMSE of ``v_1ms`` over all segments; ``soma_clip_mV``: the soma's, both clipped at -55 mV.

A spike score that is much better on the training simulations than on held-out ones, while the voltages are
equal on both, means the spike output memorises its training spikes: more data (or a regulariser), not more
steps, is what it needs. Teacher-forced only: no threshold, no closed loop (``lfdeep-neuron evaluate`` scores
those).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def split_scores(model, ds, max_sims: int, skip_ms: int = 500, batch: int = 4) -> dict:
    """Teacher-forced scores of ``model`` on the first ``max_sims`` whole simulations of ``ds``
    (a ``SimulationDataset`` with ``window_ms=None``), bins ``skip_ms + 1 ...`` of each (see module doc)."""
    import torch
    import torch.nn.functional as F

    from lfdeep_neuron.surrogate.evaluate import clipped_soma_sse, sims_in_batches
    from lfdeep_neuron.surrogate.metrics import spike_auc, sq_err_per_segment

    n = min(int(max_sims), len(ds.records))
    logits, labels = [], []
    sq_all = sq_soma = 0.0
    n_all = n_soma = 0
    model = model.eval()
    with torch.no_grad():
        for _, b in sims_in_batches(ds, n, batch):
            x, v, spike = b["x_syn"], b["v"].float(), b["spike"]
            out = model(model.make_inputs(x[..., 1:], v[..., :-1], spike[..., :-1]))
            pred = model.to_mV(out.v).float()[..., skip_ms:].numpy()
            true = v[..., 1 + skip_ms:].numpy()
            sse, n_t = sq_err_per_segment(pred, true)               # [S], samples per segment
            sq_all, n_all = sq_all + float(sse.sum()), n_all + n_t * len(sse)
            sq_soma, n_soma = sq_soma + clipped_soma_sse(pred[:, 0], true[:, 0]), n_soma + n_t
            logits.append(out.spike_logit.float()[:, skip_ms:].reshape(-1))
            labels.append(spike[:, 1 + skip_ms:].reshape(-1).float())
    lg, lb = torch.cat(logits), torch.cat(labels)
    return {"n_sims": n, "n_spikes": int(lb.sum()), "bce": float(F.binary_cross_entropy_with_logits(lg, lb)),
            "auc": float(spike_auc(lg.numpy(), lb.numpy() > 0.5)),
            "all_mV": (sq_all / n_all) ** 0.5, "soma_clip_mV": (sq_soma / n_soma) ** 0.5}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="one dataset folder (its train and val splits are compared)")
    p.add_argument("--models", nargs="+", required=True, help="surrogate checkpoints")
    p.add_argument("--max-sims", type=int, default=30, help="first N simulations of each split")
    p.add_argument("--skip-ms", type=int, default=500, help="leave out each simulation's first ms (as training)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the scores here")
    args = p.parse_args(argv)

    import torch

    from lfdeep_neuron.data.dataset import SimulationDataset
    from lfdeep_neuron.surrogate.checkpoint import load_surrogate

    torch.set_num_threads(max(1, args.threads))
    fields = ("x_syn", "v", "spike")
    splits = {s: SimulationDataset(args.data, split=s, window_ms=None, fields=fields) for s in ("train", "val")}
    models = {path: load_surrogate(path) for path in args.models}     # every checkpoint checked before any output
    rows = []
    print(f"{'model':48s} {'split':5s} {'sims':>4s} {'spikes':>6s} {'BCE':>8s} {'AUC':>7s} {'all mV':>7s} "
          f"{'soma clip mV':>12s}")
    for path, model in models.items():
        for split, ds in splits.items():
            r = {"model": str(path), "split": split, **split_scores(model, ds, args.max_sims, args.skip_ms)}
            rows.append(r)
            print(f"{Path(path).name:48s} {split:5s} {r['n_sims']:4d} {r['n_spikes']:6d} {r['bce']:8.5f} "
                  f"{r['auc']:7.4f} {r['all_mV']:7.3f} {r['soma_clip_mV']:12.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    from lfdeep_neuron.cli import BAD_INPUT, EXIT_BAD_INPUT

    try:
        sys.exit(main())
    except BAD_INPUT as err:                        # a wrong folder or checkpoint: one line, as the CLI does
        print(f"generalisation_gap.py: error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
