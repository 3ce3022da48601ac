"""Train an MH / MMoE / MMoEEx surrogate: ``lfdeep-neuron train``.

    lfdeep-neuron train --data DIR --arch mmoe --config paper --out models/mmoe.pt --steps 20000
    lfdeep-neuron train --data synthetic:segments=6 --arch mh --config tiny --out /tmp/mh.pt --steps 300
    torchrun --nproc_per_node=4 -m lfdeep_neuron.cli train --data DIR ... --amp      # several GPUs

What one step does
------------------
A batch of windows ``x_syn [B, C, T]`` (raw channel values), ``v [B, S, T]`` (mV), ``spike [B, T]``
(``imem [B, S, T]``) becomes the model input ``[x_syn[t], z(v[t-1])]`` for t = 1..T-1 and the targets
``z(v[t])``, ``spike[t]`` (``z(imem[t])``): the feedback input of step t is the true voltage of step t-1
(teacher forcing). Loss = mean over segments of the per-segment MSE of z-scored voltages
+ ``spike_weight`` * BCE-with-logits of the spike task (``pos_weight`` for the rare positives)
(+ ``imem_weight`` * mean per-segment MSE of z-scored currents). With ``--lbtw-alpha a > 0`` each task's
weight is multiplied by ``(L_i / L_i(0)) ** a`` (loss-balanced task weighting; L_i(0) = the task's loss
at the first step), renormalised to the same total weight.

Closed-loop robustness (``--rollout K``): the model in eval mode is run K times without gradients, each
time fed its own voltage predictions of the previous pass as feedback (probability ``--rollout-p`` per
step, else the true voltage), and the final feedback sequence is trained on as a second half of the batch
(weight ``--rollout-weight``): the model learns to correct errors that look like its own K-step errors
(scheduled sampling / the "pushforward" trick). ``--fb-noise`` adds Gaussian noise (z units) to the
teacher-forced feedback. Validation reports teacher-forced *and* closed-loop RMSE (mV), so the effect of
these switches can be measured. Measured on the synthetic cell (MMoE, 1500 steps, whole 2-s test trials,
closed-loop RMSE over all segments): teacher forcing only 6.9 / 11.7 mV (two seeds), ``--rollout 2``
3.6 / 3.4 mV (teacher-forced RMSE 1.5 -> 2.0-2.4 mV), ``--rollout 4`` 3.6 mV, ``--rollout 2 --rollout-p 0.5``
4.4 mV; hence the default ``--rollout 2`` (about 2x the cost of a teacher-forced step).

Robustness and bookkeeping: Adam with linear warm-up and cosine decay; gradient clipping; AMP (bf16, or
fp16 with loss scaling) on CUDA with ``--amp``; DistributedDataParallel when started by ``torchrun``
(``RANK``/``WORLD_SIZE`` set; NCCL on GPUs, gloo on CPU); ``CKPT.last`` written atomically every
``--save-every`` steps (a full checkpoint plus optimizer/RNG/step) and picked up automatically by the
next run with the same ``--out``; batches are a pure function of (seed, step, rank), so a resumed run
reproduces the uninterrupted one; tqdm progress and a CSV log (``CKPT.csv``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lfdeep_neuron.surrogate.checkpoint import (CheckpointError, load_checkpoint, save_checkpoint)
from lfdeep_neuron.surrogate.mtl import ARCHS, CONFIGS, Surrogate, build_model
from lfdeep_neuron.surrogate.stream import closed_loop

__all__ = ["configure_parser", "run", "parse_args", "train", "open_datasets", "task_losses"]

CSV_FIELDS = ["step", "lr", "loss", "loss_v", "loss_spike", "loss_imem", "loss_rollout", "val_loss_v_tf",
              "val_rmse_mV_tf", "val_rmse_mV_cl", "val_soma_rmse_mV_cl", "val_bce_spike_tf", "wall_s"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def configure_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--data", required=True,
                   help="data directory (SimulationDataset), or 'synthetic[:segments=6,sims=8,duration=2000,seed=0]'")
    g.add_argument("--arch", required=True, choices=sorted(ARCHS))
    g.add_argument("--config", default="paper", choices=sorted(CONFIGS), help="named model configuration")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set channels=64,32,16 --set n_experts=8")
    g.add_argument("--imem", action="store_true", help="add bin-mean membrane currents as tasks (for LFP)")
    g.add_argument("--out", required=True, help="checkpoint path (CKPT); CKPT.last and CKPT.csv next to it")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=5000)
    g.add_argument("--batch", type=int, default=16, help="windows per step (per process under torchrun)")
    g.add_argument("--window-ms", type=int, default=300, help="training window length (ms = steps)")
    g.add_argument("--stride-ms", type=int, default=None, help="spacing of training windows (default window/2)")
    g.add_argument("--warmup-ms", type=int, default=0, help="steps at the start of each window left out of the loss")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--lr-warmup", type=int, default=None, help="linear LR warm-up steps (default min(200, steps/10))")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--spike-weight", type=float, default=1.0)
    g.add_argument("--spike-pos-weight", default="auto",
                   help="BCE pos_weight; 'auto' = sqrt(negatives/positives) estimated from the data, "
                        "clipped to [1, 50]")
    g.add_argument("--spike-balance", type=float, default=None,
                   help="passed to the dataset: oversample windows with spikes to this fraction")
    g.add_argument("--imem-weight", type=float, default=1.0)
    g.add_argument("--lbtw-alpha", type=float, default=0.0, help="loss-balanced task weighting exponent (0: off)")
    g = p.add_argument_group("closed-loop robustness")
    g.add_argument("--rollout", type=int, default=2,
                   help="K self-feedback passes for the rollout loss (0: off = pure teacher forcing, as the paper)")
    g.add_argument("--rollout-p", type=float, default=1.0, help="per-step probability of using the own prediction")
    g.add_argument("--rollout-weight", type=float, default=1.0)
    g.add_argument("--fb-noise", type=float, default=0.0, help="Gaussian noise (z units) on teacher-forced feedback")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 if supported, else fp16)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=200, help="write CKPT.last every N steps")
    g.add_argument("--eval-every", type=int, default=500, help="validate every N steps (0: only at the end)")
    g.add_argument("--val-windows", type=int, default=16, help="validation windows (closed loop: streamed)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps in this invocation (saving CKPT.last); a later run resumes")
    g.add_argument("--time-limit-min", type=float, default=None,
                   help="wall-clock budget of this invocation: stop there and write CKPT as final (the LR "
                        "schedule still follows --steps, so size --steps to the budget)")
    g.add_argument("--restart", action="store_true", help="ignore an existing CKPT.last")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``lfdeep-neuron train`` arguments (for scripts and tests)."""
    p = argparse.ArgumentParser(prog="lfdeep-neuron train")
    configure_parser(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_kv(items, what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def open_datasets(args) -> tuple:
    """(train, val) datasets for ``args.data``: a SimulationDataset directory or a synthetic spec."""
    window = args.window_ms
    stride = args.stride_ms or max(1, window // 2)
    if str(args.data).startswith("synthetic"):
        from lfdeep_neuron.surrogate.synthetic import SyntheticDataset
        spec = str(args.data).partition(":")[2]
        opts = _parse_kv([s for s in spec.split(",") if s], "--data synthetic")
        names = {"segments": "n_segments", "sims": "n_sims", "duration": "duration_ms", "seed": "seed",
                 "cell_seed": "cell_seed"}
        bad = set(opts) - set(names)
        if bad:
            raise ValueError(f"--data synthetic: unknown options {sorted(bad)}; known: {sorted(names)}")
        kw = {names[k]: int(v) for k, v in opts.items()}
        kw.setdefault("seed", args.seed)
        val_kw = {**kw, "n_sims": max(2, kw.get("n_sims", 8) // 4)}
        train_ds = SyntheticDataset(None, "train", window, stride, args.spike_balance, **kw)
        val_ds = SyntheticDataset(None, "val", window, window, None, **val_kw)
        return train_ds, val_ds
    root = Path(args.data)
    if not root.exists():
        raise FileNotFoundError(f"--data {root}: no such directory")
    try:
        from lfdeep_neuron.data.dataset import SimulationDataset
    except ImportError as err:
        raise RuntimeError(f"cannot read {root}: lfdeep_neuron.data.dataset is not available ({err}); "
                           "use --data synthetic for a dry run") from err
    fields = ("x_syn", "v", "spike") + (("imem",) if args.imem else ())
    train_ds = SimulationDataset(root, split="train", window_ms=window, stride_ms=stride,
                                 spike_balance=args.spike_balance, seed=args.seed, fields=fields)
    val_ds = SimulationDataset(root, split="val", window_ms=window, stride_ms=window, seed=args.seed, fields=fields)
    return train_ds, val_ds


class StepBatchSampler(torch.utils.data.Sampler):
    """Random batches that are a pure function of (seed, step, rank): resuming reproduces them."""

    def __init__(self, n: int, batch: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.start, self.stop = n, batch, start, stop
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * self.world + self.rank)
            yield torch.randint(self.n, (self.batch,), generator=g).tolist()


def _estimate_spike_fraction(ds, n: int = 64, seed: int = 0) -> float:
    g = np.random.default_rng(seed)
    idx = g.choice(len(ds), size=min(n, len(ds)), replace=False)
    spikes = [ds[int(i)]["spike"].float() for i in idx]
    return float(torch.cat(spikes).mean())


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------
def prepare_batch(model: Surrogate, batch: dict, device) -> tuple[torch.Tensor, dict]:
    """Window dict -> (teacher-forced input ``[B, n_inputs, T-1]``, targets dict of z-scored tensors)."""
    x_syn = batch["x_syn"].to(device, non_blocking=True)
    v = batch["v"].to(device, non_blocking=True)
    x = model.make_inputs(x_syn[..., 1:], v[..., :-1])
    tgt = {"v": model.to_z(v[..., 1:]), "spike": batch["spike"].to(device)[..., 1:].float()}
    if model.config.imem_tasks:
        tgt["imem"] = model.imem_to_z(batch["imem"].to(device)[..., 1:])
    return x, tgt


def task_losses(model: Surrogate, y: torch.Tensor, tgt: dict, warmup: int = 0,
                pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task losses ``[n_tasks]``: MSE per segment (z units), the spike BCE, (MSE per segment of imem).

    ``y [B, n_tasks, T]`` from ``model(x, all_tasks=True)``; the first ``warmup`` steps are left out.
    """
    S = model.n_segments
    y = y[..., warmup:].float()
    lv = (y[:, :S] - tgt["v"][..., warmup:]).pow(2).mean(dim=(0, 2))
    ls = F.binary_cross_entropy_with_logits(y[:, S], tgt["spike"][..., warmup:], pos_weight=pos_weight)
    parts = [lv, ls[None]]
    if model.config.imem_tasks:
        parts.append((y[:, S + 1:] - tgt["imem"][..., warmup:]).pow(2).mean(dim=(0, 2)))
    return torch.cat(parts)


def base_task_weights(model: Surrogate, spike_weight: float, imem_weight: float) -> torch.Tensor:
    """Weights that make the total = mean voltage MSE + spike_weight * BCE (+ imem_weight * mean imem MSE)."""
    S = model.n_segments
    w = [torch.full((S,), 1.0 / S), torch.tensor([spike_weight])]
    if model.config.imem_tasks:
        w.append(torch.full((S,), imem_weight / S))
    return torch.cat(w)


def lbtw_weights(base: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, alpha: float) -> torch.Tensor:
    """Loss-balanced task weighting: ``base * (L / L0) ** alpha``, rescaled to ``base.sum()``."""
    if alpha == 0:
        return base
    w = base * (losses.detach() / initial.clamp_min(1e-12)).clamp_min(1e-12) ** alpha
    return w * (base.sum() / w.sum())


def with_own_feedback(model: Surrogate, x: torch.Tensor, v_pred_z: torch.Tensor, p: float) -> torch.Tensor:
    """Replace the feedback rows of ``x [B, n_inputs, T]`` by the previous step's prediction (prob. ``p``)."""
    C = model.n_channels
    fb_true = x[:, C:]
    fb_own = torch.cat([fb_true[..., :1], v_pred_z[..., :-1]], dim=-1)
    if p < 1.0:
        use = torch.rand(x.shape[0], 1, x.shape[2], device=x.device) < p
        fb_own = torch.where(use, fb_own, fb_true)
    return torch.cat([x[:, :C], fb_own], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: Surrogate, val_ds, n_windows: int, device, warmup: int = 0, batch: int = 16) -> dict:
    """Teacher-forced and closed-loop errors on ``n_windows`` evenly spaced validation windows.

    Closed loop: streamed from the window's first sample (the true voltage at the window start is the
    initial feedback), the model's own predictions fed back afterwards. RMSE in mV over all segments and
    steps (after ``warmup``), and at the soma (segment 0).
    """
    was_training = model.training
    model.eval()
    idx = np.unique(np.linspace(0, len(val_ds) - 1, num=min(n_windows, len(val_ds))).astype(int))
    sq_tf = sq_cl = sq_soma = n_el = n_soma = 0.0
    lv_sum = bce_sum = 0.0
    n_batches = 0
    for start in range(0, len(idx), batch):
        items = [val_ds[int(i)] for i in idx[start:start + batch]]
        b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        x, tgt = prepare_batch(model, b, device)
        y = model(x, all_tasks=True)
        losses = task_losses(model, y, tgt, warmup)
        S = model.n_segments
        lv_sum += float(losses[:S].mean())
        bce_sum += float(losses[S])
        n_batches += 1
        v_true = b["v"].to(device)[..., 1:][..., warmup:]
        v_tf = model.to_mV(y[:, :S])[..., warmup:]
        pred = closed_loop(model, b["x_syn"].to(device)[..., 1:], v0_mV=b["v"].to(device)[..., 0], output="mV")
        v_cl = pred.v[..., warmup:]
        sq_tf += float((v_tf - v_true).pow(2).sum())
        sq_cl += float((v_cl - v_true).pow(2).sum())
        sq_soma += float((v_cl[:, 0] - v_true[:, 0]).pow(2).sum())
        n_el += v_true.numel()
        n_soma += v_true[:, 0].numel()
    model.train(was_training)
    return {"val_loss_v_tf": lv_sum / n_batches, "val_bce_spike_tf": bce_sum / n_batches,
            "val_rmse_mV_tf": math.sqrt(sq_tf / n_el), "val_rmse_mV_cl": math.sqrt(sq_cl / n_el),
            "val_soma_rmse_mV_cl": math.sqrt(sq_soma / n_soma)}


# ---------------------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises torch.distributed when started by torchrun."""
    env = os.environ
    if not (torch.distributed.is_available() and "RANK" in env and "WORLD_SIZE" in env
            and int(env["WORLD_SIZE"]) > 1):
        return 0, 1, 0
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(env.get("LOCAL_RANK", 0))


def _device(arg: str, local_rank: int) -> torch.device:
    if arg == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return dev


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("neuron", "lfdeep-neuron"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        repo = Path(__file__).resolve().parents[2]
        out["git_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    return out


def _lr_at(step: int, args) -> float:
    warm = args.lr_warmup if args.lr_warmup is not None else min(200, max(1, args.steps // 10))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _config_overrides(args, train_ds) -> dict:
    S, C = len(train_ds.segments["name"]), len(train_ds.synapses["syn_idx"])
    over = _parse_kv(args.set, "--set")
    for key, value in (("n_segments", S), ("n_channels", C)):
        if key in over and over[key] != value:
            raise ValueError(f"--set {key}={over[key]} but the data have {value}")
        over[key] = value
    if args.imem:
        over["imem_tasks"] = True
    return over


def _check_local_channels(model: Surrogate, synapses: dict) -> None:
    """A model with ``local_taus`` assumes the channel layout of DESIGN.md; the data must have it."""
    seg = np.asarray(synapses["seg_idx"]).astype(np.int64)
    typ = np.asarray(synapses["type"]).astype(np.int64)
    chan = model.local_channels.cpu().numpy()                       # [S, 2]
    got = np.full_like(chan, model.n_channels)
    got[seg, typ] = np.arange(len(seg))
    if not np.array_equal(got, chan):
        raise ValueError("local_taus: the data's synapse table (synapses/seg_idx, type) does not follow the "
                         "channel layout of DESIGN.md (channel c < n: excitatory on segment c + 1, n + c its "
                         "inhibitory partner) that the local features assume")


class CsvLog:
    """Append-only CSV; on resume, rows after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` OR-ed over all ranks (so that all of them leave the loop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def train(args: argparse.Namespace, datasets: tuple | None = None) -> dict:
    """Run (or resume) a training; returns a summary dict (final metrics, paths, steps done).

    ``datasets`` = (train, val) overrides ``args.data`` (for scripts that build their own datasets).
    """
    rank, world, local_rank = _distributed()
    device = _device(args.device, local_rank)
    main_proc = rank == 0
    out = Path(args.out)
    last = out.with_name(out.name + ".last")
    log_path = out.with_name(out.name + ".csv")
    if main_proc:
        out.parent.mkdir(parents=True, exist_ok=True)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    torch.manual_seed(args.seed + rank)

    train_ds, val_ds = datasets if datasets is not None else open_datasets(args)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"empty dataset (train {len(train_ds)} windows, val {len(val_ds)}): "
                         f"shorter --window-ms or more data needed")
    model = build_model(args.arch, args.config, **_config_overrides(args, train_ds))
    if model.n_local:
        _check_local_channels(model, train_ds.synapses)
    stats = train_ds.stats
    model.set_normalization(stats["v_mean"], stats["v_std"], stats.get("v0"), stats.get("imem_mean"),
                            stats.get("imem_std"))
    model.to(device)

    # -- resume or start ------------------------------------------------------------------------------------
    state = None
    if last.exists() and not args.restart:
        ckpt = load_checkpoint(last)
        if ckpt.get("arch") != model.arch or ckpt.get("config") != model.config.to_dict():
            raise CheckpointError(f"{last} was written for arch {ckpt.get('arch')!r} with config "
                                  f"{ckpt.get('config')}, not arch {model.arch!r} with {model.config.to_dict()}; "
                                  "pass --restart to discard it or choose another --out")
        model.load_state_dict(ckpt["state_dict"])
        norm = ckpt["normalization"]   # keep the normalisation the weights were trained with
        model.set_normalization(norm["v_mean"], norm["v_std"], norm.get("v_rest"), norm.get("imem_mean"),
                                norm.get("imem_std"))
        state = ckpt["train_state"]
    start = int(state["step"]) if state else 0
    if state and start >= args.steps and out.exists():
        if main_proc:
            print(f"{out}: already trained for {start} steps (CKPT.last); nothing to do")
        return {"steps_done": start, "out": str(out), "metrics": load_checkpoint(out).get("metrics", {}),
                "resumed_from": start}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    use_amp = bool(args.amp and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    base_w = base_task_weights(model, args.spike_weight, args.imem_weight).to(device)

    if state:
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        pos_weight = state["pos_weight"].to(device)
        lbtw_l0 = state["lbtw_l0"].to(device) if state.get("lbtw_l0") is not None else None
        torch.set_rng_state(state["rng_cpu"][rank] if isinstance(state["rng_cpu"], list) else state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"][rank] if isinstance(state["rng_cuda"], list)
                                     else state["rng_cuda"], device)
        wall0 = float(state.get("wall_s", 0.0))
    else:
        if args.spike_pos_weight == "auto":
            p = _estimate_spike_fraction(train_ds, seed=args.seed)
            pw = float(np.clip(math.sqrt((1 - p) / p), 1.0, 50.0)) if p > 0 else 1.0
        else:
            pw, p = float(args.spike_pos_weight), None
        pos_weight = torch.tensor(pw, device=device)
        if p is not None and p > 0:   # start the spike tower at the (weighted) base rate
            with torch.no_grad():
                model.towers.b2[model.n_segments] = math.log(p * pw / (1 - p))
        lbtw_l0 = None
        wall0 = 0.0

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatchSampler(len(train_ds), args.batch, start, stop, args.seed, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))   # own generator: the global RNG stays resumable

    csv_log = CsvLog(log_path, start) if main_proc else None
    provenance = {"data": str(args.data), "dataset": getattr(train_ds, "provenance", None),
                  "neuron_version": (getattr(train_ds, "provenance", None) or {}).get("neuron_version"),
                  "versions": _versions(), "arch": model.arch, "config_name": args.config,
                  "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}

    def save(path: Path, step: int, metrics: dict, with_state: bool) -> None:
        extra = None
        if with_state:
            rng_cpu = torch.get_rng_state()
            rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            if world > 1:   # every rank's RNG, so that each resumes its own stream
                gathered = [None] * world
                torch.distributed.all_gather_object(gathered, (rng_cpu, rng_cuda))
                rng_cpu, rng_cuda = [g[0] for g in gathered], [g[1] for g in gathered]
            extra = {"train_state": {
                "step": step, "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "pos_weight": pos_weight.detach().cpu(), "lbtw_l0": None if lbtw_l0 is None else lbtw_l0.cpu(),
                "rng_cpu": rng_cpu, "rng_cuda": rng_cuda, "wall_s": wall0 + time.time() - t_start}}
        if main_proc:
            save_checkpoint(path, model, segments=train_ds.segments, synapses=train_ds.synapses,
                            dt_ms=float(getattr(train_ds, "dt_ms", 1.0)),
                            provenance={**provenance, "steps": step}, metrics=metrics, extra=extra)

    if main_proc:
        print(f"training {model.arch} ({args.config}): {model.num_parameters():,} parameters, receptive field "
              f"{model.receptive_field} ms, {len(train_ds)} train / {len(val_ds)} val windows, device {device}, "
              f"{world} process(es)" + (f", AMP {str(amp_dtype).split('.')[-1]}" if use_amp else "")
              + (" (--amp ignored: no CUDA device)" if args.amp and not use_amp else "")
              + (f"; resuming at step {start}" if start else ""))
    bar = None
    if main_proc and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.steps, initial=start, desc=f"train {model.arch}", unit="step", dynamic_ncols=True)

    t_start = time.time()
    rollout = args.rollout > 0 and model.config.feedback   # without feedback there is nothing to roll out
    deadline = None if args.time_limit_min is None else t_start + 60.0 * args.time_limit_min
    timed_out = False
    model.train()
    running = {}
    step = start
    metrics = {}
    for batch in loader:
        lr = _lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, tgt = prepare_batch(model, batch, device)
        if args.fb_noise > 0 and model.config.feedback:
            x = x.clone()
            x[:, model.n_channels:] += args.fb_noise * torch.randn_like(x[:, model.n_channels:])
        B = x.shape[0]
        if rollout:
            x_own = x
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                for _ in range(args.rollout):
                    y0 = model(x_own, all_tasks=True)[:, :model.n_segments].float()
                    x_own = with_own_feedback(model, x, y0, args.rollout_p)
            model.train()
            x = torch.cat([x, x_own])   # one forward pass (DDP-safe): teacher-forced half, own-feedback half
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            y = net(x, all_tasks=True)
        losses = task_losses(model, y[:B], tgt, args.warmup_ms, pos_weight)
        if lbtw_l0 is None:
            lbtw_l0 = losses.detach().clone()
        w = lbtw_weights(base_w, losses, lbtw_l0, args.lbtw_alpha)
        loss = (w * losses).sum()
        loss_ro = None
        if rollout:
            losses_ro = task_losses(model, y[B:], tgt, args.warmup_ms, pos_weight)
            loss_ro = (w * losses_ro).sum()
            loss = loss + args.rollout_weight * loss_ro
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(loss)}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        scaler.step(opt)
        scaler.update()
        step += 1

        S = model.n_segments
        for k, v in (("loss", loss), ("loss_v", losses[:S].mean()), ("loss_spike", losses[S]),
                     ("loss_imem", losses[S + 1:].mean() if model.config.imem_tasks else None),
                     ("loss_rollout", loss_ro)):
            if v is not None:
                running.setdefault(k, []).append(float(v.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
        if deadline is not None:
            timed_out = _any_rank(time.time() > deadline, world, device)
        is_eval = (args.eval_every and step % args.eval_every == 0) or step == args.steps or timed_out
        if main_proc and (step % args.log_every == 0 or is_eval or step == stop):
            row = {"step": step, "lr": lr, "wall_s": wall0 + time.time() - t_start,
                   **{k: float(np.mean(v)) for k, v in running.items()}}
            running = {}
            if is_eval:
                metrics = validate(model, val_ds, args.val_windows, device, args.warmup_ms)
                row.update(metrics)
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            csv_log.write(row)
        if step % args.save_every == 0 or step == stop or timed_out:
            save(last, step, metrics, with_state=True)
        if world > 1 and is_eval:
            torch.distributed.barrier()   # the others wait while rank 0 validates
        if timed_out:
            break
    if bar is not None:
        bar.close()

    summary = {"steps_done": step, "resumed_from": start, "out": str(out), "last": str(last),
               "log": str(log_path), "metrics": metrics}
    if timed_out and main_proc:
        print(f"time limit of {args.time_limit_min} min reached at step {step} of {args.steps}")
    if step >= args.steps or timed_out:
        if not metrics and main_proc:   # e.g. resumed exactly at the end: nothing was validated in this run
            metrics = validate(model, val_ds, args.val_windows, device, args.warmup_ms)
        final = {**metrics, "steps": step, "wall_s": wall0 + time.time() - t_start,
                 **({"stopped_by_time_limit": 1.0} if timed_out else {})}
        save(out, step, final, with_state=False)
        summary["metrics"] = final
        if main_proc:
            print(f"wrote {out} (" + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + ")")
    elif main_proc:
        print(f"stopped at step {step} of {args.steps}; {last} holds the state, run again to resume")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary

