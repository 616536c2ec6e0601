"""The two kinds of error a user can cause, which the CLI reports in one line instead of a traceback.

Each module's own error class (SpecError, CacheError, StorageError, ...) takes one of them as a second base, so
that the CLI tells them apart without importing the modules that define them (checkpoint.py alone loads torch
and open_clip)."""


class BadInput(Exception):
    """The input is wrong (a config value, a spec, a shard, a cache, a model file): fix it and rerun (exit 2)."""


class Unavailable(Exception):
    """The place a stage reads from or writes to failed (storage, the tracking server): rerun when it is back
    (exit 1)."""
