"""`eval-fewshot` as a library call: read the task, load the checkpoint, and for each shot
count and trial caption or answer this rank's share of the test samples; rank 0 gathers every
prediction, scores it and writes it down (docs/formats.md §14).

Every rank computes the same trial plan (test samples, each one's demonstrations) and takes
every world-size-th row of it, so predictions do not depend on the rank count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from flamingo_cli.evaluate.fewshot.protocol import (
    CaptionTemplate,
    FewshotProtocol,
    check_protocol,
    demonstrations,
    evaluated_indices,
    postprocess,
    prompt_text,
    query_set,
    shuffled_images,
)
from flamingo_cli.evaluate.fewshot.report import FewshotReport, ShotResult
from flamingo_cli.evaluate.fewshot.rices import Rices, RicesConfig
from flamingo_cli.evaluate.fewshot.samples import FewshotSample, TaskData, check_images
from flamingo_cli.evaluate.fewshot.scoring import Score, score_answers, score_captions
from flamingo_cli.evaluate.fewshot.tasks import load_task, task_named
from flamingo_cli.evaluate.metrics.vqa import VqaVariant
from flamingo_cli.recipe.load import LoadedRecipe

if TYPE_CHECKING:
    from torch import Tensor

    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.model.flamingo import FlamingoModel
    from flamingo_cli.model.generation import DecodeConfig
    from flamingo_cli.runtime.distributed import DistInfo

Ablation = Literal["none", "shuffle"]  # as eval-loss: cross-attention off, or images swapped
PREDICTIONS = "predictions.jsonl"
DECODE_THREADS = 4
RESULTS = "results.json"


class FewshotEvents(Protocol):
    """What the evaluation reports while it runs (rank 0 only; the UI renders it)."""

    def trial_started(self, shots: int, trial: int, batches: int) -> None: ...

    def batch_done(self) -> None: ...

    def trial_done(self, shots: int, trial: int, score: float, ablated: float | None) -> None: ...


@dataclass(frozen=True)
class FewshotRequest:
    """What to evaluate: the task, its files, the protocol and where the results go."""

    task: str
    data: Path
    protocol: FewshotProtocol = field(default_factory=FewshotProtocol)
    coco_annotations: Path | None = None
    ablation: Ablation | None = None
    batch_size: int = 8
    out: Path | None = None  # results.json and predictions.jsonl; default <run>/eval-fewshot/T
    vqa_metric: VqaVariant = "openflamingo"
    rices: RicesConfig | None = None  # demonstrations by image similarity instead of drawn


@dataclass(frozen=True)
class Row:
    """One test sample of a trial with its demonstrations (train samples, prompt order)."""

    position: int
    sample: FewshotSample
    demos: tuple[FewshotSample, ...]
    image: Path  # the query image shown: the sample's own, or another's when shuffled


def prepare(request: FewshotRequest, max_pixels: int | None = None) -> TaskData:
    """Read and check the task's files before any model loads: layout, protocol, images
    (with `max_pixels`, their headers too: a bomb is refused here, not hours in)."""
    from flamingo_cli.errors import FlamingoError

    data = load_task(request.task, request.data, request.coco_annotations)
    check_protocol(request.protocol, len(data.train), str(data.files[0]))
    if not data.test:
        raise FlamingoError(
            f"{data.files[-1]}: the test split has no samples",
            fix="give the dataset's files with their test (or val) split",
        )
    _check_unique(data)
    for trial in range(request.protocol.trials):
        seed = request.protocol.trial_seed(trial)
        tests = evaluated_indices(len(data.test), request.protocol.num_samples, seed)
        check_images([data.test[i] for i in tests], "test", max_pixels)
        pool = query_set(len(data.train), request.protocol.query_set_size, seed)
        check_images([data.train[i] for i in pool], "train", max_pixels)
    if request.rices is not None:  # RICES looks at every train image
        check_images(data.train, "train", max_pixels)
    return data


def _check_unique(data: TaskData) -> None:
    """Test samples are scored by id: two with one id would be one prediction, silently."""
    from collections import Counter

    from flamingo_cli.evaluate.fewshot.samples import DatasetLayoutError

    repeated = [k for k, n in Counter(s.id for s in data.test).items() if n > 1]
    if repeated:
        vqav2 = len(data.files) == 4  # train questions, answers, test questions, answers
        named = data.files[2] if vqav2 else data.files[0 if data.kind == "caption" else -1]
        raise DatasetLayoutError(
            f"{named}: test sample id {repeated[0]} appears more than once "
            f"({len(repeated)} ids repeated)",
            fix="give each test question (or image) its own id, as the dataset ships them",
        )


def check_out(out: Path) -> None:
    """`out` can take results.json and predictions.jsonl, checked before the evaluation runs
    (so that hours of decoding are not lost to a read-only or misplaced folder)."""
    import tempfile

    from flamingo_cli.errors import OutputError

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write the results into {out}: {exc.strerror or exc}",
            fix="give a writable folder with --out",
        ) from None


def trial_rows(
    data: TaskData,
    protocol: FewshotProtocol,
    shots: int,
    trial: int,
    shuffle: bool = False,
    rices: Rices | None = None,
) -> list[Row]:
    """Every test row of a trial, the same on every rank (collective with `rices`)."""
    seed = protocol.trial_seed(trial)
    tests = [data.test[i] for i in evaluated_indices(len(data.test), protocol.num_samples, seed)]
    count = protocol.demos_for(shots)
    if rices is not None:
        chosen = rices.nearest(tests, count)
    else:
        pool = query_set(len(data.train), protocol.query_set_size, seed)
        chosen = [demonstrations(pool, count, seed, sample.id) for sample in tests]
    order = shuffled_images(len(tests), seed) if shuffle else list(range(len(tests)))
    return [
        Row(
            position,
            sample,
            tuple(data.train[j] for j in chosen[position]),
            tests[order[position]].image,
        )
        for position, sample in enumerate(tests)
    ]


@dataclass
class _Session:
    """The model and what decoding needs, on this rank."""

    model: FlamingoModel
    transform: ImageTransform
    tokenizer: Any
    info: DistInfo
    decode: DecodeConfig
    autocast: Callable[[], Any]
    max_pixels: int
    kind: str
    template: CaptionTemplate
    events: FewshotEvents | None = None
    rices: Rices | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)  # predictions.jsonl, rank 0
    scorers: set[str] = field(default_factory=set)  # how each trial was scored


def evaluate_fewshot(
    loaded: LoadedRecipe,
    checkpoint: str,
    request: FewshotRequest,
    events: FewshotEvents | None = None,
) -> FewshotReport | None:
    """Evaluate a checkpoint on a few-shot task on this process's rank; the report on rank 0
    (which also writes results.json and predictions.jsonl), None on the others."""
    from flamingo_cli.runtime.distributed import init_distributed, teardown
    from flamingo_cli.runtime.weights import resolve_checkpoint

    start = time.perf_counter()
    out = request.out or _default_out(loaded, request.task)
    data = prepare(request, loaded.recipe.data.max_image_pixels)
    check_out(out)
    source = resolve_checkpoint(loaded, checkpoint)
    info = init_distributed(loaded.recipe.distributed.timeout_s)
    try:
        session = _set_up(loaded, source, request, info, events)
        if request.rices is not None:
            session.rices = _rices(session, request.rices, data, out)
        results = tuple(_shot_result(session, data, request, s) for s in request.protocol.shots)
    finally:
        teardown()
    if not info.is_main:
        return None
    report = FewshotReport(
        recipe=str(loaded.path),
        checkpoint=str(source),
        weights=session.kind,
        task=request.task,
        layout=data.layout,
        files=tuple(str(f) for f in data.files),
        metric=task_named(request.task).metric,
        scorer="; ".join(sorted(session.scorers)),
        world_size=info.world_size,
        protocol={
            **request.protocol.to_dict(),
            "demonstrations": f"RICES ({request.rices.name})" if request.rices else "random",
        },
        ablation=request.ablation,
        results=results,
        predictions=str(out / PREDICTIONS),
        seconds=time.perf_counter() - start,
    )
    write_results(out, report, session.lines)
    return report


def _rices(session: _Session, config: RicesConfig, data: TaskData, out: Path) -> Rices:
    """RICES over the train split; features cached in `out` unless a cache file is given."""
    from dataclasses import replace

    from flamingo_cli.evaluate.fewshot.rices import build_rices

    if config.cache is None:
        config = replace(config, cache=out / f"rices-{config.name.replace('/', '-')}.pt")
    own = (session.model.vision_encoder, session.transform)
    return build_rices(config, own, data.train, session.info, session.max_pixels)


def _default_out(loaded: LoadedRecipe, task: str) -> Path:
    from flamingo_cli.runtime.run_dir import run_dir_of

    return run_dir_of(loaded) / "eval-fewshot" / task


def write_results(out: Path, report: FewshotReport, lines: Sequence[dict[str, Any]]) -> None:
    """`results.json` (the report) and `predictions.jsonl` (one prediction per line)."""
    from flamingo_cli.errors import OutputError

    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / PREDICTIONS).open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        (out / RESULTS).write_text(json.dumps(report.to_dict(), indent=2) + "\n", "utf-8")
    except OSError as exc:
        raise OutputError(
            f"cannot write the results into {out}: {exc.strerror or exc}",
            fix="give a writable folder with --out",
        ) from None


def _set_up(
    loaded: LoadedRecipe,
    source: Path,
    request: FewshotRequest,
    info: DistInfo,
    events: FewshotEvents | None,
) -> _Session:
    """The model as training built it with the checkpoint loaded over it, on this rank's
    device (a whole copy per rank: generation runs no collective), and the decoding settings."""
    from flamingo_cli.evaluate.generate import check_context
    from flamingo_cli.model.factory import build_model
    from flamingo_cli.model.generation import DecodeConfig
    from flamingo_cli.runtime.precision import autocast_for
    from flamingo_cli.runtime.weights import load_weights

    recipe = loaded.recipe
    model, transform, tokenizer, special = build_model(recipe.model, seed=recipe.run.seed)
    if recipe.model.init_from:
        load_weights(model, Path(recipe.model.init_from))
    kind = load_weights(model, source)
    model.to(info.device).eval()
    p = request.protocol
    decode = DecodeConfig(
        max_new_tokens=p.max_new_tokens or task_named(request.task).max_new_tokens,
        min_new_tokens=p.min_new_tokens,
        num_beams=p.num_beams,
        length_penalty=p.length_penalty,
        stop_token_ids=(special.endofchunk,),
        pad_token_id=special.pad,
    )
    check_context(model, 0, decode.max_new_tokens)  # before hours of decoding, not in them
    precision = recipe.run.precision
    return _Session(
        model,
        transform,
        tokenizer,
        info,
        decode,
        lambda: autocast_for(precision, info.device, "none"),
        recipe.data.max_image_pixels,
        kind,
        p.caption_template,
        events if info.is_main else None,
    )


def _shot_result(
    session: _Session, data: TaskData, request: FewshotRequest, shots: int
) -> ShotResult:
    """Every trial at one shot count (and its ablation), scored on rank 0."""
    scores: list[float] = []
    ablated: list[float] = []
    samples = 0
    for trial in range(request.protocol.trials):
        rows = trial_rows(data, request.protocol, shots, trial, rices=session.rices)
        samples = len(rows)
        batches = -(-len(rows[session.info.rank :: session.info.world_size]) // request.batch_size)
        if session.events:
            session.events.trial_started(shots, trial, batches * (2 if request.ablation else 1))
        score = _run_trial(session, data, request, rows, shots, trial, "with")
        scores.append(score)
        other = None
        if request.ablation is not None:
            shuffle = request.ablation == "shuffle"
            ablated_rows = trial_rows(
                data, request.protocol, shots, trial, shuffle, rices=session.rices
            )
            other = _run_trial(session, data, request, ablated_rows, shots, trial, request.ablation)
            ablated.append(other)
        if session.events:
            session.events.trial_done(shots, trial, score, other)
    return ShotResult(shots, tuple(scores), samples, tuple(ablated) if ablated else None)


def _run_trial(
    session: _Session,
    data: TaskData,
    request: FewshotRequest,
    rows: list[Row],
    shots: int,
    trial: int,
    images: str,
) -> float:
    """This rank's share of a trial's rows decoded; all of them gathered and scored on rank 0
    (the others get 0.0: only rank 0 reports)."""
    info = session.info
    mine = rows[info.rank :: info.world_size]
    found: list[tuple[int, str, str]] = []
    for batch in _batches(mine, request.batch_size):
        found += _decode_batch(session, data, batch, shots, images)
        if session.events:
            session.events.batch_done()
    everything = _gather(found, info)
    if not info.is_main:
        return 0.0
    by_position = {position: (raw, text) for position, raw, text in everything}
    seed = request.protocol.trial_seed(trial)
    predictions = {rows[p].sample.id: by_position[p][1] for p in sorted(by_position)}
    score = _score(data, request, predictions)
    for row in rows:
        raw, _ = by_position[row.position]
        text = score.scored.get(row.sample.id, by_position[row.position][1])
        prompt = prompt_text(data.kind, row.demos, row.sample, shots, session.template)
        session.lines.append(_line(data, row, shots, trial, seed, images, prompt, (raw, text)))
    session.scorers.add(score.scorer)
    return score.value


def _batches(rows: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _decode_batch(
    session: _Session, data: TaskData, batch: Sequence[Row], shots: int, images: str
) -> list[tuple[int, str, str]]:
    """(position, generated text, post-processed prediction) of each row of a batch."""
    import torch

    from flamingo_cli.evaluate.prompts import encode_prompts
    from flamingo_cli.model.generation import generate
    from flamingo_cli.runtime.memory import memory_named

    template = session.template
    texts = [prompt_text(data.kind, row.demos, row.sample, shots, template) for row in batch]
    pixels = _pixels(session, batch, shots, images)
    input_ids, mask = encode_prompts(session.tokenizer, texts)
    device = session.info.device
    what = f"decoding {len(batch)} prompt(s) of {input_ids.shape[1]} tokens ({shots} shots)"
    fix = "lower --batch-size or --num-beams (or the --shots)"
    with torch.no_grad(), session.autocast(), memory_named(what, fix, device):
        tokens = generate(
            session.model,
            pixels.to(device),
            input_ids.to(device),
            mask.to(device),
            session.decode,
        )
    raws = session.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [
        (row.position, raw, postprocess(data.kind, raw))
        for row, raw in zip(batch, raws, strict=True)
    ]


def _pixels(session: _Session, batch: Sequence[Row], shots: int, images: str) -> Tensor:
    """The batch's images, (B, N, 3, H, W): the demonstrations' (none at 0 shots) then the
    query's; none at all when the images are removed. Decoded and transformed on a few
    threads (a 32-shot batch of 8 reads 264 images)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from flamingo_cli.evaluate.prompts import image_batch, read_image

    def tensor(path: Path) -> Tensor:
        return session.transform(read_image(path, session.max_pixels))

    if images == "none":
        probe = tensor(batch[0].image)
        return image_batch([[] for _ in batch], session.transform, tuple(probe.shape))
    paths = [[*(d.image for d in (row.demos if shots > 0 else ())), row.image] for row in batch]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        done = [list(pool.map(tensor, row)) for row in paths]
    return torch.stack([torch.stack(row) for row in done])  # every row has shots + 1 images


