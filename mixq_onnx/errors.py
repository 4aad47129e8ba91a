"""User-facing errors: the CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class MixqError(Exception):
    """Bad input or an unmet precondition the user can fix (exit code 2, one-line message)."""

    exit_code = 2


class CacheLockedError(MixqError):
    """Another process holds the cache lock and the caller asked not to wait."""


class CorruptCacheError(MixqError):
    """A cache shard is missing or does not match its recorded sha256."""
