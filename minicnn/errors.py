"""The exception every user-facing error of minicnn derives from.

Command-line front ends catch :class:`MinicnnError` and print its message as
one line, without a traceback.
"""


class MinicnnError(Exception):
    """An error caused by the user's input or environment, with a clear message."""


class ReplicaError(MinicnnError, RuntimeError):
    """A replica's process (minicnn.fast.replicas) died (killed, out of memory) or its
    step failed."""
