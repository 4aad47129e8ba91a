"""User-facing errors: the CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class MixqError(Exception):
    """Bad input or an unmet precondition the user can fix (exit code 2, one-line message)."""

    exit_code = 2


class CacheLockedError(MixqError):
    """Another process holds the cache lock and the caller asked not to wait."""


class CorruptCacheError(MixqError):
    """A cache shard is missing or does not match its recorded sha256."""


# --------------------------------------------------------------------------- config checks the library shares
SEED_MAX = 2**63 - 1  # torch.manual_seed's range


def check_int(opt: str, v: object, lo: int | None = None, hi: int | None = None) -> None:
    """`v` is an int (not a bool, not 1.5) within [lo, hi]: a config built in Python gets the CLI's one line,
    not a TypeError deep in training."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise MixqError(f"{opt} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise MixqError(f"{opt} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise MixqError(f"{opt} must be at most {hi}, got {v}")


def refuse_unused(cfg: object, fields: tuple[str, ...], why: str, flags: dict[str, str] | None = None) -> None:
    """Fields of a dataclass config that differ from their defaults although `why` says they are not read:
    refused, not silently recorded (the CLI passes only what is on its command line, so its defaults pass)."""
    from dataclasses import fields as dc_fields

    defaults = {f.name: f.default for f in dc_fields(cfg)}  # type: ignore[arg-type]
    flags = flags or {}
    given = [flags.get(n, f"--{n.replace('_', '-')}") for n in fields if getattr(cfg, n) != defaults[n]]
    if given:
        raise MixqError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not read {why}: drop "
                        f"{'it' if len(given) == 1 else 'them'}")
