"""The EFS throughput model: burst credits, permitted rate and metering.

What this module is for
    It implements the throughput model of Amazon EFS as described in
    docs/THROUGHPUT.md ("The model as implemented"): the bursting baseline, burst rate and
    credit cap as closed-form functions of the stored size; the provisioned and elastic
    modes; the metering rules (4 KiB minimum per operation, discounted reads); and a
    :class:`CreditLedger` that carries the filesystem's credit balance exactly and can be
    serialised so that every mount of a filesystem shares one balance. The trio pacer
    that paces requests by this model is efsish/pacer.py.

What it must not do
    It must not import pyfuse3 or trio, and it must not touch the network or the object
    store: persisting the ledger in the bucket is the caller's job (via
    :meth:`CreditLedger.to_dict`). It reads no clock: the ledger takes the ``now`` its
    callers pass, so tests simulate days in seconds.

Units: bytes and bytes per second (floats), seconds for time. Sizes use binary units
(1 TiB = 1024 GiB), as the reference does ("50 MiB/s per TiB = 50 KiB/s per GiB"); the
documented examples that do not match exactly are rounded by EFS with 1000 in place of
1024 (see the tests).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Final, Literal

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB

#: Every request is metered as at least this many bytes (reads too, after the discount).
MIN_OP_BYTES: Final = 4 * KiB

#: Bursting-mode figures from the reference.
BASELINE_BPS_PER_TIB: Final = 50 * MiB
MIN_BASELINE_BPS: Final = 1 * MiB
BURST_BPS_PER_TIB: Final = 100 * MiB
MIN_BURST_BPS: Final = 100 * MiB
CREDIT_CAP_PER_TIB: Final = 2.1 * TiB
MIN_CREDIT_CAP: Final = 2.1 * TiB

#: The metric names of :meth:`Throttle.snapshot`, exactly as EFS (CloudWatch AWS/EFS) names them.
METRIC_NAMES: Final = (
    "MeteredIOBytes",
    "TotalIOBytes",
    "DataReadIOBytes",
    "DataWriteIOBytes",
    "MetadataIOBytes",
    "PermittedThroughput",
    "BurstCreditBalance",
    "PercentIOLimit",
)

#: Window over which PercentIOLimit is measured (CloudWatch's 1-minute resolution).
IOPS_WINDOW_SECONDS: Final = 60


class ThroughputMode(enum.StrEnum):
    """EFS throughput mode, chosen per filesystem."""

    BURSTING = "bursting"
    PROVISIONED = "provisioned"
    ELASTIC = "elastic"


class OpKind(enum.StrEnum):
    """What a request is, for metering: reads are discounted, the others are not."""

    READ = "read"
    WRITE = "write"
    METADATA = "metadata"


OpKindLike = OpKind | Literal["read", "write", "metadata"]


@dataclass(frozen=True)
class ThrottleConfig:
    """A filesystem's throughput settings (set at format time, changeable live).

    ``provisioned_bps`` is only used (and required to be positive) in provisioned mode.
    ``elastic_read_bps`` / ``elastic_write_bps`` are raw-byte ceilings used in elastic
    mode. ``initial_balance`` overrides the starting credit balance of a *new* ledger
    (None means a full balance, as for a new EFS filesystem); it is meant for tests and
    benchmarks.
    """

    mode: ThroughputMode = ThroughputMode.BURSTING
    provisioned_bps: float = 0.0
    read_discount: float = 1 / 3
    # EFS holds one client to 500 MiB/s, or 1,500 MiB/s with current clients (efs-utils
    # 2 / efs-proxy); efsish is a current client.
    per_client_ceiling_bps: float = 1500 * MiB
    read_iops: float = 35_000
    write_iops: float = 7_000
    elastic_read_bps: float = 3 * GiB
    elastic_write_bps: float = 1 * GiB
    initial_balance: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ThroughputMode(self.mode))
        if not 0 < self.read_discount <= 1:
            raise ValueError(f"read_discount must be in (0, 1], got {self.read_discount}")
        if self.mode is ThroughputMode.PROVISIONED and not self.provisioned_bps > 0:
            raise ValueError("provisioned mode needs provisioned_bps > 0")
        if self.provisioned_bps < 0:
            raise ValueError(f"provisioned_bps must be >= 0, got {self.provisioned_bps}")
        for name in (
            "per_client_ceiling_bps",
            "read_iops",
            "write_iops",
            "elastic_read_bps",
            "elastic_write_bps",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.initial_balance is not None and self.initial_balance < 0:
            raise ValueError(f"initial_balance must be >= 0, got {self.initial_balance}")

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable form (for the filesystem's stored settings)."""
        data = asdict(self)
        data["mode"] = self.mode.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ThrottleConfig:
        """The inverse of :meth:`to_dict`; unknown keys are rejected."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown throttle settings: {sorted(unknown)}")
        kwargs: dict[str, object] = dict(data)
        return cls(**kwargs)  # type: ignore[arg-type]


# --- the closed-form model -------------------------------------------------------------


def baseline_bps(stored_bytes: float) -> float:
    """Bursting baseline: 50 MiB/s per TiB stored, at least 1 MiB/s."""
    return max(float(MIN_BASELINE_BPS), BASELINE_BPS_PER_TIB * stored_bytes / TiB)


def burst_bps(stored_bytes: float) -> float:
    """Bursting burst rate: 100 MiB/s per TiB stored, at least 100 MiB/s."""
    return max(float(MIN_BURST_BPS), BURST_BPS_PER_TIB * stored_bytes / TiB)


def credit_cap(stored_bytes: float) -> float:
    """Largest credit balance: 2.1 TiB, or 2.1 TiB per TiB stored if that is more."""
    return max(MIN_CREDIT_CAP, CREDIT_CAP_PER_TIB * stored_bytes / TiB)


def elastic_ceiling_bps(config: ThrottleConfig) -> float:
    """Elastic mode's permitted *metered* rate.

    The elastic ceilings are raw-byte rates per kind; since reads are metered at the
    discount, the metered rate a filesystem may reach is the larger of the write ceiling
    and the discounted read ceiling (both 1 GiB/s with the defaults).
    """
    return max(config.elastic_write_bps, config.elastic_read_bps * config.read_discount)


def permitted_bps(config: ThrottleConfig, stored_bytes: float, balance: float) -> float:
    """The filesystem's permitted metered throughput (EFS ``PermittedThroughput``).

    - bursting: the burst rate while the credit balance is above zero, else the baseline;
    - provisioned: the provisioned rate, or the bursting baseline if that is higher;
    - elastic: the elastic ceiling (:func:`elastic_ceiling_bps`); credits play no part.
    """
    if config.mode is ThroughputMode.PROVISIONED:
        return max(config.provisioned_bps, baseline_bps(stored_bytes))
    if config.mode is ThroughputMode.ELASTIC:
        return elastic_ceiling_bps(config)
    return burst_bps(stored_bytes) if balance > 0 else baseline_bps(stored_bytes)


def burst_seconds_remaining(stored_bytes: float, balance: float) -> float:
    """How long the balance sustains the burst rate (credits drain at burst - baseline)."""
    return max(0.0, balance) / (burst_bps(stored_bytes) - baseline_bps(stored_bytes))


def metered_bytes(kind: OpKindLike, nbytes: int, read_discount: float = 1 / 3) -> float:
    """Metered size of one request of ``nbytes``.

    Every request counts as at least 4 KiB; reads are discounted, and the discount never
    takes a request below 4 KiB: ``max(4096, nbytes * discount)`` for reads,
    ``max(4096, nbytes)`` for writes and metadata operations.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if (kind if isinstance(kind, OpKind) else OpKind(kind)) is OpKind.READ:
        return max(float(MIN_OP_BYTES), nbytes * read_discount)
    return max(float(MIN_OP_BYTES), float(nbytes))