def _gather(found: list[tuple[int, str, str]], info: DistInfo) -> list[tuple[int, str, str]]:
    """Every rank's decoded rows, on every rank."""
    if info.world_size == 1:
        return found
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, found)
    return [item for part in gathered for item in part]


def _score(data: TaskData, request: FewshotRequest, predictions: dict[str, str]) -> Score:
    tested = {s.id: s for s in data.test}
    if data.kind == "caption":
        refs = {k: data.references_of(tested[k]) for k in predictions}
        return score_captions(predictions, refs)
    answers = {k: tested[k].entries or tested[k].answers for k in predictions}
    return score_answers(request.task, predictions, answers, request.vqa_metric)


def _line(
    data: TaskData,
    row: Row,
    shots: int,
    trial: int,
    seed: int,
    images: str,
    prompt: str,
    output: tuple[str, str],
) -> dict[str, Any]:
    """One line of predictions.jsonl: the sample, its prompt, what the model wrote and the
    prediction scored."""
    return {
        "task": data.task,
        "shots": shots,
        "trial": trial,
        "seed": seed,
        "images": images,
        "id": row.sample.id,
        "image": str(row.image),
        "prompt": prompt,
        "demonstrations": [d.id for d in row.demos],
        "generated": output[0],
        "prediction": output[1],
        "references": list(data.references_of(row.sample)),
    }
