"""The mount options: the one table of `-o` options that `efsish mount -o`, the CLI and
mount(8)'s helper mount/mount.efsish share, `MountConfig` (what a mount is asked to do), and
the parsing of options and sizes into it.

What it must not do: touch the object store, FUSE or the filesystem. It only checks values
(an access point id's form, a nudge address's form) and loads the keys `-o key_file=` or
`-o key_command=` name, so that a bad option is one line from the parent before the fork.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from efsish.errors import UsageError
from efsish.meta import accesspoints, nudge
from efsish.store import StoreOptions
from efsish.store.crypt import load_keyring

# Log lines name their logger: parsing options is part of `efsish mount`.
log = logging.getLogger("efsish.mount")

#: Every `-o` option efsish knows: name -> (its value, what a valid value is); a flag has
#: no value. apply_mount_options, its errors, and mount(8)'s helper mount/mount.efsish
#: (which passes every option on to `efsish mount -o`) all go by this one table.
MOUNT_OPTIONS: dict[str, tuple[str, str]] = {
    "cache_dir": ("DIR", "a directory"),
    "cache_size": ("SIZE", "a size of 0 or more, e.g. 10G"),
    "poll_interval": ("SECONDS", "a number of seconds above 0, e.g. 1.0"),
    "attr_timeout": ("SECONDS", "a number of seconds, 0 or more, e.g. 1.0"),
    "endpoint": ("URL", "an S3 endpoint URL"),
    "allow_other": ("", ""),
    "noallow_other": ("", ""),
    "ro": ("", ""),
    "log": ("FILE", "a file name"),
    "prometheus_port": ("PORT", "a TCP port from 1 to 65535"),
    "foreground": ("", ""),
    "readahead": ("SIZE", "a size from 0 to 1G, e.g. 1M"),
    "noatime": ("", ""),
    "debug": ("", ""),
    "nudge": ("auto|off|HOST:PORT", "auto, off, or the HOST:PORT other mounts nudge this one at"),
    "commit_interval": ("SECONDS", "a number of seconds above 0, e.g. 1.0"),
    "busy_poll": ("MICROSECONDS", "a whole number of microseconds from 0 (off) to 1000"),
    "sync": ("", ""),
    "key_file": ("FILE", "a key file of mode 0600 (efsish keygen FILE)"),
    "key_command": ("CMD", "a command, without commas, that prints the keys"),
    "access_point": ("ID", "an access point id, fsap-<17 hex digits> (efsish access-point list)"),
}
KNOWN_OPTIONS = frozenset(MOUNT_OPTIONS)
# Options from fstab/mount(8) that mean nothing to the daemon itself.
IGNORED_OPTIONS = {
    "_netdev",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "user",
    "users",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "nouser",
    "relatime",
    "async",
}


@dataclass
class MountConfig:
    store_url: str
    mountpoint: str
    store_options: StoreOptions
    cache_dir: Path
    foreground: bool = False
    allow_other: bool = True
    ro: bool = False
    poll_interval: float = 1.0
    cache_bytes: int = 10 * 1024**3
    attr_timeout: float = 1.0
    log_file: Path | None = None
    prometheus_port: int | None = None
    readahead: int = 1024 * 1024  # the kernel's readahead for this mount (its BDI)
    atime: bool = True  # relatime; noatime turns access-time updates off
    log_level: int = logging.INFO  # the daemon's log; -o debug or `efsish -v mount` lower it
    nudge: str = "auto"  # -o nudge= (efsish.meta.nudge): used with leases
    commit_interval: float = 1.0  # lease mode: how late a journaled change reaches the log
    sync: bool = False  # lease mode: take no leases (commit every change on its own)
    busy_poll_us: int = 50  # how long the FUSE loop polls for a request after a reply
    access_point: str | None = None  # -o access_point=ID (efsish.access)
    extra: dict[str, str] = field(default_factory=dict)


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units and t[-1] != "" else (t, "")
    try:
        n = float(num) * units[unit]
        if not math.isfinite(n) or n < 0:
            raise ValueError
        return int(n)
    except (ValueError, KeyError):
        raise UsageError(f"invalid size {text!r} (use e.g. 512M, 10G)") from None


def _seconds(value: str, *, zero_ok: bool) -> float:
    """A finite, non-negative number of seconds (above 0 unless zero_ok)."""
    x = float(value)
    if not math.isfinite(x) or x < 0 or (x == 0 and not zero_ok):
        raise ValueError(value)
    return x


def apply_mount_options(cfg: MountConfig, opts: list[str], *, sloppy: bool = False) -> None:
    """Apply `-o a,b=c` options (MOUNT_OPTIONS); an unknown one is an error that names it
    unless `sloppy` (mount -s), and so is a bad value, a missing one, or a value given to
    a flag."""
    for chunk in opts:
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key in IGNORED_OPTIONS:
                continue
            if key not in MOUNT_OPTIONS:
                if sloppy:
                    log.info("ignoring unknown mount option %r (sloppy)", item)
                    continue
                raise UsageError(
                    f"unknown mount option {key!r}; known: {', '.join(MOUNT_OPTIONS)}, and "
                    "the generic _netdev/defaults/auto/noauto/nofail"
                )
            metavar, valid = MOUNT_OPTIONS[key]
            if metavar and not value:
                raise UsageError(f"mount option {key} needs a value: {key}={metavar}")
            if not metavar and eq:
                raise UsageError(f"mount option {key} takes no value: give {key}, not {item}")
            try:
                _apply_one(cfg, key, value)
            except (ValueError, UsageError):
                raise UsageError(
                    f"invalid value for mount option {key}: {value!r} (give {valid})"
                ) from None


def _apply_one(cfg: MountConfig, key: str, value: str) -> None:
    """Set one known option (ValueError or UsageError if its value is bad)."""
    if key == "cache_dir":
        cfg.cache_dir = Path(value)
    elif key == "cache_size":
        cfg.cache_bytes = parse_size(value)
    elif key == "poll_interval":
        cfg.poll_interval = _seconds(value, zero_ok=False)
    elif key == "attr_timeout":
        cfg.attr_timeout = _seconds(value, zero_ok=True)
    elif key == "endpoint":
        cfg.store_options = StoreOptions(**{**cfg.store_options.__dict__, "endpoint": value})
    elif key == "allow_other":
        cfg.allow_other = True
    elif key == "noallow_other":
        cfg.allow_other = False
    elif key == "ro":
        cfg.ro = True
    elif key == "log":
        cfg.log_file = Path(value)
    elif key == "prometheus_port":
        cfg.prometheus_port = int(value)
        if not 0 < cfg.prometheus_port < 65536:
            raise ValueError(value)
    elif key == "foreground":
        cfg.foreground = True
    elif key == "readahead":
        cfg.readahead = parse_size(value)
        if not 0 <= cfg.readahead <= 1024**3:
            raise ValueError(value)
    elif key == "noatime":
        cfg.atime = False
    elif key == "debug":
        cfg.log_level = logging.DEBUG
    elif key == "nudge":
        nudge.parse_option(value)  # ValueError if malformed
        cfg.nudge = value
    elif key == "commit_interval":
        cfg.commit_interval = _seconds(value, zero_ok=False)
    elif key == "sync":
        cfg.sync = True
    elif key == "busy_poll":
        cfg.busy_poll_us = int(value)
        if not 0 <= cfg.busy_poll_us <= 1000:
            raise ValueError(value)
    elif key == "access_point":
        accesspoints.key_of(value)  # UsageError if it is not an id
        cfg.access_point = value
    elif key in ("key_file", "key_command"):
        # Loaded now, before the fork: errors are one line from the parent.
        keyring = load_keyring(value, None) if key == "key_file" else load_keyring(None, value)
        cfg.store_options = StoreOptions(**{**cfg.store_options.__dict__, "keyring": keyring})
    else:  # pragma: no cover - MOUNT_OPTIONS and this function list the same names
        raise AssertionError(key)
