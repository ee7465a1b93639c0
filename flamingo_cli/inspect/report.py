"""What `inspect-shards` found: per-shard counts, findings by shard and key, deep statistics.

Plain dataclasses that pickle across worker processes, merge, and turn into JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from flamingo_cli.errors import Severity
from flamingo_cli.shards.tar import is_utf8, printable_name

Kind = Literal["interleaved", "pairs"]

# Token-count buckets shown in histograms: upper bounds, the last one open.
TOKEN_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Finding:
    """One problem: the shard, the sample key when there is one, a short check name, why."""

    shard: str
    check: str
    reason: str
    key: str | None = None
    offset: int | None = None
    severity: Severity = "error"

    def to_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "key": self.key,
            "check": self.check,
            "severity": self.severity,
            "reason": self.reason,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            str(data["shard"]),
            str(data["check"]),
            str(data["reason"]),
            data.get("key"),
            data.get("offset"),
            data.get("severity", "error"),
        )


@dataclass
class DeepStats:
    """Counts gathered by decoding every sample; `merge` adds another shard's counts."""

    samples: int = 0
    failed: int = 0
    images_per_sample: Counter[int] = field(default_factory=Counter)
    kept_per_sample: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> images
    tokens: Counter[int] = field(default_factory=Counter)  # token count -> samples
    over_max_tokens: int = 0
    under_min_images: int = 0

    def merge(self, other: DeepStats) -> None:
        self.samples += other.samples
        self.failed += other.failed
        self.images_per_sample.update(other.images_per_sample)
        self.kept_per_sample.update(other.kept_per_sample)
        self.dropped.update(other.dropped)
        self.tokens.update(other.tokens)
        self.over_max_tokens += other.over_max_tokens
        self.under_min_images += other.under_min_images

    def token_buckets(self) -> dict[str, int]:
        """Samples per token-count range, e.g. {"<=32": 10, "33-64": 2, ">2048": 0}."""
        buckets: dict[str, int] = {}
        low = -1
        for high in TOKEN_BUCKETS:
            label = f"<={high}" if low < 0 else f"{low + 1}-{high}"
            buckets[label] = sum(n for t, n in self.tokens.items() if low < t <= high)
            low = high
        buckets[f">{low}"] = sum(n for t, n in self.tokens.items() if t > low)
        return buckets

    def token_percentile(self, q: float) -> int | None:
        total = sum(self.tokens.values())
        if not total:
            return None
        seen = 0
        for count in sorted(self.tokens):
            seen += self.tokens[count]
            if seen >= q * total:
                return count
        return max(self.tokens)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "samples": self.samples,
            "failed": self.failed,
            "images_per_sample": dict(sorted(self.images_per_sample.items())),
            "kept_images_per_sample": dict(sorted(self.kept_per_sample.items())),
            "dropped_images": dict(sorted(self.dropped.items())),
            "under_min_images": self.under_min_images,
        }
        if self.tokens:
            data["tokens"] = {
                "buckets": self.token_buckets(),
                "p50": self.token_percentile(0.5),
                "p95": self.token_percentile(0.95),
                "max": max(self.tokens),
                "over_max_tokens": self.over_max_tokens,
                "counts": {str(k): v for k, v in sorted(self.tokens.items())},
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeepStats:
        """Read back `to_dict` output (JSON turns the integer keys into strings)."""

        def ints(counts: Mapping[str, Any]) -> Counter[int]:
            return Counter({int(k): int(v) for k, v in counts.items()})

        tokens = data.get("tokens") or {}
        return cls(
            samples=int(data["samples"]),
            failed=int(data["failed"]),
            images_per_sample=ints(data["images_per_sample"]),
            kept_per_sample=ints(data["kept_images_per_sample"]),
            dropped=Counter({str(k): int(v) for k, v in data["dropped_images"].items()}),
            tokens=ints(tokens.get("counts", {})),
            over_max_tokens=int(tokens.get("over_max_tokens", 0)),
            under_min_images=int(data["under_min_images"]),
        )


@dataclass
class ShardReport:
    """Counts and findings of one shard; `findings` is capped, `errors`/`warnings` are not."""

    url: str
    kind: Kind | None = None
    samples: int = 0
    members: int = 0
    bytes: int = 0
    extensions: dict[str, int] = field(default_factory=dict)
    missing_members: int = 0
    duplicate_keys: int = 0
    damaged_at: int | None = None
    sizes_json: int | None = None
    stats_successes: int | None = None
    findings: list[Finding] = field(default_factory=list)
    errors: int = 0
    warnings: int = 0
    deep: DeepStats | None = None
    max_findings: int = 1000

    def add(self, finding: Finding) -> None:
        """Count a finding and keep it while under the cap. Text from member names that are
        not UTF-8 is kept with those bytes escaped: it must print and go into JSON."""
        key = finding.key
        if not (is_utf8(finding.reason) and (key is None or is_utf8(key))):
            finding = replace(
                finding,
                reason=printable_name(finding.reason),
                key=None if key is None else printable_name(key),
            )
        if finding.severity == "error":
            self.errors += 1
        else:
            self.warnings += 1
        if len(self.findings) < self.max_findings:
            self.findings.append(finding)

    @property
    def readable(self) -> bool:
        """Whether the whole archive could be read (its counts are the true counts)."""
        return self.damaged_at is None and not any(f.check == "unreadable" for f in self.findings)

    def to_dict(self) -> dict[str, object]:
        return {
            "shard": self.url,
            "kind": self.kind,
            "samples": self.samples,
            "members": self.members,
            "bytes": self.bytes,
            "extensions": dict(sorted(self.extensions.items())),
            "missing_members": self.missing_members,
            "duplicate_keys": self.duplicate_keys,
            "damaged_at": self.damaged_at,
            "sizes_json": self.sizes_json,
            "stats_successes": self.stats_successes,
            "errors": self.errors,
            "warnings": self.warnings,
            "deep": self.deep.to_dict() if self.deep else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], max_findings: int = 1000) -> ShardReport:
        """Read back `to_dict` output; findings are listed separately (`InspectReport`)."""
        return cls(
            url=str(data["shard"]),
            kind=data["kind"],
            samples=int(data["samples"]),
            members=int(data["members"]),
            bytes=int(data["bytes"]),
            extensions={str(k): int(v) for k, v in data["extensions"].items()},
            missing_members=int(data["missing_members"]),
            duplicate_keys=int(data["duplicate_keys"]),
            damaged_at=data["damaged_at"],
            sizes_json=data["sizes_json"],
            stats_successes=data["stats_successes"],
            errors=int(data["errors"]),
            warnings=int(data["warnings"]),
            deep=DeepStats.from_dict(data["deep"]) if data["deep"] else None,
            max_findings=max_findings,
        )


