"""Inspect one shard: structure from the tar headers, and with `deep` every sample decoded.

Runs in worker processes: takes plain settings, returns a picklable ShardReport.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from operator import itemgetter
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
from flamingo_cli.shards.tar import TarMember, TarReader, split_member

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


Samples = list[tuple[str, frozenset[str], int]]  # key, member extensions, offset


def _everything(name: str) -> bool:
    return True


def _scan(url: str, settings: ScanSettings, report: ShardReport) -> None:
    deep = DeepStats() if settings.deep else None
    want = _everything if deep else None
    with TarReader(url, allow_pipe=settings.allow_pipe, want=want) as reader:
        if deep is not None:
            samples, all_exts = _group_deep(url, reader, settings, report, deep)
        else:
            samples, all_exts = _group_listing(url, reader.members(), report)
    report.members = len(all_exts)
    extensions = Counter(all_exts)
    report.samples = len(samples)
    report.extensions = dict(extensions)
    report.bytes = reader.file_size if reader.file_size is not None else reader.end
    if reader.damage is not None:
        damage = reader.damage
        report.damaged_at = damage.offset
        after = f" (after sample {samples[-1][0]})" if samples else ""
        report.add(
            Finding(
                url,
                "truncated" if damage.kind == "truncated" else "corrupt-header",
                f"the tar {damage.message}{after}",
                key=split_member(damage.name)[0] if damage.name else None,
                offset=damage.offset,
            )
        )
    _check_members(url, samples, settings, report)
    report.deep = deep


def _duplicate_key(url: str, key: str, offset: int, first: int) -> Finding:
    return Finding(
        url,
        "duplicate-key",
        f"key appears again at byte {offset} (first sample at byte {first}); webdataset "
        "yields it twice",
        key=key,
        offset=offset,
    )


def _repeated_member(url: str, key: str, member: TarMember) -> Finding:
    return Finding(
        url,
        "duplicate-key",
        f"member {member.name} appears twice in one sample (byte {member.offset}); webdataset "
        "stops with an error",
        key=key,
        offset=member.offset,
    )


def _group_listing(
    url: str, members: list[TarMember], report: ShardReport
) -> tuple[Samples, list[str]]:
    """Samples as runs of members sharing a key, with per-sample work only (the listing)."""
    split = _split_names([m[0] for m in members])
    all_exts = [ext for _, _, ext in split]
    samples: Samples = []
    add_sample = samples.append
    seen: dict[str, int] = {}
    ext_sets: dict[tuple[str, ...], frozenset[str]] = {}
    position = 0
    for key, run in groupby(split, key=itemgetter(0)):
        found = tuple(ext for _, _, ext in run)
        first = members[position]
        if key in seen:
            report.duplicate_keys += 1
            report.add(_duplicate_key(url, key, first.offset, seen[key]))
        else:
            seen[key] = first.offset
        exts = ext_sets.get(found)
        if exts is None:
            exts = ext_sets[found] = frozenset(found)
        if len(exts) != len(found):  # a member repeated within the sample
            once: set[str] = set()
            for index, ext in enumerate(found):
                if ext in once:
                    report.duplicate_keys += 1
                    report.add(_repeated_member(url, key, members[position + index]))
                once.add(ext)
        add_sample((key, exts, first.offset))
        position += len(found)
    return samples, all_exts


def _group_deep(
    url: str, reader: TarReader, settings: ScanSettings, report: ShardReport, deep: DeepStats
) -> tuple[Samples, list[str]]:
    """Samples with their members' data, each checked as soon as it is complete."""
    samples: Samples = []
    seen: dict[str, int] = {}
    all_exts: list[str] = []
    key: str | None = None
    start = 0
    exts: list[str] = []
    data: dict[str, bytes] = {}

    def finish() -> None:
        assert key is not None
        samples.append((key, frozenset(exts), start))
        _deep_check(url, key, start, data, settings, report, deep)

    for member, payload in reader:
        name_key, ext = split_member(member.name)
        all_exts.append(ext)
        if name_key != key:
            if key is not None:
                finish()
            if name_key in seen:
                report.duplicate_keys += 1
                report.add(_duplicate_key(url, name_key, member.offset, seen[name_key]))
            else:
                seen[name_key] = member.offset
            key, start, exts, data = name_key, member.offset, [ext], {}
        elif ext in exts:
            report.duplicate_keys += 1
            report.add(_repeated_member(url, name_key, member))
        else:
            exts.append(ext)
        if payload is not None:
            data[ext] = payload
    if key is not None:
        finish()
    return samples, all_exts


def _split_names(names: list[str]) -> list[tuple[str, str, str]]:
    """`split_member` over many names as (key, ".", extension); names without a folder take
    a faster path."""
    if "/" in "".join(names):
        return [(key, ".", ext) for key, ext in map(split_member, names)]
    return [name.partition(".") for name in names]


def _check_members(
    url: str,
    samples: list[tuple[str, frozenset[str], int]],
    settings: ScanSettings,
    report: ShardReport,
) -> None:
    """Kind of the shard, then every sample missing a member the others have."""
    kinds: Counter[Kind | None] = Counter()
    for exts, n in Counter(exts for _, exts, _ in samples).items():
        kinds[sample_kind(exts)] += n
    kinds.pop(None, None)
    if not kinds:
        return
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
    counts: Counter[str] = Counter()
    for exts, n in Counter(exts for _, exts, _ in samples).items():
        for ext in exts:
            counts[ext] += n
    common = {e for e, n in counts.items() if 2 * n >= len(samples) and e not in IMAGE_EXTS}
    if kind == "pairs":
        common.add("txt")
    else:
        common.add("json")
    # The last sample of a damaged shard is cut by the damage, which is reported already.
    checked = samples[:-1] if report.damaged_at is not None else samples
    problems: dict[frozenset[str], str] = {}  # worked out once per distinct set of members
    for exts in {exts for _, exts, _ in checked}:
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
            problems[exts] = "; ".join(missing)
    if not problems:
        return
    for sample_key, exts, offset in checked:
        if exts in problems:
            report.missing_members += 1
            report.add(
                Finding(url, "missing-member", problems[exts], key=sample_key, offset=offset)
            )


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenerError(f"{path} is not valid JSON: {exc}") from exc
    successes = data.get("successes") if isinstance(data, dict) else None
    return successes if isinstance(successes, int) else None
