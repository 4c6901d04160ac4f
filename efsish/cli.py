"""The `efsish` command line: argument parsing and one-line error reporting.

Each subcommand parses its options here and calls into the library; errors that a user
can fix (EfsishError) are printed as one line on stderr with a non-zero exit, never as a
traceback. This module must not hold filesystem logic.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from efsish import __version__
from efsish.errors import EfsishError
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


def store_options(args: argparse.Namespace) -> StoreOptions:
    return StoreOptions(
        endpoint=args.endpoint,
        region=args.region,
        path_style=not args.no_path_style,
        verify_tls=not args.no_verify_tls,
    )


async def _check(args: argparse.Namespace) -> int:
    async with open_store(args.store, store_options(args)) as store:
        await store.check()
    print(f"{args.store}: reachable, writable, conditional writes supported")
    return 0


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
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], Awaitable[int]] = args.func
    try:
        result = trio.run(func, args)
    except EfsishError as e:
        print(f"efsish: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return result
