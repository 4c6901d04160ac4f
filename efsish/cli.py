"""The `efsish` command line: argument parsing and one-line error reporting.

Each subcommand parses its options here and calls into the library; errors that a user
can fix (EfsishError) are printed as one line on stderr with a non-zero exit, never as a
traceback. This module must not hold filesystem logic.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from efsish import __version__
from efsish.errors import EfsishError, UsageError
from efsish.store import StoreOptions, open_store

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_ERROR = 1


def add_store_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that opens a STORE."""
    p.add_argument("store", metavar="STORE", help="s3://BUCKET[/PREFIX] or file:///ABS/PATH")
    p.add_argument("--endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="S3 region (default: from the AWS config, else us-east-1)")
    p.add_argument(
        "--no-path-style",
        action="store_true",
        help="use virtual-host addressing instead of path-style",
    )
    p.add_argument(
        "--no-verify-tls",
        action="store_true",
        help="do not verify the endpoint's TLS certificate (insecure)",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="keys of an encrypted filesystem, base64, one per line, the first for new "
        "objects (default: $EFSISH_KEY)",
    )
    p.add_argument("--key-command", metavar="CMD", help="a command that prints the keys")


def store_options(args: argparse.Namespace) -> StoreOptions:
    from efsish.store.crypt import load_keyring

    return StoreOptions(
        endpoint=args.endpoint,
        region=args.region,
        path_style=not args.no_path_style,
        verify_tls=not args.no_verify_tls,
        keyring=load_keyring(args.key_file, args.key_command),
    )


async def _check(args: argparse.Namespace) -> int:
    from efsish.meta.superblock import NotFormatted, load_superblock

    async with open_store(args.store, store_options(args)) as store:
        await store.check()
        with contextlib.suppress(NotFormatted):
            await load_superblock(store)  # an encrypted filesystem: are these its keys?
    print(f"{args.store}: reachable, writable, conditional writes supported")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from efsish.store.crypt import new_key_line, read_key_file

    line = new_key_line()
    if args.rotate:
        old = read_key_file(args.file)  # refuses a file others may read
        text = "\n".join([line, *(base64.b64encode(k).decode() for k in old.keys)]) + "\n"
        tmp = f"{args.file}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.file)
        print(f"{args.file}: a new first key; the old ones stay for reading")
        return 0
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.file} exists; to add a key to it give --rotate") from None
    except OSError as e:
        raise UsageError(f"cannot create {args.file}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    print(f"{args.file}: a new key; keep a copy elsewhere: without it the data is lost")
    return 0


async def _rekey(args: argparse.Namespace) -> int:
    from efsish.meta.superblock import load_superblock
    from efsish.store.crypt import CryptStore, rekey

    async with open_store(args.store, store_options(args)) as store:
        await load_superblock(store)  # checks the keys
        if not isinstance(store, CryptStore):
            raise UsageError(f"{args.store} is not encrypted")
        done, total = await rekey(store)
    print(f"{args.store}: {done} of {total} objects re-encrypted with the first key")
    return 0


async def _format(args: argparse.Namespace) -> int:
    from efsish.meta.superblock import check_formattable, format_fs
    from efsish.options import parse_size
    from efsish.store.crypt import superblock_info

    if args.throughput_mode == "provisioned" and not args.provisioned_mibps:
        raise UsageError("--throughput-mode provisioned needs --provisioned-mibps N")
    if args.provisioned_mibps is not None and args.provisioned_mibps <= 0:
        raise UsageError("--provisioned-mibps must be positive")
    if args.lease_depth < 1:
        raise UsageError("--lease-depth must be 1 or more")
    if args.lease_depth != 1 and not args.leases:
        raise UsageError("--lease-depth has no effect with --no-leases: drop one of them")
    opts = store_options(args)
    if args.encrypt and opts.keyring is None:
        raise UsageError(
            "--encrypt needs a key: --key-file FILE (make one with `efsish keygen FILE`), "
            "--key-command CMD or $EFSISH_KEY"
        )
    if opts.keyring is not None and not args.encrypt:
        raise UsageError(f"a key was given ({opts.keyring.source}) but not --encrypt")
    async with open_store(args.store, opts, create=True) as store:
        await check_formattable(store)  # before check() writes anything there
        await store.check()
        sb = await format_fs(
            store,
            block_size=parse_size(args.block_size),
            throughput_mode=args.throughput_mode,
            provisioned_mibps=float(args.provisioned_mibps or 0),
            leases=args.leases,
            lease_depth=args.lease_depth,
            encryption=superblock_info(opts.keyring) if opts.keyring else None,
        )
    mode = f", leases (depth {sb.lease_depth})" if sb.leases else ", no leases (format 2)"
    mode += ", encrypted" if sb.encryption else ""
    print(f"formatted {args.store}: filesystem {sb.fs_uuid}, block size {sb.block_size}{mode}")
    return 0


def _mount(args: argparse.Namespace) -> int:
    from efsish.mount import default_cache_dir, mount
    from efsish.options import MountConfig, apply_mount_options

    cfg = MountConfig(
        store_url=args.store,
        mountpoint=args.mountpoint,
        store_options=store_options(args),
        cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        foreground=args.foreground,
    )
    if args.verbose:
        cfg.log_level = logging.DEBUG  # `efsish -v mount`: the daemon logs at debug level too
    apply_mount_options(cfg, args.o or [], sloppy=args.sloppy)
    return mount(cfg)


def _umount(args: argparse.Namespace) -> int:
    from efsish.mount import umount

    return umount(args.mountpoint)


async def _fsck(args: argparse.Namespace) -> int:
    from efsish.fsck import run_fsck

    async with open_store(args.store, store_options(args)) as store:
        return await run_fsck(store, verify_data=args.verify_data, progress=not args.quiet)


async def _gc(args: argparse.Namespace) -> int:
    from efsish.gc import parse_duration, run_gc

    gone_after = parse_duration(args.gone_after)
    async with open_store(args.store, store_options(args)) as store:
        return await run_gc(
            store,
            dry_run=args.dry_run,
            grace=args.grace,
            progress=not args.quiet,
            gone_after=gone_after,
        )


async def _status(args: argparse.Namespace) -> int:
    from efsish.gc import run_status

    async with open_store(args.store, store_options(args)) as store:
        return await run_status(store)


def _id_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of gids: {text!r} (e.g. 10,20)") from None


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    try:
        return int(uid), int(gid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not UID:GID: {text!r} (e.g. 1001:1001)") from None


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0700)") from None


async def _access_point(args: argparse.Namespace) -> int:
    from efsish.meta import accesspoints as aps
    from efsish.meta.superblock import load_superblock

    async with open_store(args.store, store_options(args)) as store:
        await load_superblock(store)  # a filesystem, and the keys of an encrypted one
        if args.ap_command == "create":
            if (args.create_mode is None) != (args.create_owner is None):
                raise UsageError("give --create-mode and --create-owner together, or neither")
            creation = None
            if args.create_owner is not None:
                owner_uid, owner_gid = args.create_owner
                creation = aps.CreationInfo(owner_uid, owner_gid, args.create_mode)
            ap = aps.make(args.root, args.uid, args.gid, args.secondary_gids, creation, args.name)
            await aps.create(store, ap)
            print(ap.id)
        elif args.ap_command == "list":
            for ap in await aps.list_all(store):
                print(ap.describe())
        else:
            await aps.delete(store, args.id)
            print(f"deleted {args.id} (mounts made with it keep it until they unmount)")
    return 0


async def _upgrade(args: argparse.Namespace) -> int:
    from efsish.upgrade import upgrade_fs

    if args.lease_depth < 1:
        raise UsageError("--lease-depth must be 1 or more")
    async with open_store(args.store, store_options(args)) as store:
        await upgrade_fs(store, force=args.force, lease_depth=args.lease_depth)
    return 0


async def _config(args: argparse.Namespace) -> int:
    from efsish.meta.superblock import load_superblock
    from efsish.metering import write_config

    if (
        args.throughput_mode is None
        and args.provisioned_mibps is None
        and (args.initial_balance is None)
    ):
        raise UsageError("nothing to change: give --throughput-mode and/or --provisioned-mibps")
    if args.throughput_mode == "provisioned" and not args.provisioned_mibps:
        raise UsageError("--throughput-mode provisioned needs --provisioned-mibps N")
    async with open_store(args.store, store_options(args)) as store:
        sb = await load_superblock(store)
        try:
            new = await write_config(
                store,
                sb,
                mode=args.throughput_mode,
                provisioned_mibps=args.provisioned_mibps,
                initial_balance=args.initial_balance,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
    print(
        f"throughput: {new['mode']}"
        + (
            f", provisioned {new.get('provisioned_mibps')} MiB/s"
            if new["mode"] == "provisioned"
            else ""
        )
        + " (live mounts apply it within seconds)"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json
    import time

    from efsish.mount import stats_file

    path = stats_file(os.path.abspath(args.mountpoint))
    while True:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            raise EfsishError(
                f"no statistics for {args.mountpoint}: is it an efsish mount made on this machine?"
            ) from None
        if args.json:
            print(json.dumps(doc, indent=None if args.watch else 2), flush=True)
        else:
            print(format_stats(doc), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def format_stats(doc: dict[str, object]) -> str:
    m = doc["metrics"]
    assert isinstance(m, dict)
    mib = 1024 * 1024
    rows = [
        ("ThroughputMode", str(doc.get("mode"))),
        ("PermittedThroughput", f"{m['PermittedThroughput'] / mib:,.2f} MiB/s"),
        ("BurstCreditBalance", f"{m['BurstCreditBalance'] / 1024**3:,.2f} GiB"),
        ("PercentIOLimit", f"{m['PercentIOLimit']:.1f} %"),
        ("MeteredIOBytes", f"{m['MeteredIOBytes']:,.0f}"),
        ("TotalIOBytes", f"{m['TotalIOBytes']:,.0f}"),
        ("DataReadIOBytes", f"{m['DataReadIOBytes']:,.0f}"),
        ("DataWriteIOBytes", f"{m['DataWriteIOBytes']:,.0f}"),
        ("MetadataIOBytes", f"{m['MetadataIOBytes']:,.0f}"),
        ("ClientConnections", f"{m['ClientConnections']:.0f}"),
        ("StorageBytes", f"{m['StorageBytes']:,.0f}"),
    ]
    return "\n".join(f"{k:<20} {v}" for k, v in rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="efsish",
        description="A shared, EFS-like network filesystem on any S3-compatible store.",
    )
    ap.add_argument("--version", action="version", version=f"efsish {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="check that a store is reachable and usable")
    add_store_options(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("format", help="create a new filesystem in an empty store")
    add_store_options(p)
    p.add_argument("--block-size", default="4M", help="maximum data block size (default 4M)")
    p.add_argument(
        "--throughput-mode", choices=["bursting", "provisioned", "elastic"], default="bursting"
    )
    p.add_argument(
        "--provisioned-mibps",
        type=float,
        default=None,
        help="throughput for --throughput-mode provisioned, in MiB/s",
    )
    p.add_argument(
        "--no-leases",
        dest="leases",
        action="store_false",
        help="format 2: every change is committed on its own (the default, format 3, "
        "lets mounts take leases on subtrees and commit changes there in batches, "
        "docs/design/LEASES.md; efsish before leases cannot mount it)",
    )
    p.add_argument(
        "--leases",
        dest="leases",
        action="store_true",
        help="format 3, the default (accepted for scripts that say so)",
    )
    p.add_argument(
        "--lease-depth",
        type=int,
        default=1,
        help="the depth of the leased subtrees' roots (default 1: /home/USER when "
        "mounted on /home)",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every object but the superblock with the key of --key-file, "
        "--key-command or $EFSISH_KEY (format 4)",
    )
    p.set_defaults(func=_format, leases=True)

    p = sub.add_parser("mount", help="mount a filesystem")
    add_store_options(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--cache-dir", help="local cache (default /var/cache/efsish as root)")
    p.add_argument("--foreground", "-f", action="store_true", help="do not daemonise")
    p.add_argument(
        "-o", action="append", metavar="OPTIONS", help="comma-separated mount options (see README)"
    )
    p.add_argument(
        "--sloppy", "-s", action="store_true", help="ignore unknown -o options (as mount -s)"
    )
    p.set_defaults(func=_mount, sync=True)

    p = sub.add_parser("umount", help="flush everything, then unmount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=_umount, sync=True)

    p = sub.add_parser("fsck", help="check every metadata invariant and every block")
    add_store_options(p)
    p.add_argument(
        "--verify-data",
        action="store_true",
        help="also download every block and verify its checksum",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_fsck)

    p = sub.add_parser("gc", help="delete unreferenced blocks and trim the log")
    add_store_options(p)
    p.add_argument("--dry-run", "-n", action="store_true", help="only report what would go")
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="keep garbage younger than this many seconds (default 3600)",
    )
    p.add_argument(
        "--gone-after",
        default="1d",
        metavar="DURATION",
        help="on a lease filesystem, take over the leases and clear the journal mark of a "
        "mount whose newest heartbeat is older than this (seconds, or e.g. 12h, 1d; "
        "default 1d)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_gc)

    p = sub.add_parser("config", help="change the throughput mode of a filesystem")
    add_store_options(p)
    p.add_argument("--throughput-mode", choices=["bursting", "provisioned", "elastic"])
    p.add_argument("--provisioned-mibps", type=float)
    p.add_argument("--initial-balance", type=float, help=argparse.SUPPRESS)  # tests only
    p.set_defaults(func=_config)

    p = sub.add_parser("stats", help="EFS metrics of a mount (BurstCreditBalance, ...)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="print again every --interval s")
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=_stats, sync=True)

    p = sub.add_parser(
        "upgrade", help="make a format-2 filesystem a lease one (format 3), in place"
    )
    add_store_options(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="upgrade even while mounts of an efsish that does not know format 3 run "
        "(they stop writing)",
    )
    p.add_argument(
        "--lease-depth", type=int, default=1, help="the depth of the leased subtrees' roots"
    )
    p.set_defaults(func=_upgrade)

    p = sub.add_parser("status", help="show the log, checkpoints and live mounts")
    add_store_options(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("access-point", help="create, list or delete EFS-style access points")
    ap_sub = p.add_subparsers(dest="ap_command", metavar="ACTION")
    ap_sub.required = True
    q = ap_sub.add_parser("create", help="a root directory and the identity of every request")
    add_store_options(q)
    q.add_argument("--root", required=True, help="the directory mounts see as their root")
    q.add_argument("--uid", type=int, required=True, help="the uid of every request")
    q.add_argument("--gid", type=int, required=True, help="the gid of every request")
    q.add_argument("--secondary-gids", type=_id_list, default=(), metavar="GID,...")
    q.add_argument("--create-mode", type=_mode, metavar="MODE", help="e.g. 0700")
    q.add_argument("--create-owner", type=_owner, metavar="UID:GID")
    q.add_argument("--name", default="", help="a label shown by list")
    q.set_defaults(func=_access_point)
    q = ap_sub.add_parser("list", help="every access point of the filesystem")
    add_store_options(q)
    q.set_defaults(func=_access_point)
    q = ap_sub.add_parser("delete", help="delete an access point")
    add_store_options(q)
    q.add_argument("id", metavar="ID")
    q.set_defaults(func=_access_point)

    p = sub.add_parser("keygen", help="write a new encryption key to a new file (mode 0600)")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--rotate", action="store_true", help="add the new key first to an existing key file"
    )
    p.set_defaults(func=_keygen, sync=True)

    p = sub.add_parser("rekey", help="re-encrypt every object with the key file's first key")
    add_store_options(p)
    p.set_defaults(func=_rekey)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    # Everything efsish creates (cache, metadata view, file:// store, logs) holds other
    # users' names and data: keep it private to the owner.
    os.umask(0o077)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if getattr(args, "sync", False):
            result: int = args.func(args)
        else:
            func: Callable[[argparse.Namespace], Awaitable[int]] = args.func
            result = trio.run(func, args)
    except UsageError as e:
        print(f"efsish: {e}", file=sys.stderr)
        return EXIT_USAGE
    except EfsishError as e:
        print(f"efsish: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return result
