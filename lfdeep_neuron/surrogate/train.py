"""Train an MH / MMoE / MMoEEx surrogate: ``lfdeep-neuron train``.

    lfdeep-neuron train --recipe spike_lstm_mh --data DIR --out runs/mh.pt          # a bundled recipe
    lfdeep-neuron train --recipe my.toml --data DIR --out CKPT --steps 500          # flags override it
    lfdeep-neuron train --data synthetic:segments=6 --arch mh --config tiny --out /tmp/mh.pt --steps 300
    torchrun --nproc_per_node=4 -m lfdeep_neuron.cli train --recipe ... --amp        # several GPUs

Recipes
-------
A recipe is a small TOML file: top-level keys are this command's options (``steps = 2200``, ``window_ms =
400``, ...), the ``[model]`` table overrides entries of the named model configuration (``channels = [64]``).
Precedence: built-in defaults < recipe < command-line flags (``--set KEY=VALUE`` over ``[model]``). Bundled
recipes live in ``lfdeep_neuron/surrogate/recipes/`` (``--recipe NAME``); one reproduces the bundled model.
A recipe may start from another: ``base = "NAME"`` (a recipe in the same folder, else a bundled one; a path
ending in ``.toml`` is read relative to the recipe) and state only what differs. The base is resolved first
(recursively; a cycle is an error), then the recipe's keys are merged into it, tables key by key.

What one step does
------------------
A batch of windows ``x_syn [B, C, T]`` (raw channel values), ``v [B, S, T]`` (mV), ``spike [B, T]``
(``imem [B, S, T]``) becomes the model input ``x_syn[t]`` (+ ``z(v[t-1])`` for feedback models: teacher forcing)
and the targets ``z(v[t])``, ``spike[t]`` (``z(imem[t])``) for t = 1..T-1. With ``config.soma_clip_mV`` the
soma target is ``min(v_soma, clip)``: the spike lives in the spike output. Loss = mean over segments of the
per-segment MSE of z-scored voltages + ``soma_weight`` * the soma's MSE + ``spike_weight`` * BCE-with-logits of
the spike task (``spike_pos_weight``) (+ ``imem_weight`` * mean per-segment MSE of z-scored currents)
(+ ``spike_timing_weight`` * :func:`spike_timing_loss`, which asks the logit to peak at the spike's millisecond). The
spike output's bias starts at the logit of the training data's spike probability per ms. ``lbtw_alpha > 0``:
each task's weight times ``(L_i / L_i(0)) ** alpha`` (loss-balanced task weighting), renormalised.

Defaults are the regime that worked on real Hay data: no voltage feedback (feedback models diverged in closed
loop), no rollout loss, 400-ms windows that skip each simulation's first 500 ms (the initial transient).
For feedback models, ``rollout K`` runs the model K times on its own predictions and trains on the final
feedback sequence as a second half of the batch (measured on the synthetic cell: closed-loop RMSE 6.9 / 11.7
-> 3.6 / 3.4 mV); ``fb_noise`` adds Gaussian noise (z units) to the teacher-forced feedback. Spike-history
models read the true spikes in training; ``history_drop`` / ``history_extra_hz`` corrupt that input (missed and
spurious spikes, :func:`corrupt_spike_history`) so that the model learns not to over-trust it; ``history_own``
feeds a fraction of the windows the spikes the model emits itself (:func:`with_own_spike_history`).

Stopping and resuming
---------------------
``CKPT.last`` (model, optimiser, step, RNG states) is written atomically every ``save_every`` steps, at
``stop_after`` and when ``time_limit_min`` runs out; rerunning the same command resumes from it. Batches are
a pure function of (seed, step, rank) -- the step is the data position -- so a resumed run reproduces the
uninterrupted one. ``CKPT`` itself is written at the end (and, usable but marked ``stopped_by_time_limit``,
when time runs out). Progress: a tqdm bar (loss, last validation) and one JSON line per logged step in
``CKPT.jsonl``. Adam with linear warm-up and cosine decay; gradient clipping; AMP on CUDA (``--amp``);
DistributedDataParallel under ``torchrun``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from lfdeep_neuron.errors import InputError
from lfdeep_neuron.surrogate.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lfdeep_neuron.surrogate.metrics import SOMA_CLIP_MV, spike_onsets
from lfdeep_neuron.surrogate.mtl import ARCHS, CONFIGS, Surrogate, SurrogateConfig, build_model
from lfdeep_neuron.surrogate.stream import closed_loop

__all__ = ["configure_parser", "run", "parse_args", "resolve", "train", "load_recipe", "resolve_recipe",
           "merge_recipe", "open_data", "Windows", "task_losses", "spike_timing_loss", "prepare_batch",
           "base_task_weights", "lbtw_weights", "with_own_feedback", "validate",
           "RECIPES_DIR", "DEFAULTS", "SOMA_CLIP_MV", "parse_overrides"]

RECIPES_DIR = Path(__file__).resolve().with_name("recipes")

#: Built-in defaults of every option (a recipe and flags override them).
DEFAULTS: dict = dict(
    data=None, out=None, init=None, arch=None, config="paper", set=[], imem=False,
    steps=5000, batch=16, window_ms=400, stride_ms=None, skip_ms=500, warmup_ms=0, train_seconds=None,
    lr=1e-3, lr_warmup=None, weight_decay=0.0, clip=1.0,
    voltage_weight=1.0, soma_weight=1.0, spike_weight=1.0, spike_pos_weight="1", spike_balance=None,
    imem_weight=1.0, lbtw_alpha=0.0, spike_timing_weight=0.0, spike_timing_ms=5, input_jitter=0.0,
    rollout=0, rollout_p=1.0, rollout_weight=1.0, fb_noise=0.0, history_drop=0.0, history_extra_hz=0.0,
    history_own=0.0, history_own_threshold=-1.5, history_own_passes=2,
    device="auto", threads=None, amp=False, workers=0, seed=0, save_every=200, eval_every=500, val_windows=16,
    val_sims=None, keep_best=None, log_every=10, cache_dir=None,
    stop_after=None, time_limit_min=None, restart=False, no_progress=False,
)
_FLAGS_ONLY = {"data", "out", "init", "set", "restart", "stop_after", "no_progress", "device", "threads", "workers",
               "cache_dir"}


# ---------------------------------------------------------------------------------------------------------
# Command line and recipes
# ---------------------------------------------------------------------------------------------------------
DESCRIPTION = """\
Train a multitask surrogate (MH, MMoE or MMoEEx) of the Hay L5PC on simulation records.
Settings: built-in defaults < the recipe (--recipe) < these flags. Rerunning the same
command resumes from CKPT.last; torchrun runs it on several GPUs."""

EPILOG = """\
examples:
  lfdeep-neuron train --recipe spike_lstm_mh_history_128_16k --data DIR --out runs/m.pt
  lfdeep-neuron train --data synthetic --arch mh --config tiny --out /tmp/m.pt --steps 300"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    from lfdeep_neuron.surrogate.checkpoint import checkpoint_argument

    p.description, p.epilog = DESCRIPTION, EPILOG
    p.usage = "%(prog)s --data DATA --out CKPT (--recipe NAME | --arch ARCH) [options]"

    def add(group, flag, help, none=None, **kw):
        """An option whose help ends with its default; ``none``: what no value means (no default)."""
        dest = flag.lstrip("-").replace("-", "_")
        default = DEFAULTS.get(dest)
        if kw.get("action") == "store_const":
            shown = ""                                 # a switch: off unless given
        elif default in (None, []):
            shown = f" ({none})" if none else ""
        else:
            shown = f" (default: {default})"
        if "action" not in kw and "choices" not in kw:     # short placeholders keep the help readable
            kw.setdefault("metavar", "MS" if flag.endswith("-ms") else
                          {int: "N", float: "X"}.get(kw.get("type"), "VALUE"))
        group.add_argument(flag, default=argparse.SUPPRESS, help=help + shown, **kw)

    g = p.add_argument_group("data")
    add(g, "--data", "simulation records: a folder of sim_*.h5 from `generate` (DIR1,DIR2 joins folders; "
                     "DIR:first=N takes its first N simulations), or 'synthetic[:segments=6,sims=8,seed=0]' "
                     "(a small synthetic cell)", none="required", metavar="DATA")
    add(g, "--window-ms", "length of a training window (ms = steps)", type=int)
    add(g, "--stride-ms", "spacing of the training windows (ms)", none="default: window/2", type=int)
    add(g, "--skip-ms", "left out at the start of each simulation: the initial transient (ms)", type=int)
    add(g, "--warmup-ms", "steps at the start of each window left out of the loss", type=int)
    add(g, "--train-seconds", "train on a fixed random subset of the train split holding this many simulated "
                              "seconds (nested across budgets)", none="default: the whole split", type=float)
    add(g, "--spike-balance", "oversample windows holding a somatic spike to this fraction",
        none="default: off", type=float)
    add(g, "--input-jitter", "augmentation: the fraction of input events moved by 1 ms, earlier or later, "
                             "targets unchanged (0: off)", type=float)
    add(g, "--val-windows", "validation windows", type=int)
    add(g, "--val-sims", "validate on the first N simulations of the val split only",
        none="default: all", type=int)
    add(g, "--cache-dir", "read windows from uncompressed memory-mapped copies of the records kept in this "
                          "folder (made on first use, ~13 MB per 6-s simulation; ~5x cheaper windows)",
        none="default: read the records", metavar="DIR")
    add(g, "--workers", "DataLoader worker processes", type=int)

    g = p.add_argument_group("model")
    add(g, "--recipe", "a recipe: TOML file, or the name of a bundled one (lfdeep_neuron/surrogate/recipes/)",
        none="default: none", metavar="NAME")
    add(g, "--arch", "architecture", none="required, here or in the recipe", choices=sorted(ARCHS))
    add(g, "--config", "named model configuration", choices=sorted(CONFIGS))
    add(g, "--set", "override an entry of the model configuration, e.g. channels=64 (repeatable)",
        none="default: none", action="append", metavar="KEY=VALUE")
    add(g, "--imem", "also train the bin-mean membrane currents as tasks (for the LFP)", action="store_const",
        const=True)
    add(g, "--init", "warm start from this checkpoint's weights and normalisation (same arch and config, or "
                     "the same without spike_history), fresh optimiser; ignored when CKPT.last resumes",
        none="default: random initialisation", type=checkpoint_argument, metavar="CKPT")

    g = p.add_argument_group("optimisation")
    add(g, "--steps", "total optimiser steps (the LR schedule spans them)", type=int)
    add(g, "--batch", "windows per step (per process under torchrun)", type=int)
    add(g, "--lr", "peak learning rate (Adam, linear warm-up, cosine decay)", type=float)
    add(g, "--lr-warmup", "warm-up steps", none="default: min(200, steps/10)", type=int)
    add(g, "--weight-decay", "Adam weight decay", type=float)
    add(g, "--clip", "gradient-norm clip (0: off)", type=float)
    add(g, "--seed", "seed of the initialisation and of the batches", type=int)
    add(g, "--voltage-weight", "loss weight of the mean voltage MSE over all segments", type=float)
    add(g, "--soma-weight", "extra loss weight of the soma voltage MSE", type=float)
    add(g, "--spike-weight", "loss weight of the spike BCE", type=float)
    add(g, "--spike-pos-weight", "BCE pos_weight; 'auto': sqrt(negatives/positives) clipped to [1, 50]",
        metavar="X|auto")
    add(g, "--spike-timing-weight", "loss weight of the spike-timing term: around each true spike, the "
                                    "cross-entropy of a softmax of the spike logit over its bins (0: off)",
        type=float)
    add(g, "--spike-timing-ms", "half-width of that softmax window (ms)", type=int)
    add(g, "--imem-weight", "loss weight of the membrane-current MSE (with --imem)", type=float)
    add(g, "--lbtw-alpha", "loss-balanced task weighting exponent (0: off)", type=float)

    g = p.add_argument_group("optimisation, feedback models only")
    add(g, "--rollout", "K self-feedback passes for the rollout loss (0: off)", type=int)
    add(g, "--rollout-p", "per-step probability of feeding back the own prediction", type=float)
    add(g, "--rollout-weight", "loss weight of the rollout half of the batch", type=float)
    add(g, "--fb-noise", "Gaussian noise (z units) on the teacher-forced feedback", type=float)

    g = p.add_argument_group("optimisation, spike-history models only")
    add(g, "--history-drop", "probability of removing each true spike from the history input", type=float)
    add(g, "--history-extra-hz", "rate of spurious spikes added to the history input (Hz)", type=float)
    add(g, "--history-own", "fraction of windows whose history input is the model's own emitted spikes",
        type=float)
    add(g, "--history-own-threshold", "spike-logit threshold of those emitted spikes", type=float)
    add(g, "--history-own-passes", "no-grad passes making them, each reading the previous pass's spikes",
        type=int)

    g = p.add_argument_group("output")
    add(g, "--out", "checkpoint to write (CKPT); CKPT.last (to resume) and CKPT.jsonl (the log) go next to it",
        none="required", metavar="CKPT")
    add(g, "--save-every", "write CKPT.last every N steps", type=int)
    add(g, "--eval-every", "validate every N steps (0: only at the end)", type=int)
    add(g, "--keep-best", "also write CKPT.best: the weights at the best validation value of this metric, "
                          "e.g. val_bce_spike_tf", none="default: off", choices=VAL_METRICS, metavar="METRIC")
    add(g, "--log-every", "log every N steps", type=int)
    add(g, "--no-progress", "no progress bar", action="store_const", const=True)

    g = p.add_argument_group("running and resuming")
    add(g, "--device", "auto, cpu, cuda, cuda:1, ...", metavar="DEVICE")
    add(g, "--threads", "torch CPU threads (1 is often fastest on a busy machine)",
        none="default: torch's choice, one per core", type=int)
    add(g, "--amp", "mixed precision on CUDA (bf16 if supported, else fp16)", action="store_const", const=True)
    add(g, "--stop-after", "stop after N steps in this invocation (writes CKPT.last; a rerun resumes)",
        none="default: run to --steps", type=int)
    add(g, "--time-limit-min", "wall-clock budget of this invocation (minutes): stop there, write CKPT.last "
                               "and a usable CKPT", none="default: none", type=float)
    add(g, "--restart", "ignore an existing CKPT.last", action="store_const", const=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``lfdeep-neuron train`` arguments and resolve them against the recipe and the defaults."""
    from lfdeep_neuron.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="lfdeep-neuron train", formatter_class=HelpFormatter)
    configure_parser(p)
    return resolve(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise InputError(f"--recipe {name}: no such file, nor a bundled recipe (bundled: {known})")


def _read_recipe(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a valid TOML recipe ({err})") from err


def _base_path(base, path: Path) -> Path:
    """The file a recipe's ``base = ...`` names: relative to the recipe's folder, else a bundled recipe."""
    if not isinstance(base, str) or not base.strip():
        raise InputError(f"{path}: 'base' must be the name of another recipe, got {base!r}")
    local = path.parent / (base if base.endswith(".toml") else f"{base}.toml")
    if local.is_file():
        return local
    bundled = RECIPES_DIR / (base if base.endswith(".toml") else f"{base}.toml")
    if bundled.is_file():
        return bundled
    raise InputError(f"{path}: base recipe {base!r} not found (looked for {local} and {bundled})")


def merge_recipe(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys on top; tables (dicts) are merged key by key, other values replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_recipe(out[key], value)
        else:
            out[key] = value
    return out


def _check_recipe(recipe: dict, path: Path) -> None:
    model = recipe.get("model", {})
    if not isinstance(model, dict):
        raise InputError(f"{path}: 'model' must be a table of model config entries ([model])")
    known = set(DEFAULTS) - _FLAGS_ONLY
    bad = sorted(set(recipe) - known - {"model"})
    if bad:
        raise InputError(f"{path}: unknown recipe keys {bad}; known: {sorted(known)}")


def resolve_recipe(name: str) -> tuple[dict, Path]:
    """``(settings, path)``: a recipe with its ``base`` chain merged in (``base`` dropped, ``[model]`` kept)."""
    first = path = _recipe_path(name)
    seen: list[Path] = []
    layers: list[dict] = []
    while True:
        if path.resolve() in seen:
            loop = [*seen[seen.index(path.resolve()):], path.resolve()]
            raise InputError(f"{first}: recipe bases form a cycle ({' -> '.join(p.name for p in loop)}; "
                             f"files: {', '.join(str(p) for p in loop[:-1])})")
        seen.append(path.resolve())
        recipe = _read_recipe(path)
        base = recipe.pop("base", None)
        _check_recipe(recipe, path)
        layers.append(recipe)
        if base is None:
            break
        path = _base_path(base, path)
    settings: dict = {}
    for layer in reversed(layers):
        settings = merge_recipe(settings, layer)
    return settings, first


def load_recipe(name: str) -> tuple[dict, dict, Path]:
    """``(options, model overrides, path)`` of a recipe file, its base resolved (see the module docstring)."""
    recipe, path = resolve_recipe(name)
    model = recipe.pop("model", {})
    return recipe, model, path


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults < recipe < flags; ``args.model`` = the model config overrides (recipe ``[model]`` < ``--set``)."""
    if getattr(args, "_resolved", False):
        return args
    given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    recipe, model, path = ({}, {}, None) if not given.get("recipe") else load_recipe(given["recipe"])
    settings = {**DEFAULTS, **recipe, **given}
    model = dict(model)
    try:
        model.update(parse_overrides(settings["set"] or [], "--set"))
    except ValueError as err:
        raise InputError(str(err)) from err
    settings.update(model=model, recipe=str(path) if path else None)
    for key in ("data", "out", "arch"):
        if settings[key] is None:
            where = " (or in the recipe)" if key == "arch" else ""
            raise InputError(f"--{key} is required{where}")
    if settings["arch"] not in ARCHS:
        raise InputError(f"{path or '--arch'}: unknown arch {settings['arch']!r}; expected one of {sorted(ARCHS)}")
    if settings["config"] not in CONFIGS:
        raise InputError(f"{path or '--config'}: unknown config {settings['config']!r}; known: {sorted(CONFIGS)}")
    if int(settings["steps"]) < 1:
        raise InputError(f"--steps must be >= 1, got {settings['steps']}")
    if settings["threads"] is not None and int(settings["threads"]) < 1:
        raise InputError(f"--threads must be >= 1, got {settings['threads']}")
    where = f"{path}: " if path else ""           # names the recipe file in the message when there is one
    if not 0.0 <= float(settings["history_drop"]) <= 1.0 or float(settings["history_extra_hz"]) < 0:
        raise InputError(f"{where}--history-drop must be in [0, 1] and --history-extra-hz "
                         f">= 0, got {settings['history_drop']} and {settings['history_extra_hz']}")
    if not 0.0 <= float(settings["input_jitter"]) <= 1.0:
        raise InputError(f"{where}--input-jitter must be a fraction in [0, 1], got {settings['input_jitter']}")
    if not 0.0 <= float(settings["history_own"]) <= 1.0 or int(settings["history_own_passes"]) < 1:
        raise InputError(f"{where}--history-own must be in [0, 1] and --history-own-passes "
                         f">= 1, got {settings['history_own']} and {settings['history_own_passes']}")
    if not math.isfinite(float(settings["history_own_threshold"])):
        raise InputError(f"{where}--history-own-threshold must be a finite logit, got "
                         f"{settings['history_own_threshold']}")
    if settings["spike_balance"] is not None and not 0.0 < float(settings["spike_balance"]) < 1.0:
        raise InputError(f"{where}--spike-balance must be a fraction in (0, 1), got "
                         f"{settings['spike_balance']}")
    timing_w, timing_ms = float(settings["spike_timing_weight"]), settings["spike_timing_ms"]
    if not (math.isfinite(timing_w) and timing_w >= 0) or int(timing_ms) != timing_ms or int(timing_ms) < 1:
        raise InputError(f"{where}--spike-timing-weight must be a finite number >= 0 and "
                         f"--spike-timing-ms an integer >= 1, got {settings['spike_timing_weight']} and {timing_ms}")
    settings["spike_timing_ms"] = int(timing_ms)      # a recipe may write 5.0
    out = argparse.Namespace(**settings)
    out._resolved = True
    return out


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


def parse_overrides(items, what: str) -> dict:
    """``["channels=64", "feedback=false"]`` -> ``{"channels": 64, "feedback": False}`` (commas make tuples)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# Data: whole simulations, cut into windows here
# ---------------------------------------------------------------------------------------------------------
def open_data(args) -> tuple:
    """(train, val) simulation sources for ``args.data``: each has ``records`` (``n_steps``,
    ``spike_times_ms`` per simulation), ``read(pos, t0_ms, n_bins)``, ``segments``, ``synapses``, ``stats``."""
    if str(args.data).startswith("synthetic"):
        from lfdeep_neuron.surrogate.synthetic import SyntheticDataset
        spec = str(args.data).partition(":")[2]
        try:
            opts = parse_overrides([s for s in spec.split(",") if s], "--data synthetic")
        except ValueError as err:
            raise InputError(str(err)) from err
        names = {"segments": "n_segments", "sims": "n_sims", "duration": "duration_ms", "seed": "seed",
                 "cell_seed": "cell_seed"}
        bad = set(opts) - set(names)
        if bad:
            raise InputError(f"--data synthetic: unknown options {sorted(bad)}; known: {sorted(names)}")
        kw = {names[k]: int(v) for k, v in opts.items()}
        kw.setdefault("seed", args.seed)
        val_kw = {**kw, "n_sims": max(2, kw.get("n_sims", 8) // 4)}
        return SyntheticDataset(None, "train", None, **kw), SyntheticDataset(None, "val", None, **val_kw)
    if args.cache_dir is not None:          # fail here, in one line, not inside the first batch; write nothing
        _check_writable_folder(Path(args.cache_dir), "--cache-dir")
    from lfdeep_neuron.data.dataset import SimulationDataset, parse_folder_spec
    roots = str(args.data).split(",")      # several dataset folders (DIR or DIR:first=N): one dataset
    for spec in roots:
        root = parse_folder_spec(spec)[0]
        if not root.is_dir():
            raise InputError(f"--data {root}: no such directory")
        if not any(root.glob("*.h5")):
            raise InputError(f"--data {root}: no simulation records (*.h5) in this folder; create them with "
                             "`lfdeep-neuron generate`")
    from lfdeep_neuron.data.records import RecordFormatError
    fields = ("x_syn", "v", "spike") + (("imem",) if args.imem else ())
    try:
        return tuple(SimulationDataset(roots if len(roots) > 1 else roots[0], split=split, window_ms=None,
                                       seed=args.seed, fields=fields, cache_dir=args.cache_dir)
                     for split in ("train", "val"))
    except RecordFormatError as err:
        raise InputError(f"--data {args.data}: {err}") from err
    except InputError:                      # already one line naming the folder (e.g. DIR:first=N too large)
        raise
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"--data {args.data}: {err}") from err


def _check_writable_folder(folder: Path, flag: str) -> None:
    """InputError unless ``folder`` is, or can be created as, a writable folder (nothing is created here)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        what = "not a folder" if not existing.is_dir() else "not writable"
        raise InputError(f"{flag} {folder}: cannot be a cache folder ({existing} is {what})")


class Windows(torch.utils.data.Dataset):
    """Windows ``[t0, t0 + window_ms)`` of every simulation of ``sims``, with ``t0 = skip_ms, skip_ms + stride_ms,
    ...``; items are dicts of tensors (``x_syn``, ``v``, ``spike``, ``imem`` as ``sims.read`` gives them).

    ``spike_balance`` (strictly between 0 and 1, else ValueError): windows holding a somatic spike are repeated
    until about that fraction of the index holds one (a fixed index: the sampler's draws are what vary).
    ``max_sims``: windows of the first simulations only."""

    def __init__(self, sims, window_ms: int, stride_ms: int, skip_ms: int = 0, spike_balance: float | None = None,
                 max_sims: int | None = None):
        if spike_balance is not None and not 0.0 < float(spike_balance) < 1.0:
            raise ValueError(f"spike_balance must lie strictly between 0 and 1, got {spike_balance}")
        self.sims, self.window_ms = sims, int(window_ms)
        self.segments, self.synapses = sims.segments, sims.synapses
        rows, spiking = [], []
        for pos, rec in enumerate(sims.records[:max_sims]):     # max_sims: the first simulations only
            starts = np.arange(int(skip_ms), int(rec.n_steps) - self.window_ms + 1, int(stride_ms))
            bins = np.sort(np.ceil(np.asarray(rec.spike_times_ms, dtype=np.float64)).astype(np.int64))
            n_in = np.searchsorted(bins, starts + self.window_ms) - np.searchsorted(bins, starts)
            rows.append(np.stack([np.full(starts.size, pos), starts], axis=1))
            spiking.append(n_in > 0)
        self.index = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)
        has = np.concatenate(spiking) if spiking else np.zeros(0, bool)
        if spike_balance is not None and 0 < has.sum() < has.size:
            f = float(spike_balance)
            reps = max(1, int(round(f / (1 - f) * (~has).sum() / has.sum())))
            self.index = np.concatenate([self.index[~has], np.repeat(self.index[has], reps, axis=0)])
            has = np.concatenate([np.zeros((~has).sum(), bool), np.ones(has.sum() * reps, bool)])
        self.spiking_fraction = float(has.mean()) if has.size else 0.0

    @property
    def stats(self) -> dict:
        return self.sims.stats

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        pos, t0 = (int(v) for v in self.index[i])
        return {k: torch.as_tensor(v) for k, v in self.sims.read(pos, t0, self.window_ms).items()}


