"""The ``lfdeep-neuron`` command.

Each subcommand lives in the module that implements it; that module exposes
``configure_parser(parser)`` and ``run(args) -> int``. Modules are imported
lazily, so ``lfdeep-neuron --help`` does not import NEURON or torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("lfdeep_neuron.demo", "run the demonstration network"),
    "replay": ("lfdeep_neuron.hay.replay", "simulate the detailed Hay cell on an inputs file"),
    "generate": ("lfdeep_neuron.data.simulate", "generate ground-truth simulations (parallel, resumable)"),
    "train": ("lfdeep_neuron.surrogate.train", "train an MH / MMoE / MMoEEx surrogate"),
    "evaluate": ("lfdeep_neuron.surrogate.evaluate", "score a surrogate on held-out simulations"),
    "rollout": ("lfdeep_neuron.surrogate.rollout", "closed-loop surrogate run on an inputs file"),
    "compare": ("lfdeep_neuron.surrogate.compare", "score one record against another (voltages, spikes)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfdeep-neuron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Parsers are filled in only for the command actually used (lazy imports).
        if len(sys.argv) > 1 and sys.argv[1] == name:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
