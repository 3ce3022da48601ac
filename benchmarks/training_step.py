"""Cost of one training step of a recurrent surrogate on the CPU, and what the fused LSTM kernel saves.

    python benchmarks/training_step.py [--model CKPT (default: the bundled model)] [--batch 8] [--window-ms 400]

Times forward + backward (the optimiser step is negligible) of one batch of ``--batch`` windows of
``--window-ms`` steps on random inputs of the checkpoint's shapes, on ``--threads`` torch threads:

* the trunk alone: the fused ``nn.LSTM`` full pass (what a one-group LSTM runs on the CPU) against the generic
  per-step recurrence of the recurrent base class, same weights; printed as a ratio;
* the whole model (trunk, routing, towers, local traces), as training runs it.

Each figure is the median of ``--repeats`` runs after one warm-up run; on a machine shared with other jobs
they are noisy, the ratio less so (both halves run interleaved in the same process).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model, models/DEFAULT)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--window-ms", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_surrogate
    from lfdeep_neuron.surrogate.recurrent import GroupedLSTM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        args.model = args.model or str(bundled_checkpoint())
        model = load_surrogate(args.model).train()
    except (OSError, ValueError) as err:          # missing file, not a checkpoint, a mismatched one
        print(f"training_step: {err}", file=sys.stderr)
        return 1
    trunk = model.trunk
    if not isinstance(trunk, GroupedLSTM) or trunk.n_groups != 1:
        print(f"{args.model}: its trunk is not one LSTM; nothing fused to compare", file=sys.stderr)
        return 2
    B, T = args.batch, args.window_ms
    x = torch.rand(B, model.n_channels, T) * 0.1
    inputs = model.make_inputs(x, torch.full((B, model.n_segments, T), -65.0), torch.zeros(B, T))
    feats = model.backbone_inputs(inputs).detach()

    def backward(out):
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    fused = _median_s(lambda: backward(trunk(feats)), args.repeats)
    looped = _median_s(lambda: backward(super(GroupedLSTM, trunk).forward(feats)), args.repeats)
    whole = _median_s(lambda: backward(model(inputs, all_tasks=True)), args.repeats)
    print(f"{Path(args.model).name}: batch {B} x {T} ms, {args.threads} thread(s), median of {args.repeats}")
    print(f"  LSTM trunk, forward + backward: fused {fused:.3f} s, per-step recurrence {looped:.3f} s "
          f"-> fused is {looped / fused:.1f}x faster")
    print(f"  whole model, forward + backward (fused trunk): {whole:.3f} s per training step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