class StepBatchSampler(torch.utils.data.Sampler):
    """Random batches that are a pure function of (seed, step, rank): resuming at a step reproduces them."""

    def __init__(self, n: int, batch: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.start, self.stop = n, batch, start, stop
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * self.world + self.rank)
            yield torch.randint(self.n, (self.batch,), generator=g).tolist()


def _spike_probability(train_ds, n: int = 64, seed: int = 0) -> float:
    """Mean of the per-ms spike label over up to ``n`` training windows."""
    g = np.random.default_rng(seed)
    idx = g.choice(len(train_ds), size=min(n, len(train_ds)), replace=False)
    return float(torch.cat([train_ds[int(i)]["spike"].float() for i in idx]).mean())


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------
def build(args, train_ds) -> Surrogate:
    """The model of ``args`` (arch, config, model overrides) sized for the data, with its normalisation."""
    from lfdeep_neuron.surrogate.routing import section_branches

    segments, synapses = train_ds.segments, train_ds.synapses
    over = {"feedback": False, **args.model}           # no feedback unless asked for
    for key, value in (("n_segments", len(segments["name"])), ("n_channels", len(synapses["syn_idx"]))):
        if key in over and over[key] != value:
            raise InputError(f"model setting {key}={over[key]} but the data have {value}")
        over[key] = value
    if args.imem:
        over["imem_tasks"] = True
    routed = over.get("n_branches", CONFIGS[args.config].get("n_branches", 0))
    if routed:
        branch, kind, over["n_branches"] = section_branches(segments, synapses)
    try:
        model = build_model(args.arch, args.config, **over)
    except (TypeError, ValueError) as err:
        raise InputError(f"{args.recipe or 'model settings'}: {err}") from err
    if model.routing is not None:
        model.routing.set_branches(branch, kind)
    if model.n_local:
        _check_local_channels(model, synapses)
    s = train_ds.stats
    model.set_normalization(s["v_mean"], s["v_std"], s.get("v0"), s.get("imem_mean"), s.get("imem_std"))
    return model