@dataclass
class GroupReport:
    """A set of shards inspected with the same settings: the SPECs, or one recipe dataset's
    (or one source's of a blend, with its share of the dataset's draws)."""

    name: str
    shards: list[ShardReport]
    expected_kind: Kind | None = None
    planned: list[str] | None = None  # on one node of several: every shard of the group
    dataset: str | None = None
    source: str | None = None
    share: float | None = None

    @property
    def kind(self) -> Kind | None:
        kinds = Counter(s.kind for s in self.shards if s.kind is not None)
        return self.expected_kind or (kinds.most_common(1)[0][0] if kinds else None)

    def total(self, attribute: str) -> int:
        return sum(int(getattr(s, attribute)) for s in self.shards)

    @property
    def extensions(self) -> dict[str, int]:
        merged: Counter[str] = Counter()
        for shard in self.shards:
            merged.update(shard.extensions)
        return dict(sorted(merged.items()))

    @property
    def deep(self) -> DeepStats | None:
        parts = [s.deep for s in self.shards if s.deep is not None]
        if not parts:
            return None
        merged = DeepStats()
        for part in parts:
            merged.merge(part)
        return merged

    def to_dict(self) -> dict[str, object]:
        deep = self.deep
        return {
            "name": self.name,
            "kind": self.kind,
            "dataset": self.dataset,
            "source": self.source,
            "share": self.share,
            "totals": {
                name: self.total(name)
                for name in (
                    "samples",
                    "members",
                    "bytes",
                    "missing_members",
                    "duplicate_keys",
                    "errors",
                    "warnings",
                )
            },
            "extensions": self.extensions,
            "deep": deep.to_dict() if deep else None,
            "shards": [s.to_dict() for s in self.shards],
            **(
                {"plan": {"shards": self.planned, "expected_kind": self.expected_kind}}
                if self.planned is not None
                else {}
            ),
        }


@dataclass
class InspectReport:
    """Everything one `inspect-shards` run found; `ok` when no finding is an error."""

    groups: list[GroupReport]
    max_errors: int = 1000
    sizes_written: list[str] = field(default_factory=list)
    preview: str | None = None
    node: dict[str, object] | None = None  # rank and count on one node of several

    def unique_shards(self) -> list[ShardReport]:
        """Each shard once, even when it is both a training and an eval shard."""
        return list({id(s): s for g in self.groups for s in g.shards}.values())

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.unique_shards())

    @property
    def warnings(self) -> int:
        return sum(s.warnings for s in self.unique_shards())

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def findings(self) -> list[Finding]:
        """Findings in shard order, errors before warnings within a shard, at most max_errors."""
        found: list[Finding] = []
        for shard in self.unique_shards():
            found.extend(sorted(shard.findings, key=lambda f: f.severity != "error"))
        return found[: self.max_errors]

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "groups": [g.to_dict() for g in self.groups],
            "findings": [f.to_dict() for f in self.findings()],
            "findings_truncated": self.errors + self.warnings > len(self.findings()),
            "sizes_written": self.sizes_written,
            "preview": self.preview,
            **({"node": self.node} if self.node is not None else {}),
        }
