"""The HTML preview: samples as the model sees them, escaped, and rendered by a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flamingo_cli.inspect.preview import write_preview
from flamingo_cli.inspect.run import InspectOptions, ShardGroup, groups_from_specs, inspect_shards
from flamingo_cli.shards.write import write_tar
from flamingo_cli.synthetic import laion_samples, mmc4_samples

CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_shards(root: Path) -> tuple[Path, Path]:
    """Documents with a kept, a too-small, an unassigned and a corrupt image; hostile text."""
    docs = []
    for i, sample in enumerate(mmc4_samples(0, 3, seed=1)):
        doc = json.loads(sample["json"])
        if i == 0:
            doc["text_list"][0] = HOSTILE
            extra = dict(doc["image_info"][0], image_base64=small_png())
            broken = dict(doc["image_info"][1])
            broken["image_base64"] = broken["image_base64"][:3000]
            doc["image_info"] += [extra, broken]
            doc["similarity_matrix"] += [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]]
            doc["similarity_matrix"][1] = [0.1, 0.1, 0.2]  # image 1 under the threshold
        docs.append({"__key__": sample["__key__"], "json": json.dumps(doc).encode()})
    (root / "mmc4").mkdir()
    (root / "laion").mkdir()
    write_tar(root / "mmc4" / "00000.tar", docs)
    pairs = list(laion_samples(0, 5, seed=1))
    pairs[0]["txt"] = HOSTILE.encode()
    write_tar(root / "laion" / "00000.tar", pairs)
    return root / "mmc4", root / "laion"


def preview(tmp_path: Path, samples: int = 10) -> tuple[Path, str]:
    docs, pairs = make_shards(tmp_path)
    options = InspectOptions(workers=1)
    groups: list[ShardGroup] = groups_from_specs([str(docs), str(pairs)], options)
    report = inspect_shards(groups, options)
    out = write_preview(report, groups, tmp_path / "preview.html", samples=samples, seed=3)
    return out, out.read_text(encoding="utf-8")


def test_preview_places_images_and_shows_what_is_dropped(tmp_path: Path) -> None:
    _, page = preview(tmp_path)
    assert "3 of 3 samples" in page and "5 of 5 samples" in page
    first = page[page.index("key mmc4-00000-0000") : page.index("key mmc4-00000-0001")]
    assert "1 of 4 image(s) kept" in first
    # The kept image sits right before sentence 1, the one it is assigned to.
    flow = first[first.index('class="flow"') : first.index("image(s) the filters drop")]
    assert re.search(
        r'figure class="kept"><img[^>]*>.*?similarity 0\.300.*?</figure>'
        r'<p class="sentence"><span class="idx">s1</span>',
        flow,
    )
    dropped = first[first.index("image(s) the filters drop") :]
    for reason in (
        "dropped: not assigned (similarity under 0.24)",
        "dropped: under 11,000 bytes",
        "dropped: corrupt",
    ):
        assert reason in dropped
    assert '<td class="kept">0.300</td>' in first
    assert "&lt;image&gt;This page" not in first  # model text starts at the first image
    # Every image that decodes is inline; the corrupt one is a box, not a broken <img>.
    # First document: kept, unassigned, small (3 decodable of 4); two more with 2; 5 pairs.
    assert page.count("<img ") == 3 + 2 * 2 + 5
    assert page.count('src="data:image/') == page.count("<img ")
    assert page.count('<div class="broken">corrupt</div>') == 1


def test_preview_escapes_web_text(tmp_path: Path) -> None:
    _, page = preview(tmp_path)
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 2
    assert "script-src" not in page and "default-src &#x27;none&#x27;" not in page
    assert "default-src 'none'; img-src data:" in page  # CSP: no scripts, no remote loads


def test_preview_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    out, page = preview(tmp_path, samples=2)
    again = write_preview(
        *_report_and_groups(tmp_path), tmp_path / "again.html", samples=2, seed=3
    ).read_text(encoding="utf-8")
    assert again == page
    assert page.count("<article>") == 2 and "2 of 3 samples" in page and out.exists()


def _report_and_groups(root: Path) -> tuple[Any, list[ShardGroup]]:
    options = InspectOptions(workers=1)
    groups = groups_from_specs([str(root / "mmc4"), str(root / "laion")], options)
    return inspect_shards(groups, options), groups


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.browser
@pytest.mark.slow
def test_preview_renders_in_headless_chromium(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        if os.environ.get("CI") != "true":
            pytest.skip("chromium is not installed (apt-get install chromium); required in CI")
        pytest.fail("chromium is missing under CI=true: .ci/run must install it")
    out, page = preview(tmp_path)
    expected = page.count("<img ")
    # A copy with a marker script (the page's CSP forbids scripts, so drop it in the copy).
    marker = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.setAttribute('data-images',i.length+'/'+"
        "i.filter(x=>x.complete&&x.naturalWidth>0).length)})</script>"
    )
    probe = tmp_path / "probe.html"
    probe.write_text(
        re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace(
            "</body>", marker + "</body>"
        ),
        encoding="utf-8",
    )
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", probe.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-images="{expected}/{expected}"' in dom.stdout, dom.stdout[:500]
    shot = tmp_path / "preview.png"
    run = subprocess.run(
        [*flags, "--window-size=1200,1800", f"--screenshot={shot}", out.as_uri()],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert _png_size(data) == (1200, 1800)
    assert len(zlib.compress(data)) > 20_000  # a page with pictures, not a blank canvas
    if os.environ.get("FLAMINGO_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FLAMINGO_KEEP_SCREENSHOT"])