def _check_local_channels(model: Surrogate, synapses: dict) -> None:
    """A model with ``local_taus`` assumes the channel layout of ARCHITECTURE.md; the data must have it."""
    seg = np.asarray(synapses["seg_idx"]).astype(np.int64)
    typ = np.asarray(synapses["type"]).astype(np.int64)
    chan = model.local_channels.cpu().numpy()                       # [S, 2]
    got = np.full_like(chan, model.n_channels)
    got[seg, typ] = np.arange(len(seg))
    if not np.array_equal(got, chan):
        raise InputError("local_taus: the data's synapse table (synapses/seg_idx, type) does not follow the "
                         "channel layout (channel c < n: excitatory on segment c + 1, n + c its inhibitory "
                         "partner) that the local features assume")


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------
def prepare_batch(model: Surrogate, batch: dict, device) -> tuple[torch.Tensor, dict]:
    """Window dict -> (model input ``[B, n_inputs, T-1]``, targets dict of z-scored tensors). With
    ``config.soma_clip_mV`` the soma target is clipped there (the feedback input is not)."""
    x_syn = batch["x_syn"].to(device, non_blocking=True)
    v = batch["v"].to(device, non_blocking=True)
    spike = batch["spike"].to(device)
    x = model.make_inputs(x_syn[..., 1:], v[..., :-1], spike[..., :-1])     # spike history: the true spikes
    v_tgt = v[..., 1:]
    clip = model.config.soma_clip_mV
    if clip is not None:
        v_tgt = torch.cat([v_tgt[:, :1].clamp_max(clip), v_tgt[:, 1:]], dim=1)
    tgt = {"v": model.to_z(v_tgt), "spike": spike[..., 1:].float()}
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


