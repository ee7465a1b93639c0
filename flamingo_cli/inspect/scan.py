"""Inspect one shard: structure from the tar headers, and with `deep` every sample decoded.

Runs in worker processes: takes plain settings, returns a picklable ShardReport.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flamingo_cli.errors import OpenerError
from flamingo_cli.inspect.document import (
    IMAGE_EXTS,
    PAIR_IMAGE_EXTS,
    Filters,
    SampleView,
    sample_kind,
    view_sample,
)
from flamingo_cli.inspect.report import DeepStats, Finding, Kind, ShardReport
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import local_path, url_kind
from flamingo_cli.shards.tar import (
    TarListing,
    TarMember,
    TarReader,
    is_utf8,
    printable_name,
    split_member,
)

DEFAULT_MAX_TOKENS: dict[Kind, int] = {"pairs": 32, "interleaved": 256}
_KIND_NAMES: dict[Kind, str] = {"pairs": "image-text pairs", "interleaved": "interleaved documents"}


@dataclass(frozen=True)
class ScanSettings:
    """How to inspect a shard: fast or deep, the filters, the tokenizer, the caps."""

    deep: bool = False
    filters: Filters = field(default_factory=Filters)
    max_tokens: int | None = None
    tokenizer: str | None = None
    max_errors: int = 1000
    allow_pipe: bool = False
    expected_kind: Kind | None = None
    dataset: str | None = None  # recipe section, for messages


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> tuple[Any, str]:
    from flamingo_cli.model.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(path)
    return tokenizer, str(tokenizer.eos_token)


def scan_shard(url: str, settings: ScanSettings) -> ShardReport:
    """Count samples, members and bytes of one shard and report every structural problem."""
    report = ShardReport(url, max_findings=settings.max_errors)
    if settings.tokenizer is not None:
        _tokenizer(settings.tokenizer)  # fail before reading when it cannot load
    try:
        _scan(url, settings, report)
    except OpenerError as exc:
        fix = f"; fix: {exc.fix}" if exc.fix else ""
        report.add(Finding(url, "unreadable", f"{exc.message}{fix}"))
    try:
        report.stats_successes = _stats_successes(url, settings.allow_pipe)
    except OpenerError as exc:
        report.add(Finding(url, "stats-json", exc.message))
    successes = report.stats_successes
    if successes is not None and report.readable and successes != report.samples:
        report.add(
            Finding(
                url,
                "stats-json",
                f"_stats.json says {successes} successes, the tar holds {report.samples} samples",
            )
        )
    return report


def _everything(name: str) -> bool:
    return True


def _scan(url: str, settings: ScanSettings, report: ShardReport) -> None:
    deep = DeepStats() if settings.deep else None
    want = _everything if deep else None
    with TarReader(url, allow_pipe=settings.allow_pipe, want=want) as reader:
        if deep is not None:
            listing = _read_deep(url, reader, settings, report, deep)
        else:
            listing = reader.listing()
    report.members = len(listing.names)
    report.samples = len(listing.keys)
    _check_names(url, listing, report)
    report.extensions = {
        printable_name(ext): n for ext, n in _check_repeats(url, listing, report).items()
    }
    report.bytes = reader.file_size if reader.file_size is not None else reader.end
    if reader.damage is not None:
        damage = reader.damage
        report.damaged_at = damage.offset
        after = f" (after sample {listing.keys[-1]})" if listing.keys else ""
        report.add(
            Finding(
                url,
                "truncated" if damage.kind == "truncated" else "corrupt-header",
                f"the tar {damage.message}{after}",
                key=split_member(damage.name)[0] if damage.name else None,
                offset=damage.offset,
            )
        )
    _check_members(url, listing, settings, report)
    report.deep = deep


def _check_names(url: str, listing: TarListing, report: ShardReport) -> None:
    """Report member names that are not UTF-8: the loaders skip those members."""
    names = listing.names
    if "".join(names).isascii() or all(is_utf8(name) for name in names):
        return
    for index, name in enumerate(names):
        if not is_utf8(name):
            report.add(
                Finding(
                    url,
                    "bad-name",
                    f"member name {printable_name(name)} is not valid UTF-8: training and "
                    "eval-loss skip the member (counted as bad_name); rename it and rewrite "
                    "the shard",
                    key=split_member(name)[0],
                    offset=listing.offsets[index],
                )
            )


def _check_repeats(url: str, listing: TarListing, report: ShardReport) -> dict[str, int]:
    """Report keys that come back after other samples and members repeated within a sample;
    return the members per extension. Work is per distinct set of extensions, and per
    sample only when something repeats."""
    extensions: Counter[str] = Counter()
    repeated: set[str] = set()
    for signature, n in Counter(listing.signatures).items():
        exts = signature.split("/")
        for ext in exts:
            extensions[ext] += n
        if len(set(exts)) < len(exts):
            repeated.add(signature)
    if not repeated and len(set(listing.keys)) == len(listing.keys):
        return dict(extensions)
    seen: dict[str, int] = {}
    for index, key in enumerate(listing.keys):
        start = listing.starts[index]
        offset = listing.offsets[start]
        if key in seen:
            report.duplicate_keys += 1
            report.add(
                Finding(
                    url,
                    "duplicate-key",
                    f"key appears again at byte {offset} (first sample at byte {seen[key]}); "
                    "webdataset yields it twice",
                    key=key,
                    offset=offset,
                )
            )
        else:
            seen[key] = offset
        signature = listing.signatures[index]
        if signature not in repeated:
            continue
        once: set[str] = set()
        for position, ext in enumerate(signature.split("/"), start):
            if ext in once:
                name, at = listing.names[position], listing.offsets[position]
                report.duplicate_keys += 1
                report.add(
                    Finding(
                        url,
                        "duplicate-key",
                        f"member {name} appears twice in one sample (byte {at}); webdataset "
                        "stops with an error",
                        key=key,
                        offset=at,
                    )
                )
            once.add(ext)
    return dict(extensions)


def _read_deep(
    url: str, reader: TarReader, settings: ScanSettings, report: ShardReport, deep: DeepStats
) -> TarListing:
    """Check each sample with its members' data as soon as it is complete; the listing of
    what was read."""
    members: list[TarMember] = []
    key: str | None = None
    start = 0
    data: dict[str, bytes] = {}
    for member, payload in reader:
        members.append(member)
        name_key, ext = split_member(member.name)
        if name_key != key:
            if key is not None:
                _deep_check(url, key, start, data, settings, report, deep)
            key, start, data = name_key, member.offset, {}
        if payload is not None:
            data[ext] = payload
    if key is not None:
        _deep_check(url, key, start, data, settings, report, deep)
    return TarListing.of(members)


def _check_members(
    url: str, listing: TarListing, settings: ScanSettings, report: ShardReport
) -> None:
    """Kind of the shard, then every sample missing a member the others have."""
    exts_of = {s: frozenset(s.split("/")) for s in set(listing.signatures)}
    by_exts: Counter[frozenset[str]] = Counter()
    for signature, n in Counter(listing.signatures).items():
        by_exts[exts_of[signature]] += n
    kind = _shard_kind(url, by_exts, settings, report)
    if kind is None:
        return
    # The last sample of a damaged shard is cut by the damage, which is reported already.
    checked = len(listing.keys) - 1 if report.damaged_at is not None else len(listing.keys)
    problems = _member_problems(listing, exts_of, by_exts, kind, checked)
    if not problems:
        return
    for index in range(checked):
        problem = problems.get(listing.signatures[index])
        if problem is not None:
            report.missing_members += 1
            offset = listing.offsets[listing.starts[index]]
            report.add(
                Finding(url, "missing-member", problem, key=listing.keys[index], offset=offset)
            )


def _shard_kind(
    url: str, by_exts: Counter[frozenset[str]], settings: ScanSettings, report: ShardReport
) -> Kind | None:
    """The kind most samples have (None: no sample has one), set on the report; a finding
    when the recipe's dataset expects another."""
    kinds: Counter[Kind | None] = Counter()
    for exts, n in by_exts.items():
        kinds[sample_kind(exts)] += n
    kinds.pop(None, None)
    if not kinds:
        return None
    kind: Kind = kinds.most_common(1)[0][0]  # type: ignore[assignment]
    report.kind = kind
    expected = settings.expected_kind
    if expected is not None and kind != expected:
        report.add(
            Finding(
                url,
                "kind",
                f"holds {_KIND_NAMES[kind]}, but {settings.dataset or 'the recipe'} expects "
                f"{_KIND_NAMES[expected]}",
            )
        )
    return kind


