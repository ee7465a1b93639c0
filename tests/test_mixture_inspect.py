"""`inspect-shards --recipe` and `--preview` on a mixture: a group per dataset given by `shards`
and per source of a blend (`NAME/SOURCE training`, `... eval`), each with its kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.inspect.run import (
    InspectOptions,
    groups_from_recipe,
    inspect_shards,
    merge_reports,
)
from flamingo_cli.shards.cluster import Partition

from .test_mixture_eval import MIXTURE

runner = CliRunner()
OPTIONS = InspectOptions(workers=1)

GROUPS = [
    # name, kind, samples, dataset, source, share
    ("laion/laion2b training", "pairs", 8, "laion", "laion2b", 0.7),
    ("laion/laion2b eval", "pairs", 8, "laion", "laion2b", 0.7),
    ("laion/datacomp training", "pairs", 8, "laion", "datacomp", 0.3),
    ("laion/datacomp eval", "pairs", 16, "laion", "datacomp", 0.3),
    ("mmc4 training", "interleaved", 4, "mmc4", None, None),
    ("mmc4 eval", "interleaved", 4, "mmc4", None, None),
    ("coyo training", "pairs", 8, "coyo", None, None),
    ("coyo eval", "pairs", 8, "coyo", None, None),
]


def _recipe(tmp_path: Path, shard_root: Path, text: str = MIXTURE) -> Path:
    path = tmp_path / "recipe.toml"
    body = text.replace("{root}", str(shard_root)).replace("{out}", str(tmp_path))
    path.write_text(body.replace("{strategy}", "none"), encoding="utf-8")
    return path


def _rows(data: dict[str, object]) -> list[tuple[object, ...]]:
    groups = data["groups"]
    assert isinstance(groups, list)
    return [
        (
            g["name"],
            g["kind"],
            g["totals"]["samples"],
            g["dataset"],
            g["source"],
            None if g["share"] is None else round(g["share"], 9),
        )
        for g in groups
    ]


def test_recipe_groups_per_dataset_and_per_source(tmp_path: Path, shard_root: Path) -> None:
    recipe = _recipe(tmp_path, shard_root)
    report = inspect_shards(groups_from_recipe(recipe, OPTIONS), OPTIONS)
    assert report.ok
    assert _rows(report.to_dict()) == GROUPS
    # the command: the same groups in --json, and each source's share in the table titles
    done = runner.invoke(app, ["inspect-shards", "--recipe", str(recipe), "--json"])
    assert done.exit_code == 0, done.output
    assert _rows(json.loads(done.stdout)) == GROUPS
    table = runner.invoke(app, ["inspect-shards", "--recipe", str(recipe), "--workers", "1"])
    assert table.exit_code == 0, table.output
    assert "laion/laion2b training (pairs, 70% of laion's samples)" in table.stdout
    assert "laion/datacomp eval (pairs, 30% of laion's samples)" in table.stdout
    assert "coyo eval (pairs)" in table.stdout and "mmc4 training (interleaved)" in table.stdout


def test_a_source_of_the_wrong_kind_is_named(tmp_path: Path, shard_root: Path) -> None:
    text = MIXTURE.replace(
        'eval_shards = "{root}/laion/{00001..00002}.tar"',
        'eval_shards = "{root}/mmc4/00001.tar"',
    )
    report = inspect_shards(
        groups_from_recipe(_recipe(tmp_path, shard_root, text), OPTIONS), OPTIONS
    )
    assert not report.ok
    (finding,) = [f for f in report.findings() if f.check == "kind"]
    assert finding.shard == str(shard_root / "mmc4" / "00001.tar")
    assert finding.reason == (
        "holds interleaved documents, but data.laion (source datacomp) expects image-text pairs"
    )


def test_nodes_reports_merge_with_their_sources(tmp_path: Path, shard_root: Path) -> None:
    recipe = _recipe(tmp_path, shard_root)
    paths = []
    for rank in range(2):
        options = InspectOptions(workers=1, partition=Partition(2, rank, "flags"))
        report = inspect_shards(groups_from_recipe(recipe, options), options)
        paths.append(tmp_path / f"node-{rank}.json")
        paths[-1].write_text(json.dumps(report.to_dict()), encoding="utf-8")
    merged = merge_reports([str(p) for p in paths], OPTIONS)
    assert _rows(merged.to_dict()) == GROUPS


def test_preview_per_dataset_and_per_source(tmp_path: Path, shard_root: Path) -> None:
    recipe = _recipe(tmp_path, shard_root)
    page = tmp_path / "preview.html"
    args = ["inspect-shards", "--recipe", str(recipe), "--preview", str(page), "--samples", "3"]
    done = runner.invoke(app, [*args, "--workers", "1", "--json"])
    assert done.exit_code == 0, done.output
    html = page.read_text(encoding="utf-8")
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", html)
    # eval shards that are training shards (laion2b, mmc4, coyo) are shown once; the blend has its own heading
    assert headings == [
        "laion (pairs): a blend of 2 sources",
        "laion/laion2b training (pairs): 3 of 8 samples",
        "laion/datacomp training (pairs): 3 of 8 samples",
        "laion/datacomp eval (pairs): 3 of 16 samples",
        "mmc4 training (interleaved): 3 of 4 samples",
        "coyo training (pairs): 3 of 8 samples",
    ]
    assert "samples drawn per source: laion2b 70%, datacomp 30%" in html
    # each source section shows its own shards' samples
    sections = html.split("<h2")
    assert "00000.tar" in sections[2] and "00001.tar" not in sections[2]
    assert "00001.tar" in sections[3] and "00000.tar" not in sections[3]