def spike_timing_loss(logit: torch.Tensor, spike: torch.Tensor, half_width: int) -> torch.Tensor:
    """Mean over the true spike bins of ``-log softmax(logit[k - W : k + W + 1])[k]``, ``W = half_width``.

    The per-bin BCE does not care whether the logit peaks at the spike's millisecond or a few ms off it; this
    loss does: around each true spike bin ``k`` it is the cross-entropy of "which of these 2W+1 bins holds
    the spike". Bins beyond the window's ends and the other true spike bins inside the ±W window (bursts)
    are left out of the softmax. ``logit``, ``spike`` ``[B, T]``; a batch without spikes gives a zero that
    keeps the graph.
    """
    logit = logit.float()
    k = 2 * half_width + 1
    win = F.pad(logit, (half_width, half_width), value=float("-inf")).unfold(-1, k, 1)     # [B, T, k]
    centre = spike > 0.5
    if not bool(centre.any()):
        return logit.sum() * 0.0
    others = F.pad(spike, (half_width, half_width)).unfold(-1, k, 1)[centre] > 0.5       # [N, k]
    others[:, half_width] = False
    scores = win[centre].masked_fill(others, float("-inf"))
    return -scores.log_softmax(-1)[:, half_width].mean()


def base_task_weights(model: Surrogate, spike_weight: float, imem_weight: float,
                      soma_weight: float = 0.0, voltage_weight: float = 1.0) -> torch.Tensor:
    """Weights making the total = voltage_weight * mean voltage MSE + soma_weight * soma MSE
    + spike_weight * BCE (+ imem_weight * mean imem MSE)."""
    S = model.n_segments
    wv = torch.full((S,), voltage_weight / S)
    wv[0] += soma_weight
    w = [wv, torch.tensor([spike_weight])]
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
    C, S = model.n_channels, model.n_segments
    fb_true = x[:, C:C + S]
    fb_own = torch.cat([fb_true[..., :1], v_pred_z[..., :-1]], dim=-1)
    if p < 1.0:
        use = torch.rand(x.shape[0], 1, x.shape[2], device=x.device) < p
        fb_own = torch.where(use, fb_own, fb_true)
    return torch.cat([x[:, :C], fb_own, x[:, C + S:]], dim=1)     # (the spike-history row, if any, kept)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
