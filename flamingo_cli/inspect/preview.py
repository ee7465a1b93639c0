"""`--preview`: one self-contained HTML page showing samples as the model will see them.

Images are inline data URIs (thumbnails), every string from the data is escaped, and a
Content-Security-Policy forbids scripts and remote loads: the page is safe to open even
when the web text in the shards is hostile.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Sequence
from pathlib import Path

from flamingo_cli.errors import FlamingoError, OpenerError
from flamingo_cli.inspect.document import Filters, ImageView, SampleView, view_sample
from flamingo_cli.inspect.report import GroupReport, InspectReport, ShardReport
from flamingo_cli.inspect.run import ShardGroup
from flamingo_cli.shards.tar import TarReader, split_member
from flamingo_cli.shards.write import _tmp_name

THUMBNAIL = 320
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
h3{font-size:14px;color:#555;font-weight:600;margin:0 0 8px}
.meta{color:#666;font-size:13px}
article{border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:16px 0;background:#fff}
.sentence{margin:4px 0}.idx{display:inline-block;min-width:2.2em;color:#999;font-size:12px}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top;max-width:330px}
figure img{display:block;min-width:96px;max-width:320px;max-height:240px;border:3px solid #2a7;
image-rendering:pixelated}
figure.dropped img{border-color:#c44;opacity:.55}
figcaption{font-size:12px;color:#444}.text{font-size:14px;margin-top:2px}
.broken{width:160px;height:90px;background:#fee;border:3px dashed #c44;display:flex;
align-items:center;justify-content:center;color:#a22;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
.grid figure{margin:0;max-width:none}.grid img{max-width:100%}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:8px;font-size:12px}
.issues{color:#a22;font-size:13px}.warn{color:#a60}
table.sim{border-collapse:collapse;font-size:12px}table.sim td,table.sim th{border:1px solid #ddd;
padding:2px 6px;text-align:right}table.sim td.kept{background:#cfc;font-weight:600}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _thumbnail(data: bytes) -> str | None:
    """A JPEG/PNG data URI of at most THUMBNAIL pixels a side; None when it does not decode.

    Called only for images that decoded within the pixel cap (`ImageView.size` is set)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            has_alpha = image.mode in ("RGBA", "LA") or "transparency" in image.info
            converted = image.convert("RGBA" if has_alpha else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    fmt, mime = ("PNG", "image/png") if has_alpha else ("JPEG", "image/jpeg")
    converted.save(buffer, format=fmt, quality=85)
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _figure(image: ImageView, label: str, text: str | None = None) -> str:
    """An image (or a box saying why there is none) with its facts, and `text` under it."""
    # an image that did not decode within the pixel cap (no size) is not opened again
    uri = _thumbnail(image.data) if image.data is not None and image.size is not None else None
    parts = [f"image {image.index}"]
    if image.similarity is not None:
        parts.append(f"similarity {image.similarity:.3f}")
    if image.size is not None:
        parts.append(f"{image.size[0]}x{image.size[1]}")
    if image.data is not None:
        parts.append(f"{len(image.data):,} bytes")
    if image.dropped:
        parts.append(f"dropped: {image.dropped}")
    caption = " · ".join(parts)
    body = (
        f'<img src="{uri}" alt="{_e(label)}">'
        if uri is not None
        else f'<div class="broken">{_e(image.dropped or "no image data")}</div>'
    )
    css = "dropped" if image.dropped else "kept"
    below = f'<div class="text">{_e(text)}</div>' if text is not None else ""
    return f'<figure class="{css}">{body}<figcaption>{_e(caption)}</figcaption>{below}</figure>'


def _issues(view: SampleView) -> str:
    if not view.issues:
        return ""
    items = "".join(
        f'<li class="{"warn" if i.severity == "warning" else ""}">{_e(i.check)}: {_e(i.reason)}</li>'
        for i in view.issues
    )
    return f'<ul class="issues">{items}</ul>'


def _similarity_table(view: SampleView, matrix: object) -> str:
    if not isinstance(matrix, list) or not matrix:
        return ""
    kept = {(i.index, i.sentence) for i in view.kept}
    head = "".join(f"<th>s{j}</th>" for j in range(len(view.texts)))
    rows = []
    for i, row in enumerate(matrix):
        if not isinstance(row, list):
            continue
        cells = "".join(
            f'<td class="{"kept" if (i, j) in kept else ""}">'
            f"{_e(f'{v:.3f}' if isinstance(v, int | float) else v)}</td>"
            for j, v in enumerate(row)
        )
        rows.append(f"<tr><th>image {i}</th>{cells}</tr>")
    return (
        "<details><summary>similarity matrix (images x sentences; kept pairs highlighted)"
        f'</summary><table class="sim"><tr><th></th>{head}</tr>{"".join(rows)}</table></details>'
    )


def _document(shard: str, view: SampleView, matrix: object) -> str:
    by_sentence: dict[int, list[ImageView]] = {}
    for image in view.kept:
        assert image.sentence is not None
        by_sentence.setdefault(image.sentence, []).append(image)
    flow = []
    for j, text in enumerate(view.texts):
        for image in by_sentence.get(j, []):
            flow.append(_figure(image, f"image {image.index} before sentence {j}"))
        flow.append(f'<p class="sentence"><span class="idx">s{j}</span>{_e(text)}</p>')
    dropped = [i for i in view.images if i.dropped]
    dropped_html = (
        f"<details open><summary>{len(dropped)} image(s) the filters drop</summary>"
        + "".join(_figure(i, f"dropped image {i.index}") for i in dropped)
        + "</details>"
        if dropped
        else ""
    )
    kind = "ChatGPT-generated document" if view.is_gpt else "interleaved document"
    return (
        f"<article><h3>{_e(kind)} · {_e(shard)} · key {_e(view.key)} · "
        f"{len(view.kept)} of {len(view.images)} image(s) kept</h3>{_issues(view)}"
        f'<div class="flow">{"".join(flow)}</div>{dropped_html}'
        f"{_similarity_table(view, matrix)}"
        f"<details><summary>text as tokenized</summary><pre>{_e(view.model_text())}</pre>"
        "</details></article>"
    )


def _pair(shard: str, view: SampleView) -> str:
    image = view.images[0] if view.images else ImageView(0, dropped="no image member")
    caption = view.texts[0] if view.texts else ""
    figure = _figure(image, caption[:80], caption)
    return f'<div>{figure}<div class="meta">{_e(shard)} · {_e(view.key)}</div>{_issues(view)}</div>'


def _read_samples(
    url: str, indices: set[int], allow_pipe: bool
) -> list[tuple[str, dict[str, bytes]]]:
    """The members of the samples at `indices` (positions in the shard), in shard order."""
    index, previous = -1, None

    def want(name: str) -> bool:
        nonlocal index, previous
        key, _ = split_member(name)
        if key != previous:
            index, previous = index + 1, key
        return index in indices

    found: dict[str, dict[str, bytes]] = {}
    with TarReader(url, allow_pipe=allow_pipe, want=want) as reader:
        for member, data in reader:
            if data is not None:
                key, ext = split_member(member.name)
                found.setdefault(key, {})[ext] = data
    return list(found.items())


def _section(group: GroupReport, shard_group: ShardGroup, samples: int, seed: int) -> str:
    shards = [s for s in group.shards if s.samples]
    total = sum(s.samples for s in shards)
    rng = random.Random(f"{seed}-{group.name}")
    picks = sorted(rng.sample(range(total), min(samples, total))) if total else []
    wanted: dict[int, set[int]] = {}
    start = 0
    for n, shard in enumerate(shards):
        wanted[n] = {p - start for p in picks if start <= p < start + shard.samples}
        start += shard.samples
    filters: Filters = shard_group.settings.filters
    body: list[str] = []
    for n, shard in enumerate(shards):
        if wanted[n]:
            body.extend(_render_shard(shard, wanted[n], filters, shard_group.settings.allow_pipe))
    kind = group.kind or "unknown kind"
    heading = f"<h2>{_e(group.name)} ({_e(kind)}): {len(picks)} of {total:,} samples</h2>"
    if group.kind == "pairs":
        return f'<section>{heading}<div class="grid">{"".join(body)}</div></section>'
    note = (
        f'<p class="meta">filters: images under 11,000 bytes dropped; {filters.assignment} '
        f"assignment, similarity threshold {filters.threshold:g}; at most "
        f"{filters.max_num_images} images, ordered by sentence. Kept images have a green "
        "border and sit before the sentence they are assigned to.</p>"
    )
    return f"<section>{heading}{note}{''.join(body)}</section>"


def _render_shard(
    shard: ShardReport, indices: set[int], filters: Filters, allow_pipe: bool
) -> list[str]:
    import json

    name = shard.url.rsplit("/", 1)[-1]
    try:
        samples = _read_samples(shard.url, indices, allow_pipe)
    except OpenerError as exc:
        return [f'<p class="issues">{_e(shard.url)}: {_e(exc.message)}</p>']
    out = []
    for key, members in samples:
        view = view_sample(key, members, filters)
        if view.kind == "pairs":
            out.append(_pair(name, view))
            continue
        try:
            matrix = json.loads(members.get("json", b"{}")).get("similarity_matrix")
        except (ValueError, AttributeError, RecursionError):
            matrix = None
        out.append(_document(name, view, matrix))
    return out


def _blend_heading(dataset: str, kind: str | None, groups: Sequence[ShardGroup]) -> str:
    """The heading of a blended dataset: its kind and each source's share of its samples; the
    sources' sections follow it."""
    shares = {g.source: g.share for g in groups if g.dataset == dataset and g.source is not None}
    parts = ", ".join(f"{_e(name)} {share or 0:.0%}" for name, share in shares.items())
    return (
        f'<h2 class="dataset">{_e(dataset)} ({_e(kind or "unknown kind")}): a blend of '
        f'{len(shares)} sources</h2><p class="meta">samples drawn per source: {parts}; '
        "each source's shards are shown below</p>"
    )


def write_preview(
    report: InspectReport,
    groups: Sequence[ShardGroup],
    path: str | Path,
    *,
    samples: int = 12,
    seed: int = 0,
) -> Path:
    """Write the HTML preview of `samples` random samples per shard group (seeded)."""
    path = Path(path)
    sections = []
    seen: set[tuple[str, ...]] = set()
    blends: set[str] = set()
    for group, shard_group in zip(report.groups, groups, strict=True):
        urls = tuple(sorted(shard_group.urls))
        if any(set(urls) <= set(other) for other in seen):
            continue  # eval shards already shown with the training shards
        seen.add(urls)
        blend = shard_group.dataset if shard_group.source is not None else None
        if blend is not None and blend not in blends:
            blends.add(blend)
            sections.append(_blend_heading(blend, group.kind, groups))
        sections.append(_section(group, shard_group, samples, seed))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>flamingo preview</title><style>{_STYLE}</style></head><body>"
        f'<h1>What the model will see</h1><p class="meta">seed {seed}; '
        f"{samples} sample(s) per shard group, drawn uniformly</p>{''.join(sections)}"
        "</body></html>\n"
    )
    tmp = _tmp_name(path)
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise FlamingoError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
