"""Errors that fgtrac reports to users as one clear line (the CLI exits 2 on any of them)."""

from __future__ import annotations


class FgtracError(Exception):
    """Base class: a problem with the user's input or run, reported without a traceback."""


class RunNotFoundError(FgtracError):
    """The run directory, or its database, does not exist."""


class RunExistsError(FgtracError):
    """`Run.create` was pointed at a directory that already holds a run."""


class CorruptRunError(FgtracError):
    """The run database cannot be read (corrupt, truncated, or not a DuckDB file)."""


class SchemaVersionError(FgtracError):
    """The run database was written with a schema version this fgtrac does not read."""


class RunLockedError(FgtracError):
    """Another process holds the live run database open for writing."""


class UnknownSampleError(FgtracError):
    """A sample id that was never registered in the run."""


class RecorderStateError(FgtracError):
    """A recorder call made in the wrong order (e.g. `log_batch` outside a stage)."""


class TamperedRunError(CorruptRunError):
    """The run database holds objects or a schema fgtrac never creates (a view, macro, changed column...), or
    differs from its ledger where fgtrac is about to write."""


class RunFileError(CorruptRunError):
    """A file the run references (a checkpoint) is refused: outside the run, a link, not a regular file, or not the
    size and SHA-256 its ledger entry committed (`fgtrac_core.store.run_files`)."""


class SigningKeyError(FgtracError):
    """The signing key is missing where a run needs it, or refused: a key file others may access, a key directory
    others may write, an empty or corrupt key file (`fgtrac_core.ledger.KeyFileError`, mapped for the CLI)."""


class UnsupportedDerivativeError(FgtracError):
    """A method needs a derivative (second order, or forward mode) that torch does not implement for some operation
    of the model, e.g. ``nn.EmbeddingBag``'s double backward (`fgtrac_core.derivatives`)."""