#: Keys of :func:`validate`'s result (``--keep-best`` picks one).
VAL_METRICS = ("val_loss_v_tf", "val_bce_spike_tf", "val_rmse_mV_tf", "val_rmse_mV_cl", "val_soma_rmse_mV_cl",
               "val_soma_clip_rmse_mV_cl", "val_spike_auc")


def jitter_input_events(x_syn: torch.Tensor, fraction: float) -> torch.Tensor:
    """Binned synaptic inputs ``[B, C, T]`` (event counts per 1-ms bin, unweighted) with events moved by one bin.

    Every occupied bin gives one of its events, with probability ``fraction``, to the previous or the next bin
    (equally likely; an event that would leave the window stays). Counts are conserved per channel. Draws from
    torch's global generator (saved with the training state, so a resumed run draws the same). Training
    augmentation with unchanged targets: moving 1 % of the events by 1 ms leaves the detailed cell's spikes
    within 0.9 ms (``benchmarks/spike_reliability.py``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"input jitter: fraction must be in [0, 1], got {fraction}")
    if (x_syn < 0).any() or not torch.equal(x_syn, x_syn.round()):
        raise ValueError("input jitter needs event counts; these inputs carry event weights")
    T = x_syn.shape[-1]
    move = (x_syn > 0) & (torch.rand_like(x_syn) < fraction)
    later = torch.rand_like(x_syn) < 0.5
    t = torch.arange(T, device=x_syn.device)
    to_next = move & later & (t < T - 1)
    to_prev = move & ~later & (t > 0)
    nxt, prv = to_next.to(x_syn.dtype), to_prev.to(x_syn.dtype)
    out = x_syn - nxt - prv
    out[..., 1:] += nxt[..., :-1]
    out[..., :-1] += prv[..., 1:]
    return out


def corrupt_spike_history(spike_prev: torch.Tensor, drop: float, extra_hz: float, step_ms: float = 1.0) -> torch.Tensor:
    """The spike-history input ``[B, T]`` (0/1) with each spike removed with probability ``drop`` and spurious
    spikes added at ``extra_hz`` (per bin: ``extra_hz * step_ms / 1000``), from torch's global generator (saved
    with the training state, so a resumed run draws the same). The targets stay the true ones: the model learns
    not to trust a history that its own misses and false spikes will corrupt in closed loop."""
    if not 0.0 <= drop <= 1.0 or extra_hz < 0:
        raise ValueError(f"history noise: drop must be in [0, 1] and extra_hz >= 0, got {drop}, {extra_hz}")
    keep = torch.rand_like(spike_prev) >= drop
    extra = torch.rand_like(spike_prev) < extra_hz * step_ms / 1000.0
    return torch.where(extra, torch.ones_like(spike_prev), spike_prev * keep)


def emitted_spike_history(logit: torch.Tensor, threshold: float, first: torch.Tensor) -> torch.Tensor:
    """The spike-history input ``[B, T]`` a streamer would feed back for spike logits ``logit [B, T]``: one
    spike at each upward crossing of ``threshold`` (the engine's rule; the window's first step counts as
    coming from below), read one step later; ``first [B]`` is the history of the window's first step."""
    spiked = spike_onsets(logit > threshold)
    return torch.cat([first[:, None], spiked[:, :-1].to(first.dtype)], dim=1)


def with_own_spike_history(model: Surrogate, x: torch.Tensor, p: float, threshold: float, passes: int,
                           device, amp: dict) -> torch.Tensor:
    """``x`` with the spike-history row of a fraction ``p`` of its windows (drawn per window from torch's
    global generator) replaced by the spikes the model emits itself: ``passes`` no-grad passes, the first
    reading the true history, each next one the spikes of the previous (a fixed-point iteration towards the
    closed loop, which one pass per step would reach exactly). Targets stay the true ones: the model learns
    to fire right after its own misses and false spikes, which is what it meets in closed loop."""
    use = torch.rand(x.shape[0], device=x.device) < p
    if not bool(use.any()):
        return x
    xo = x[use].clone()
    first = xo[:, -1, 0].clone()                 # the true history of each window's first step stays
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, **amp):
        for _ in range(passes):
            logit = model(xo, all_tasks=True)[:, model.n_segments].float()
            xo[:, -1] = emitted_spike_history(logit, threshold, first)
    model.train(was_training)
    x = x.clone()
    x[use] = xo
    return x