# --- the credit ledger -------------------------------------------------------------------


LEDGER_FORMAT_VERSION: Final = 1


@dataclass
class CreditLedger:
    """The filesystem's burst-credit balance (bytes) as of ``updated_at`` (seconds).

    :meth:`advance` is the whole model: over an interval ``dt`` credits accrue at the
    baseline rate for the stored size and the metered bytes of the interval are spent,
    the result clamped to ``[0, credit_cap(stored)]``. It is plain arithmetic on floats,
    so the same sequence of calls gives the same balance on every machine.

    ``updated_at`` is on whatever clock the owner uses; a ledger kept in the bucket and
    shared by several machines should be kept on wall-clock time and moved onto a local
    monotonic clock with :meth:`rebased`. Time never runs backwards in a ledger: an
    ``advance`` with an earlier ``now`` accrues nothing and keeps ``updated_at``.
    """

    balance: float
    updated_at: float

    @classmethod
    def new(
        cls, now: float, stored_bytes: float, initial_balance: float | None = None
    ) -> CreditLedger:
        """A new filesystem's ledger: a full balance unless ``initial_balance`` is given."""
        cap = credit_cap(stored_bytes)
        balance = cap if initial_balance is None else min(float(initial_balance), cap)
        return cls(balance=max(0.0, balance), updated_at=float(now))

    def advance(self, now: float, metered_since_last: float, stored_bytes: float) -> float:
        """Accrue credits up to ``now``, spend ``metered_since_last``; return the balance."""
        if metered_since_last < 0:
            raise ValueError(f"metered bytes must be >= 0, got {metered_since_last}")
        dt = max(0.0, now - self.updated_at)
        earned = baseline_bps(stored_bytes) * dt
        balance = self.balance + earned - metered_since_last
        self.balance = min(credit_cap(stored_bytes), max(0.0, balance))
        self.updated_at = max(self.updated_at, float(now))
        return self.balance

    def touch(self, now: float) -> None:
        """Move the clock without earning or spending (modes without credits)."""
        self.updated_at = max(self.updated_at, float(now))

    def rebased(self, offset: float) -> CreditLedger:
        """A copy with ``updated_at`` moved by ``offset`` (e.g. wall clock -> trio clock)."""
        return replace(self, updated_at=self.updated_at + offset)

    def to_dict(self) -> dict[str, float | int]:
        """A JSON-serialisable form, for storing in the bucket."""
        return {
            "version": LEDGER_FORMAT_VERSION,
            "balance": self.balance,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CreditLedger:
        """The inverse of :meth:`to_dict`; raises ValueError on anything unexpected."""
        if data.get("version") != LEDGER_FORMAT_VERSION:
            raise ValueError(f"unsupported credit ledger version: {data.get('version')!r}")
        balance = data.get("balance")
        updated_at = data.get("updated_at")
        if (
            not isinstance(balance, int | float)
            or not isinstance(updated_at, int | float)
            or isinstance(balance, bool)
            or isinstance(updated_at, bool)
            or not math.isfinite(balance)
            or not math.isfinite(updated_at)
            or balance < 0
        ):
            raise ValueError(f"malformed credit ledger: {dict(data)!r}")
        return cls(balance=float(balance), updated_at=float(updated_at))
