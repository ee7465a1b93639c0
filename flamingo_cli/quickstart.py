"""`flamingo quickstart` as a library call: the whole path on a CPU, offline, in minutes.

Generates a small raw MMC4 download (zipped jsonl + image folder) and a folder of captioned
images whose captions name what the image shows (colour and shape), converts both, inspects
the shards, validates the bundled tiny recipe pointed at them, trains it in this process, and
evaluates held-out samples with and without images. The caption loss with images must come out
clearly below the loss without them: the model has learnt to look at the pictures. Last, it
captions held-out images in the COCO Karpathy layout as `eval-fewshot` does, with the CIDEr
with and without images.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flamingo_cli.errors import FlamingoError, OutputError, UsageError
from flamingo_cli.recipe.load import Override

if TYPE_CHECKING:
    from flamingo_cli.evaluate.fewshot.report import FewshotReport
    from flamingo_cli.evaluate.fewshot.runner import FewshotRequest
    from flamingo_cli.evaluate.loss import EvalEvents
    from flamingo_cli.evaluate.run import EvalReport
    from flamingo_cli.train.run import TrainEvents

MARKER = ".flamingo-quickstart"


def bundled_recipe() -> Path:
    """recipes/tiny-cpu.toml of the source tree this package runs from."""
    return Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.toml"


@dataclass(frozen=True)
class QuickstartSettings:
    """Sizes and training knobs; the defaults finish in a few minutes on 2 CPU cores."""

    seed: int = 0
    caption_images: int = 512  # training image-caption pairs
    heldout_images: int = 64
    image_size: int = 32
    image_noise: int = 12
    mmc4_shards: int = 2
    mmc4_docs_per_shard: int = 32
    heldout_docs: int = 16
    epochs: int = 5
    laion_batch: int = 16
    mmc4_batch: int = 4
    lr: float = 3e-3
    warmup_steps: int = 10
    min_gap: float = 0.3  # nats per caption token the images must be worth
    caption_demo_images: int = 16  # train split of the captioning set (its demonstrations)
    caption_test_images: int = 8  # held-out images the last stage captions

    @property
    def laion_per_epoch(self) -> int:
        return self.caption_images // 2

    @property
    def batches_per_epoch(self) -> int:
        return self.laion_per_epoch // self.laion_batch


@dataclass(frozen=True)
class StageResult:
    name: str
    summary: str
    seconds: float


@dataclass(frozen=True)
class Caption:
    """One held-out image of the captioning stage: its true caption and the model's, with its
    images and with them removed."""

    image: str
    reference: str
    caption: str
    without_images: str


@dataclass
class QuickstartResult:
    """What every stage did, the held-out losses, and whether images made the difference."""

    directory: Path
    recipe: Path
    overrides: list[str]
    stages: list[StageResult] = field(default_factory=list)
    evaluation: EvalReport | None = None
    min_gap: float = 0.3
    captioning: FewshotReport | None = None
    captions: list[Caption] = field(default_factory=list)

    @property
    def caption_gap(self) -> float | None:
        """Held-out LAION loss without images minus with images, nats per target token."""
        if self.evaluation is None:
            return None
        return next((d.gap for d in self.evaluation.datasets if d.dataset == "laion"), None)

    @property
    def passed(self) -> bool:
        gap = self.caption_gap
        return gap is not None and gap >= self.min_gap

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "recipe": str(self.recipe),
            "overrides": self.overrides,
            "stages": [vars(s) for s in self.stages],
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
            "captioning": self.captioning.to_dict() if self.captioning else None,
            "captions": [vars(c) for c in self.captions],
            "caption_gap": self.caption_gap,
            "min_gap": self.min_gap,
            "passed": self.passed,
            "seconds": self.seconds,
        }


StageCallback = Callable[[str, str], None]


def prepare_directory(directory: Path) -> None:
    """Create `directory`, or clear a previous quickstart in it; refuse anything else."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--dir {directory} is a file", fix="give a directory path")
    blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(
            f"--dir {directory} cannot be made: {blocker} is a file, not a directory",
            fix="give a directory path whose parents are directories",
        )
    if directory.is_dir() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise UsageError(
                f"--dir {directory} is not empty and holds no earlier quickstart",
                fix="give a new or empty directory with --dir",
            )
        for name in ("raw", "shards", "runs"):
            shutil.rmtree(directory / name, ignore_errors=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).write_text("flamingo quickstart\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(
            f"cannot write in --dir {directory}: {exc.strerror or exc}",
            fix="give a writable directory with --dir",
        ) from None