def _improves(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of validation ``metric`` beats ``best`` (None: nothing yet; AUCs: higher is better)."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if metric.endswith("auc") else value < best)


@torch.no_grad()
def validate(model: Surrogate, val_ds, n_windows: int, device, warmup: int = 0, batch: int = 16) -> dict:
    """Errors on ``n_windows`` evenly spaced validation windows (after ``warmup`` steps of each).

    Voltages in mV: RMSE over all segments, teacher-forced (``_tf``) and closed loop (``_cl``: streamed from
    the window's first true voltage, own predictions fed back; for models without feedback the same as
    teacher-forced), the soma's closed-loop RMSE and its RMSE with both traces clipped at -55 mV; the spike
    logit's AUC (per ms bin vs the spike label; NaN when the windows hold no spike). Models with spike history
    read the true spikes here (their closed-loop spikes depend on a threshold calibrated after training:
    ``lfdeep-neuron evaluate`` scores them)."""
    from lfdeep_neuron.surrogate.metrics import spike_auc

    was_training = model.training
    model.eval()
    idx = np.unique(np.linspace(0, len(val_ds) - 1, num=min(n_windows, len(val_ds))).astype(int))
    sq = {"tf": 0.0, "cl": 0.0, "soma": 0.0, "soma_clip": 0.0}
    n_el = n_soma = 0
    lv_sum = bce_sum = 0.0
    logits, labels = [], []
    S = model.n_segments
    for n_batches, start in enumerate(range(0, len(idx), batch), start=1):
        items = [val_ds[int(i)] for i in idx[start:start + batch]]
        b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        x, tgt = prepare_batch(model, b, device)
        y = model(x, all_tasks=True)
        losses = task_losses(model, y, tgt, warmup)
        lv_sum += float(losses[:S].mean())
        bce_sum += float(losses[S])
        v_true = b["v"].to(device)[..., 1:][..., warmup:]
        v_tf = model.to_mV(y[:, :S])[..., warmup:]
        if model.config.feedback:
            v_cl = closed_loop(model, b["x_syn"].to(device)[..., 1:], v0_mV=b["v"].to(device)[..., 0],
                               output="mV").v[..., warmup:]
        else:
            v_cl = v_tf
        sq["tf"] += float((v_tf - v_true).pow(2).sum())
        sq["cl"] += float((v_cl - v_true).pow(2).sum())
        sq["soma"] += float((v_cl[:, 0] - v_true[:, 0]).pow(2).sum())
        sq["soma_clip"] += float((v_cl[:, 0].clamp_max(SOMA_CLIP_MV) - v_true[:, 0].clamp_max(SOMA_CLIP_MV))
                                 .pow(2).sum())
        n_el += v_true.numel()
        n_soma += v_true[:, 0].numel()
        logits.append(y[:, S, warmup:].float().cpu().reshape(-1))
        labels.append(tgt["spike"][..., warmup:].cpu().reshape(-1))
    model.train(was_training)
    lab = torch.cat(labels).numpy()
    auc = float(spike_auc(torch.cat(logits).numpy(), lab)) if 0 < lab.sum() < lab.size else float("nan")
    return {"val_loss_v_tf": lv_sum / n_batches, "val_bce_spike_tf": bce_sum / n_batches,
            "val_rmse_mV_tf": math.sqrt(sq["tf"] / n_el), "val_rmse_mV_cl": math.sqrt(sq["cl"] / n_el),
            "val_soma_rmse_mV_cl": math.sqrt(sq["soma"] / n_soma),
            "val_soma_clip_rmse_mV_cl": math.sqrt(sq["soma_clip"] / n_soma), "val_spike_auc": auc}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints, log, set-up helpers
# ---------------------------------------------------------------------------------------------------------
class JsonlLog:
    """One JSON object per line; on resume, lines after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        keep = []
        if path.exists() and resume_step > 0:
            keep = [ln for ln in path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def _distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises torch.distributed when started by torchrun."""
    env = os.environ
    if not (torch.distributed.is_available() and "RANK" in env and "WORLD_SIZE" in env
            and int(env["WORLD_SIZE"]) > 1):
        return 0, 1, 0
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(env.get("LOCAL_RANK", 0))


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` OR-ed over all ranks (so that all of them leave the loop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _device(arg: str, local_rank: int) -> torch.device:
    if arg == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but CUDA is not available")
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


def _rng_states(device, world: int) -> tuple:
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if world > 1:   # every rank's RNG, so that each resumes its own stream
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (rng_cpu, rng_cuda))
        rng_cpu, rng_cuda = [g[0] for g in gathered], [g[1] for g in gathered]
    return rng_cpu, rng_cuda


def _restore_rng(state: dict, rank: int, device) -> None:
    pick = lambda s: s[rank] if isinstance(s, list) else s  # noqa: E731
    torch.set_rng_state(pick(state["rng_cpu"]))
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(pick(state["rng_cuda"]), device)


_TRAINING_ONLY = ("dropout",)      # config entries that change how a model trains, not its weights or function


def _weights_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _TRAINING_ONLY}


def _same_model(ckpt: dict, model: Surrogate) -> bool:
    """Same arch and config up to training-only entries such as dropout (a checkpoint written before a config
    field existed has that field's default)."""
    try:
        cfg = SurrogateConfig(**ckpt.get("config", {})).to_dict()
    except (TypeError, ValueError):
        return False
    return ckpt.get("arch") == model.arch and _weights_config(cfg) == _weights_config(model.config.to_dict())


def _adds_spike_history(ckpt: dict, model: Surrogate) -> bool:
    """The checkpoint is ``model`` without spike history (same arch, all else equal)."""
    try:
        cfg = SurrogateConfig(**{**ckpt.get("config", {}), "spike_history": True}).to_dict()
    except (TypeError, ValueError):
        return False
    return (ckpt.get("arch") == model.arch and model.config.spike_history
            and not ckpt.get("config", {}).get("spike_history", False)
            and _weights_config(cfg) == _weights_config(model.config.to_dict()))


def _with_spike_input(state: dict, model: Surrogate) -> dict:
    """Weights of a model without spike history, widened for ``model``'s one extra input row: every tensor
    that reads the backbone input gains one zero column (so the widened model computes what the old one did)."""
    out = {}
    for key, new in model.state_dict().items():
        old = state[key]
        if old.shape != new.shape:
            grow = [d for d in range(old.dim()) if old.shape[d] != new.shape[d]]
            if old.dim() != new.dim() or len(grow) != 1 or new.shape[grow[0]] != old.shape[grow[0]] + 1:
                raise CheckpointError(f"cannot widen {key} from {tuple(old.shape)} to {tuple(new.shape)}")
            old = torch.cat([old, old.new_zeros(*(1 if d == grow[0] else n for d, n in enumerate(old.shape)))],
                            dim=grow[0])
        out[key] = old
    return out


def _load_weights(path, model: Surrogate, what: str, hint: str = "", widen: bool = False) -> dict:
    """Load checkpoint ``path``'s weights and the normalisation they were trained with into ``model`` (same
    arch and config, else a :class:`CheckpointError` starting with ``what``); return the checkpoint dict.
    ``widen``: a checkpoint of the same model without spike history is accepted too, its input weights
    widened by a zero column for the spike row."""
    ckpt = load_checkpoint(path)
    state = ckpt["state_dict"]
    if widen and _adds_spike_history(ckpt, model):
        state = _with_spike_input(state, model)
    elif not _same_model(ckpt, model):
        raise CheckpointError(f"{what} arch {ckpt.get('arch')!r} with config {ckpt.get('config')}, not arch "
                              f"{model.arch!r} with {model.config.to_dict()}{hint}")
    model.load_state_dict(state)
    n = ckpt["normalization"]
    model.set_normalization(n["v_mean"], n["v_std"], n.get("v_rest"), n.get("imem_mean"), n.get("imem_std"))
    return ckpt


def _resume(last: Path, model: Surrogate, restart: bool) -> dict | None:
    """Load ``CKPT.last`` into ``model``; return its ``train_state`` (None: start afresh)."""
    if restart or not last.exists():
        return None
    ckpt = _load_weights(last, model, f"{last} was written for", "; pass --restart to discard it or choose "
                                                                  "another --out")
    return ckpt["train_state"]


def _warm_start(path: str, model: Surrogate) -> dict:
    """Load the weights and normalisation of checkpoint ``path`` into ``model`` (``--init``); return the
    provenance of that checkpoint (it becomes part of the new one's)."""
    ckpt = _load_weights(path, model, f"--init {path}: written for", widen=True)
    return {"path": str(path), "provenance": ckpt.get("provenance")}


def _spike_pos_weight(args, train_ds) -> tuple[float, float]:
    """(BCE pos_weight, spike probability per ms of the training windows)."""
    p = _spike_probability(train_ds, seed=args.seed)
    if str(args.spike_pos_weight) == "auto":
        return (float(np.clip(math.sqrt((1 - p) / p), 1.0, 50.0)) if p > 0 else 1.0), p
    try:
        return float(args.spike_pos_weight), p
    except ValueError as err:
        raise InputError(f"--spike-pos-weight must be a number or 'auto', got {args.spike_pos_weight!r}") from err


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def _open_windows(args, datasets) -> tuple:
    """(train simulations, train :class:`Windows`, validation :class:`Windows`) of ``args`` (``datasets`` =
    (train, val) sources overriding ``args.data``); ``--train-seconds`` restricts the training simulations."""
    train_sims, val_sims = datasets if datasets is not None else open_data(args)
    if args.train_seconds is not None:
        if not hasattr(train_sims, "restrict"):
            raise InputError(f"--train-seconds needs a dataset directory, not --data {args.data}")
        train_sims.restrict(float(args.train_seconds))
    window = int(args.window_ms)
    train_ds = Windows(train_sims, window, args.stride_ms or max(1, window // 2), args.skip_ms, args.spike_balance)
    if args.val_sims is not None and args.val_sims < 1:
        raise InputError(f"--val-sims must be >= 1, got {args.val_sims}")
    val_ds = Windows(val_sims, window, window, args.skip_ms, max_sims=args.val_sims)
    n_val = len(val_sims.records)
    if args.val_sims is not None and n_val < args.val_sims:
        print(f"warning: --val-sims {args.val_sims}: the validation split of --data {args.data} holds {n_val} "
              f"simulations; validating on those", file=sys.stderr)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise InputError(f"--data {args.data}: no {window}-ms windows after skipping {args.skip_ms} ms (train "
                         f"{len(train_ds)}, val {len(val_ds)}): shorter --window-ms / --skip-ms or longer "
                         "simulations needed")
    return train_sims, train_ds, val_ds


def _batch_inputs(model: Surrogate, batch: dict, args, device, amp: dict) -> tuple:
    """Model inputs of a batch: ``(x, targets, B)``. With feedback noise, noisy fed-back voltages; with the
    rollout loss, ``x`` is [teacher-forced half; own-feedback half] (2B rows, one forward pass, DDP-safe)."""
    x, tgt = prepare_batch(model, batch, device)
    if args.input_jitter > 0:
        x = x.clone()
        x[:, :model.n_channels] = jitter_input_events(x[:, :model.n_channels], args.input_jitter)
    if args.fb_noise > 0 and model.config.feedback:
        C, S = model.n_channels, model.n_segments
        x = x.clone()
        x[:, C:C + S] += args.fb_noise * torch.randn_like(x[:, C:C + S])
    if model.config.spike_history and (args.history_drop > 0 or args.history_extra_hz > 0):
        x = x.clone()
        x[:, -1] = corrupt_spike_history(x[:, -1], args.history_drop, args.history_extra_hz)
    if model.config.spike_history and args.history_own > 0:
        x = with_own_spike_history(model, x, args.history_own, args.history_own_threshold, args.history_own_passes,
                                   device, amp)
    B = x.shape[0]
    if args.rollout > 0 and model.config.feedback:     # without feedback there is nothing to roll out
        x_own = x
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, **amp):
            for _ in range(args.rollout):
                y0 = model(x_own, all_tasks=True)[:, :model.n_segments].float()
                x_own = with_own_feedback(model, x, y0, args.rollout_p)
        model.train()
        x = torch.cat([x, x_own])
    return x, tgt, B


def _total_loss(model: Surrogate, y: torch.Tensor, tgt: dict, B: int, args, pos_weight, base_w, lbtw_l0) -> tuple:
    """``(loss, per-task losses, rollout loss or None, spike-timing loss or None, lbtw_l0)`` of the outputs ``y``
    (teacher-forced rows first, then the rollout half if any); ``lbtw_l0`` (the first step's losses) is set on
    the first call."""
    losses = task_losses(model, y[:B], tgt, args.warmup_ms, pos_weight)
    if lbtw_l0 is None:
        lbtw_l0 = losses.detach().clone()
    w = lbtw_weights(base_w, losses, lbtw_l0, args.lbtw_alpha)
    loss, loss_ro, loss_timing = (w * losses).sum(), None, None
    if y.shape[0] > B:
        loss_ro = (w * task_losses(model, y[B:], tgt, args.warmup_ms, pos_weight)).sum()
        loss = loss + args.rollout_weight * loss_ro
    if args.spike_timing_weight > 0:
        warm = args.warmup_ms
        loss_timing = spike_timing_loss(y[:B, model.n_segments, warm:], tgt["spike"][..., warm:],
                                        args.spike_timing_ms)
        loss = loss + args.spike_timing_weight * loss_timing
    return loss, losses, loss_ro, loss_timing, lbtw_l0


def train(args: argparse.Namespace, datasets: tuple | None = None) -> dict:
    """Run (or resume) a training; returns a summary dict (final metrics, paths, steps done).

    ``datasets`` = (train, val) simulation sources (see :func:`open_data`) overriding ``args.data``.
    """
    args = resolve(args)
    rank, world, local_rank = _distributed()
    device = _device(args.device, local_rank)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    main_proc = rank == 0
    out = Path(args.out)
    last, log_path = out.with_name(out.name + ".last"), out.with_name(out.name + ".jsonl")
    best_path = out.with_name(out.name + ".best")
    torch.manual_seed(args.seed + rank)

    # -- data ---------------------------------------------------------------------------------------------
    train_sims, train_ds, val_ds = _open_windows(args, datasets)

    # -- model (fresh, or resumed from CKPT.last) ---------------------------------------------------------
    model = build(args, train_ds).to(device)
    state = _resume(last, model, args.restart)
    init = _warm_start(args.init, model) if state is None and args.init else None
    start = int(state["step"]) if state else 0
    if state and start >= args.steps and out.exists():
        if main_proc:
            print(f"{out}: already trained for {start} steps (CKPT.last); nothing to do")
        return {"steps_done": start, "out": str(out), "metrics": load_checkpoint(out).get("metrics", {}),
                "resumed_from": start}

    # -- optimiser, loss weights ------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    use_amp = bool(args.amp and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    base_w = base_task_weights(model, args.spike_weight, args.imem_weight, args.soma_weight,
                               args.voltage_weight).to(device)
    if state:
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        pos_weight = state["pos_weight"].to(device)
        lbtw_l0 = state["lbtw_l0"].to(device) if state.get("lbtw_l0") is not None else None
        _restore_rng(state, rank, device)
        wall0 = float(state.get("wall_s", 0.0))
        best = state.get("best")     # kept only if scored the same way (metric, validation windows)
        if best and (best.get("metric"), best.get("val_sims"), best.get("val_windows")) != \
                (args.keep_best, args.val_sims, args.val_windows):
            best = None
    else:
        pw, p = _spike_pos_weight(args, train_ds)
        pos_weight = torch.tensor(pw, device=device)
        if 0 < p < 1 and not args.init:   # the spike output starts at the (pos-weighted) base rate
            with torch.no_grad():
                model.towers.b2[model.n_segments] = math.log(p * pw / (1 - p))
        lbtw_l0, wall0, best = None, 0.0, None

    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatchSampler(len(train_ds), args.batch, start, stop, args.seed, rank, world),
        num_workers=args.workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))   # own generator: the global RNG stays resumable

    # -- checkpoints and log ------------------------------------------------------------------------------
    provenance = {"data": str(args.data), "dataset": getattr(train_sims, "provenance", None),
                  "neuron_version": (getattr(train_sims, "provenance", None) or {}).get("neuron_version"),
                  "versions": _versions(), "arch": model.arch, "config_name": args.config, "recipe": args.recipe,
                  "init": init or (state or {}).get("init"),
                  "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                           if not k.startswith("_")}}
    t_start = time.time()

    def save(path: Path, step: int, metrics: dict, with_state: bool) -> None:
        extra = None
        if with_state:
            rng_cpu, rng_cuda = _rng_states(device, world)
            extra = {"train_state": {
                "step": step, "data_position": step, "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "pos_weight": pos_weight.detach().cpu(), "lbtw_l0": None if lbtw_l0 is None else lbtw_l0.cpu(),
                "rng_cpu": rng_cpu, "rng_cuda": rng_cuda, "wall_s": wall0 + time.time() - t_start,
                "init": provenance["init"], "best": best}}
        if main_proc:
            save_checkpoint(path, model, segments=train_ds.segments, synapses=train_ds.synapses,
                            dt_ms=float(getattr(train_sims, "dt_ms", 1.0)),
                            provenance={**provenance, "steps": step}, metrics=metrics, extra=extra)

    if main_proc:                    # only now that data and model are known good: nothing half-written before
        out.parent.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(log_path, start) if main_proc else None
    bar = None
    if main_proc:
        rf = model.receptive_field
        print(f"training {model.arch} ({args.config}{', ' + Path(args.recipe).name if args.recipe else ''}): "
              f"{model.num_parameters():,} parameters, memory {'unbounded (recurrent)' if rf < 0 else f'{rf} ms'}, "
              f"{len(train_ds)} train / {len(val_ds)} val windows of {args.window_ms} ms, device {device}, "
              f"{world} process(es)" + (f", AMP {str(amp_dtype).split('.')[-1]}" if use_amp else "")
              + (f"; resuming at step {start}" if start else ""))
        if not args.no_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=args.steps, initial=start, desc=f"train {model.arch}", unit="step", dynamic_ncols=True)

    # -- the loop -----------------------------------------------------------------------------------------
    amp = {"dtype": amp_dtype, "enabled": use_amp}
    deadline = None if args.time_limit_min is None else t_start + 60.0 * args.time_limit_min
    timed_out, running, metrics, step = False, {}, {}, start
    model.train()
    for batch in loader:
        lr = _lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, tgt, B = _batch_inputs(model, batch, args, device, amp)
        with torch.autocast(device.type, **amp):
            y = net(x, all_tasks=True)
        loss, losses, loss_ro, loss_timing, lbtw_l0 = _total_loss(model, y, tgt, B, args, pos_weight, base_w,
                                                                  lbtw_l0)
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

        # -- bookkeeping: log, validate, save ---------------------------------------------------------------
        S = model.n_segments
        for k, v in (("loss", loss), ("loss_v", losses[:S].mean()), ("loss_soma", losses[0]),
                     ("loss_spike", losses[S]), ("loss_imem", losses[S + 1:].mean() if model.config.imem_tasks
                                                 else None), ("loss_rollout", loss_ro), ("loss_timing", loss_timing)):
            if v is not None:
                running.setdefault(k, []).append(float(v.detach()))
        if deadline is not None:
            timed_out = _any_rank(time.time() > deadline, world, device)
        is_eval = (args.eval_every and step % args.eval_every == 0) or step == args.steps or timed_out
        if main_proc and (step % args.log_every == 0 or is_eval or step == stop):
            row = {"step": step, "lr": lr, "wall_s": round(wall0 + time.time() - t_start, 3),
                   **{k: float(np.mean(v)) for k, v in running.items()}}
            running = {}
            if is_eval:
                metrics = validate(model, val_ds, args.val_windows, device, args.warmup_ms)
                row.update(metrics)
                if args.keep_best and _improves(args.keep_best, metrics[args.keep_best], (best or {}).get("value")):
                    best = {"metric": args.keep_best, "value": metrics[args.keep_best], "step": step,
                            "val_sims": args.val_sims, "val_windows": args.val_windows}
                    save(best_path, step, {**metrics, "steps": step, "best_of": args.keep_best}, with_state=False)
                    row["best"] = True
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            log.write(row)
        if bar is not None:
            bar.update(1)
            post = {"loss": f"{float(loss.detach()):.4f}"}
            if metrics:
                post.update(auc=f"{metrics['val_spike_auc']:.3f}", soma=f"{metrics['val_soma_clip_rmse_mV_cl']:.2f}mV")
            bar.set_postfix(post)
        if step % args.save_every == 0 or step == stop or timed_out:
            save(last, step, metrics, with_state=True)
        if world > 1 and is_eval:
            torch.distributed.barrier()   # the others wait while rank 0 validates
        if timed_out:
            break
    if bar is not None:
        bar.close()

    # -- the final checkpoint ---------------------------------------------------------------------------
    summary = {"steps_done": step, "resumed_from": start, "out": str(out), "last": str(last),
               "log": str(log_path), "metrics": metrics, "best": best}
    if timed_out and main_proc:
        print(f"time limit of {args.time_limit_min} min reached at step {step} of {args.steps}; "
              f"{last} holds the state: the same command resumes")
    if step >= args.steps or timed_out:
        if not metrics and main_proc:   # e.g. resumed exactly at the end: nothing was validated in this run
            metrics = validate(model, val_ds, args.val_windows, device, args.warmup_ms)
        final = {**metrics, "steps": step, "wall_s": wall0 + time.time() - t_start,
                 **({"stopped_by_time_limit": 1.0} if timed_out and step < args.steps else {})}
        save(out, step, final, with_state=False)
        summary["metrics"] = final
        if main_proc:
            print(f"wrote {out} (" + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + ")")
            if best:
                print(f"{best_path}: step {best['step']}, {best['metric']} {best['value']:.4g} (best so far)")
    elif main_proc:
        print(f"stopped at step {step} of {args.steps}; {last} holds the state, run again to resume")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


# A namespace with every option at its default (for scripts): ``train(defaults(data=..., out=..., arch=...))``.
def defaults(**options) -> argparse.Namespace:
    """Settings from the built-in defaults and ``options`` (recipe not applied unless ``recipe=`` is given)."""
    return resolve(SimpleNamespace(**options))