def _member_problems(
    listing: TarListing,
    exts_of: dict[str, frozenset[str]],
    by_exts: Counter[frozenset[str]],
    kind: Kind,
    checked: int,
) -> dict[str, str]:
    """What each distinct set of members (of the first `checked` samples) lacks: a member at
    least half the samples have, the text or JSON of its kind, a pair's readable image."""
    counts: Counter[str] = Counter()
    for exts, n in by_exts.items():
        for ext in exts:
            counts[ext] += n
    samples = len(listing.keys)
    common = {e for e, n in counts.items() if 2 * n >= samples and e not in IMAGE_EXTS}
    if kind == "pairs":
        common.add("txt")
    else:
        common.add("json")
    problems: dict[str, str] = {}  # worked out once per distinct set of members
    for signature in set(listing.signatures[:checked]):
        exts = exts_of[signature]
        missing = [f"no .{e} member" for e in sorted(common - exts)]
        if kind == "pairs" and not exts & set(PAIR_IMAGE_EXTS):
            other = sorted(exts & set(IMAGE_EXTS))
            missing.append(
                f"no .jpg/.jpeg/.png image (OpenFlamingo reads only these; found "
                f"{', '.join('.' + e for e in other)})"
                if other
                else "no .jpg/.jpeg/.png image"
            )
        if missing:
            problems[signature] = "; ".join(missing)
    return problems


