"""User-facing errors.

Every mistake a user can make (bad input, a bad file, an option that does not apply) raises a subclass of
:class:`OtfuseError` whose message is one line saying what is wrong and what to do. The command line
prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OtfuseError(Exception):
    """Base class of errors caused by the user's input, reported in one line."""


class UnsupportedOpError(OtfuseError):
    """The traced graph holds an operation whose effect on neuron spaces is not known."""


class ArchitectureMismatchError(OtfuseError):
    """The models to fuse do not share one architecture family."""


class TransportError(OtfuseError):
    """An optimal-transport problem could not be solved as asked (e.g. did not converge)."""


class DataError(OtfuseError):
    """A dataset file is missing, truncated or corrupt, or data needed by an option is absent."""


class CheckpointError(OtfuseError):
    """A checkpoint file cannot be read safely or does not fit the architecture."""
