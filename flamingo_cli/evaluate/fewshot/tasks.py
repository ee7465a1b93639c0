"""The few-shot tasks: what each reads, how it is prompted and scored, its decoding length."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flamingo_cli.errors import UsageError
from flamingo_cli.evaluate.fewshot.samples import TaskData, TaskKind


@dataclass(frozen=True)
class Task:
    """A benchmark: its kind (captioning or VQA) and OpenFlamingo's decoding length for it."""

    name: str
    kind: TaskKind
    max_new_tokens: int
    metric: str


TASKS = {
    t.name: t
    for t in (
        Task("coco", "caption", 20, "CIDEr"),
        Task("flickr30k", "caption", 20, "CIDEr"),
        Task("vqav2", "vqa", 5, "VQA accuracy"),
        Task("okvqa", "vqa", 5, "VQA accuracy"),
        Task("textvqa", "vqa", 5, "VQA accuracy"),
        Task("vizwiz", "vqa", 5, "VQA accuracy"),
    )
}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"--task {name!r} is not a task", fix=f"use one of {', '.join(TASKS)}")
    return TASKS[name]


def load_task(name: str, data: Path, coco_annotations: Path | None = None) -> TaskData:
    """The task's train and test splits from the files under `data`, as the dataset ships."""
    from flamingo_cli.evaluate.fewshot.captions import load_captions
    from flamingo_cli.evaluate.fewshot.vqa_files import load_vqa

    task = task_named(name)
    if not data.is_dir():
        raise UsageError(
            f"--data {data} is not a directory",
            fix="give the folder holding the dataset's annotation files and images",
        )
    if task.kind == "caption":
        return load_captions(name, data, coco_annotations)
    if coco_annotations is not None:
        raise UsageError(
            "--coco-annotations is for the captioning tasks (coco, flickr30k)",
            fix=f"leave it out for --task {name}",
        )
    return load_vqa(name, data)