def write_caption_folder(
    folder: Path, count: int, seed: int, size: int, noise: int
) -> dict[str, int]:
    """`count` PNG images of one coloured shape with same-stem `.txt` captions ("a red
    circle"), as `convert laion` reads a folder; returns how often each caption occurs."""
    from flamingo_cli.synthetic import COLORS, SHAPES, encode, shape_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"quickstart-captions-{seed}")
    seen: dict[str, int] = {}
    for i in range(count):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        caption = f"a {color} {shape}"
        seen[caption] = seen.get(caption, 0) + 1
        image = shape_image(color, shape, size, rng, noise=noise)
        (folder / f"{i:05d}.png").write_bytes(encode(image, "PNG"))
        (folder / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    return seen


def _spec(directory: Path) -> str:
    shards = sorted(directory.glob("*.tar"))
    if not shards:
        raise FlamingoError(f"the conversion wrote no shard into {directory}")
    return "::".join(str(p) for p in shards)


def quickstart_overrides(
    settings: QuickstartSettings, shards: dict[str, str], runs: Path
) -> list[Override]:
    """The tiny recipe pointed at the generated shards, sized for a few minutes of training,
    with every parameter trainable (random tiny backbones must learn to see and to write)."""
    s = settings
    values: dict[str, object] = {
        "model.train_backbones": True,
        "data.laion.shards": shards["laion"],
        "data.laion.eval_shards": shards["laion-heldout"],
        "data.laion.batch_size": s.laion_batch,
        "data.laion.train_num_samples": s.laion_per_epoch,
        "data.laion.loss_multiplier": 1.0,
        "data.laion.shuffle_buffer": 256,
        "data.laion.shuffle_initial": 64,
        "data.mmc4.shards": shards["mmc4"],
        "data.mmc4.eval_shards": shards["mmc4-heldout"],
        "data.mmc4.batch_size": s.mmc4_batch,
        "data.mmc4.max_num_images": 2,
        "data.mmc4.train_num_samples": s.batches_per_epoch * s.mmc4_batch,
        "optim.lr": s.lr,
        "optim.warmup_steps": s.warmup_steps,
        "run.output_dir": str(runs),
        "run.num_epochs": s.epochs,
        "run.seed": s.seed,
        "run.log_every": max(1, s.batches_per_epoch // 2),
        "run.keep_last": 1,
        "run.resume": "none",
    }
    return [Override(k, v, "from quickstart") for k, v in values.items()]


# Each stage: its name (a method of _Stages) and what it runs, announced as it starts.
_STAGE_WORK = {
    "generate": "raw MMC4 zips + image folder, captioned images",
    "convert": "flamingo convert mmc4 / laion",
    "inspect": "flamingo inspect-shards",
    "validate": "flamingo validate-config recipes/tiny-cpu.toml",
    "train": "flamingo train (one process, CPU)",
    "evaluate": "flamingo eval-loss --ablate-images none",
    "caption": "flamingo eval-fewshot --task coco --shots 0 --ablate-images none",
}
STAGES = tuple(_STAGE_WORK)


def _recipe_file(recipe: Path | None) -> Path:
    """The recipe the quickstart trains: `recipe`, else the bundled tiny one; it must exist."""
    recipe = recipe or bundled_recipe()
    if not recipe.is_file():
        raise UsageError(
            f"the tiny recipe {recipe} is not there (the quickstart runs from a source checkout)",
            fix="run from a clone installed with `pip install -e .`, or give --recipe PATH",
        )
    return recipe


def train_run(directory: Path, recipe: Path | None = None) -> tuple[str, Path]:
    """The run name and run directory the train stage writes (the recipe's run.name under
    DIRECTORY/runs): what the live view names, and where it finds the checkpoints."""
    from flamingo_cli.recipe.load import load_recipe

    name = load_recipe(_recipe_file(recipe)).recipe.run.name
    return name, directory.resolve() / "runs" / name


def run_quickstart(
    directory: Path,
    *,
    recipe: Path | None = None,
    settings: QuickstartSettings = QuickstartSettings(),
    on_stage: StageCallback | None = None,
    on_stage_done: Callable[[StageResult], None] | None = None,
    train_events: TrainEvents | None = None,
    eval_events: EvalEvents | None = None,
) -> QuickstartResult:
    """Run every stage in `directory`; `on_stage(name, what)` announces a stage and
    `on_stage_done` reports its summary. Raises FlamingoError when a stage fails."""
    recipe = _recipe_file(recipe)
    directory = directory.resolve()
    prepare_directory(directory)
    stages = _Stages(directory, recipe, settings, train_events, eval_events)
    for name, what in _STAGE_WORK.items():
        if on_stage is not None:
            on_stage(name, what)
        start = time.perf_counter()
        summary = getattr(stages, name)()
        done = StageResult(name, summary, time.perf_counter() - start)
        stages.result.stages.append(done)
        if on_stage_done is not None:
            on_stage_done(done)
    return stages.result


class _Stages:
    """The quickstart's stages in order, each a method returning its one-line summary; what a
    stage makes (shard specs, overrides, the evaluation) is kept for the later ones."""

    def __init__(
        self,
        directory: Path,
        recipe: Path,
        settings: QuickstartSettings,
        train_events: TrainEvents | None,
        eval_events: EvalEvents | None,
    ) -> None:
        self.directory, self.recipe, self.s = directory, recipe, settings
        self.raw, self.out = directory / "raw", directory / "shards"
        self.train_events, self.eval_events = train_events, eval_events
        self.result = QuickstartResult(directory, recipe, [], min_gap=settings.min_gap)
        self.shards: dict[str, str] = {}
        self.overrides: list[Override] = []

    def generate(self) -> str:
        from flamingo_cli.synthetic import write_raw_mmc4

        s, raw = self.s, self.raw
        captions = write_caption_folder(
            raw / "captions", s.caption_images, s.seed, s.image_size, s.image_noise
        )
        write_caption_folder(
            raw / "captions-heldout", s.heldout_images, s.seed + 1, s.image_size, s.image_noise
        )
        docs = write_raw_mmc4(
            raw / "mmc4", shards=s.mmc4_shards, docs_per_shard=s.mmc4_docs_per_shard, seed=s.seed
        )
        held = write_raw_mmc4(
            raw / "mmc4-heldout", shards=1, docs_per_shard=s.heldout_docs, seed=s.seed + 1
        )
        return (
            f"{s.caption_images} + {s.heldout_images} held-out captioned images "
            f"({len(captions)} distinct captions); {len(docs.zips)} + {len(held.zips)} MMC4 "
            f"zips with {docs.images_written + held.images_written} images"
        )

    def convert(self) -> str:
        from flamingo_cli.convert.laion import LaionOptions, convert_laion
        from flamingo_cli.convert.mmc4 import Mmc4Options, convert_mmc4
        from flamingo_cli.convert.runner import RunOptions

        raw, out = self.raw, self.out
        samples = 0
        for name, folder in (("laion", "captions"), ("laion-heldout", "captions-heldout")):
            report = convert_laion(
                str(raw / folder), out / name, LaionOptions(), RunOptions(workers=1)
            )
            samples += sum(sh.samples for r in report.records for sh in r.shards)
            self.shards[name] = _spec(out / name)
        docs = 0
        for name in ("mmc4", "mmc4-heldout"):
            zips = sorted((raw / name / "docs").glob("*.zip"))
            options = Mmc4Options(image_dir=str(raw / name / "images"))
            report = convert_mmc4(
                "::".join(str(z) for z in zips), out / name, options, RunOptions(workers=1)
            )
            docs += sum(sh.samples for r in report.records for sh in r.shards)
            self.shards[name] = _spec(out / name)
        return f"{samples} pairs and {docs} documents into {out}"

    def inspect(self) -> str:
        from flamingo_cli.inspect.run import InspectOptions, groups_from_specs, inspect_shards

        options = InspectOptions(workers=1)
        report = inspect_shards(groups_from_specs(list(self.shards.values()), options), options)
        if not report.ok:
            raise FlamingoError(
                f"inspect-shards found {report.errors} error(s) in the generated shards",
                fix=f"run `flamingo inspect-shards {self.out}` to see them",
            )
        total = sum(g.total("samples") for g in report.groups)
        return f"{len(report.unique_shards())} shards, {total} samples, no errors"

    def validate(self) -> str:
        from flamingo_cli.recipe.validate import validate_recipe

        s = self.s
        self.overrides.extend(quickstart_overrides(s, self.shards, self.directory / "runs"))
        self.result.overrides = [f"{o.key}={o.value}" for o in self.overrides]
        report = validate_recipe(self.recipe, self.overrides, check_shards=True)
        errors = [p for p in report.problems if p.severity == "error"]
        if errors:
            raise FlamingoError(
                f"the tiny recipe does not validate with the quickstart overrides: "
                f"{errors[0].key}: {errors[0].message}"
            )
        plan = report.plan
        return (
            f"{self.recipe.name}: {plan.total_optimizer_steps} optimizer steps "
            f"({s.epochs} epochs), world size {plan.world_size}"
        )

    def train(self) -> str:
        from flamingo_cli.recipe.load import load_recipe
        from flamingo_cli.train.run import train_rank

        outcome = train_rank(load_recipe(self.recipe, self.overrides), self.train_events)
        losses = {k: v for k, v in outcome.metrics.items() if k.startswith("loss/")}
        shown = ", ".join(f"{k.removeprefix('loss/')} {v:.3f}" for k, v in losses.items())
        return f"{outcome.step} steps, last losses {shown}"

    def evaluate(self) -> str:
        from flamingo_cli.evaluate.run import evaluate_loss
        from flamingo_cli.recipe.load import load_recipe

        self.result.evaluation = evaluate_loss(
            load_recipe(self.recipe, self.overrides),
            "latest",
            ablation="none",
            events=self.eval_events,
        )
        gap = self.result.caption_gap
        return f"caption loss gap {gap:.3f} nats per token" if gap is not None else "no gap"

    def caption(self) -> str:
        from flamingo_cli.evaluate.fewshot.runner import evaluate_fewshot
        from flamingo_cli.recipe.load import load_recipe
        from flamingo_cli.synthetic import write_coco_karpathy

        s = self.s
        data = self.raw / "coco"
        write_coco_karpathy(
            data,
            train=s.caption_demo_images,
            test=s.caption_test_images,
            seed=s.seed + 2,
            size=s.image_size,
            noise=s.image_noise,
        )
        report = evaluate_fewshot(
            load_recipe(self.recipe, self.overrides),
            "latest",
            caption_request(data, self.directory / "runs" / "eval-fewshot"),
        )
        assert report is not None  # one process: rank 0
        self.result.captioning = report
        self.result.captions = read_captions(Path(str(report.predictions)))
        shot = report.results[0]
        return (
            f"{shot.samples} held-out images, CIDEr {shot.mean:.1f} with images, "
            f"{shot.ablated_mean or 0.0:.1f} without"
        )


def caption_request(data: Path, out: Path) -> FewshotRequest:
    """How the last stage captions: 0 shots with no text-only demonstrations and LAION's
    prompt `<image>`, the text the tiny model trained on (it never saw OpenFlamingo's
    `Output:` prompts or demonstrations); beam search 3, as eval-fewshot decodes."""
    from flamingo_cli.evaluate.fewshot.protocol import FewshotProtocol
    from flamingo_cli.evaluate.fewshot.runner import FewshotRequest

    protocol = FewshotProtocol(shots=(0,), zero_shot_demos=0, caption_template="laion")
    return FewshotRequest("coco", data, protocol, ablation="none", out=out)


def read_captions(predictions: Path) -> list[Caption]:
    """Each captioned image with its reference, from eval-fewshot's predictions.jsonl."""
    import json

    lines = [json.loads(line) for line in predictions.read_text("utf-8").splitlines()]
    without = {line["id"]: line["prediction"] for line in lines if line["images"] == "none"}
    return [
        Caption(
            line["image"],
            line["references"][0],
            line["prediction"].strip(),
            without.get(line["id"], "").strip(),
        )
        for line in lines
        if line["images"] == "with"
    ]