def _deep_check(
    url: str,
    key: str,
    offset: int,
    members: dict[str, bytes],
    settings: ScanSettings,
    report: ShardReport,
    stats: DeepStats,
) -> None:
    view = view_sample(key, members, settings.filters)
    stats.samples += 1
    if view.failed:
        stats.failed += 1
    for issue in view.issues:
        if issue.check == "missing-member":
            continue  # reported by the structural check
        report.add(
            Finding(url, issue.check, issue.reason, key=key, offset=offset, severity=issue.severity)
        )
    _count(view, settings, stats)


def _count(view: SampleView, settings: ScanSettings, stats: DeepStats) -> None:
    if view.kind == "interleaved":
        stats.images_per_sample[sum(i.data is not None for i in view.images)] += 1
        kept = len(view.kept)
        stats.kept_per_sample[kept] += 1
        if kept < settings.filters.min_num_images:
            stats.under_min_images += 1
        for image in view.images:
            if image.dropped is not None:
                stats.dropped[image.dropped.split(" (")[0]] += 1
    if settings.tokenizer is not None:
        tokenizer, eos = _tokenizer(settings.tokenizer)
        count = len(tokenizer(view.model_text(eos))["input_ids"])
        stats.tokens[count] += 1
        if count > (settings.max_tokens or DEFAULT_MAX_TOKENS[view.kind]):
            stats.over_max_tokens += 1


def stats_url(url: str) -> str:
    """img2dataset's `<stem>_stats.json` beside `<stem>.tar`."""
    directory, name = posixpath.split(url)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return posixpath.join(directory, f"{stem}_stats.json")


def _stats_successes(url: str, allow_pipe: bool) -> int | None:
    """`successes` of the shard's img2dataset _stats.json, None when there is none."""
    if url_kind(url) == "pipe":
        return None
    path = stats_url(url)
    if url_kind(path) == "local" and not local_path(path).is_file():
        return None
    try:
        with open_url(path, allow_pipe=allow_pipe) as handle:
            data = json.load(handle)
    except (OpenerError, FileNotFoundError):
        return None  # no stats file beside a remote shard
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise OpenerError(f"{path} is not valid JSON: {exc}") from exc
    successes = data.get("successes") if isinstance(data, dict) else None
    return successes if isinstance(successes, int) else None
