"""The ``lfdeep-neuron`` command: make data, train, score and run deep surrogates of the Hay L5PC.

Each subcommand lives in the module that implements it; that module exposes
``configure_parser(parser)`` and ``run(args) -> int``. Modules are imported
lazily, so ``lfdeep-neuron --help`` does not import NEURON or torch.

Bad input (:class:`~lfdeep_neuron.errors.InputError` and its subclasses, a
missing file) ends every command the same way: one line on stderr naming the
file and the problem, exit status 2, no traceback. ``--debug`` (before or
after the command name) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from lfdeep_neuron.errors import InputError

#: What ``lfdeep-neuron -h`` says the tool is (the subcommands are listed below it by argparse).
DESCRIPTION = (
    "lfdeep-neuron: deep-learning surrogates of the Hay layer-5 pyramidal cell (L5PC). A surrogate predicts "
    "the voltages of all 642 segments and the somatic spikes of the detailed NEURON model, one 1-ms step at a "
    "time, from the same synaptic inputs, and runs inside NEURON and NetPyNE networks in its place. The "
    "commands cover the whole path: simulate the detailed cell (replay, generate), train a surrogate and fit "
    "its action potential (train, waveform), score it against NEURON (evaluate, rollout, compare) and run a "
    "network of surrogates (demo). 'lfdeep-neuron COMMAND -h' lists a command's options; checkpoint options "
    "(--model, --init) also take a pointer file such as models/DEFAULT.")

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("lfdeep_neuron.demo", "run the demonstration network"),
    "replay": ("lfdeep_neuron.hay.replay", "simulate the detailed Hay cell on an inputs file"),
    "generate": ("lfdeep_neuron.data.simulate", "generate ground-truth simulations (parallel, resumable)"),
    "train": ("lfdeep_neuron.surrogate.train", "train an MH / MMoE / MMoEEx surrogate"),
    "evaluate": ("lfdeep_neuron.surrogate.evaluate", "score a surrogate on held-out simulations"),
    "rollout": ("lfdeep_neuron.surrogate.rollout", "closed-loop surrogate run on an inputs file"),
    "compare": ("lfdeep_neuron.surrogate.compare", "score one record against another (voltages, spikes)"),
    "waveform": ("lfdeep_neuron.surrogate.waveform", "fit the spike waveform (APs in the voltages) into a checkpoint"),
}

#: Exit status of a command stopped by bad input.
EXIT_BAD_INPUT = 2

#: Failures that mean "the input is wrong", reported as one line. OSError subclasses that name a
#: path (a missing file, a folder given for a file, a file that cannot be read) belong here too.
BAD_INPUT = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help of every subcommand: each option's default after its help text, descriptions as written.

    ``(default: X)`` is added unless the help already says what the default is (it contains "default" or
    "required"), the option is a switch (``store_true``: off unless given) or has no default (None: the
    help must then say what no value means).
    """

    def __init__(self, prog, indent_increment=2, max_help_position=30, width=None):
        import shutil

        width = width or min(shutil.get_terminal_size().columns, 112) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        text = action.help or ""
        said = any(word in text for word in ("default", "required", "%(default)"))
        if (said or not action.option_strings or action.nargs == 0 or action.required
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line too (``-h`` still prints the usage)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is one), if any."""
    return next((a for a in argv if a in SUBCOMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its options (lazy imports)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _command_in(argv)
    parser = _Parser(prog="lfdeep-neuron", description=textwrap.fill(DESCRIPTION, 100),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        # SUPPRESS: a --debug given before the command is not reset by the subparser's default
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error instead of one line")
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its lines joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # No command opens NEURON's GUI: without this NEURON greets every run without $DISPLAY with two
    # warning lines on stderr (before its first import; a no-op when NEURON is already loaded).
    os.environ.setdefault("NEURON_MODULE_OPTIONS", "-nogui")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        module = importlib.import_module(args._module)
        code = int(module.run(args) or 0)
    except BAD_INPUT as exc:
        if args.debug:
            raise
        print(f"lfdeep-neuron {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    if code != 0:       # under mpiexec: let mpiexec stop the other ranks instead of waiting for them
        from lfdeep_neuron.parallel import mark_failed_exit

        mark_failed_exit()
    return code


if __name__ == "__main__":
    sys.exit(main())
