"""Errors that mean "the user's input is wrong" (as opposed to a bug).

Every module that rejects a file, an argument or a network description raises
:class:`InputError` (or a subclass) with a one-line message that names the
offending file or value and the problem. The ``lfdeep-neuron`` command turns
these into that one line on stderr and exit status 2 (a traceback only with
``--debug``).
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a wrong path, a malformed file, an impossible argument."""
