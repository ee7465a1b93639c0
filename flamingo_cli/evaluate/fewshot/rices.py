"""RICES (OpenFlamingo's `eval/rices.py`): demonstrations most similar to the test image.

Every train sample's image is embedded once by a CLIP vision encoder (an open_clip model of
its own, as OpenFlamingo, or the evaluated model's own vision encoder), L2-normalised; a test
sample's demonstrations are the train samples of highest cosine similarity, ordered so the
most similar comes last (next to the query). Features are cached to a file keyed by the
encoder and the train sample ids, and each rank embeds its share of the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flamingo_cli.errors import FlamingoError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flamingo_cli.evaluate.fewshot.samples import FewshotSample
    from flamingo_cli.model.factory import ImageTransform
    from flamingo_cli.runtime.distributed import DistInfo

OWN_ENCODER = "model"  # --rices-encoder model: the evaluated model's vision encoder


@dataclass(frozen=True)
class RicesConfig:
    """Which encoder embeds the images (an open_clip name and pretrained tag, or `model`) and
    where the train features are cached (None: not cached)."""

    encoder: str = "ViT-L-14"
    pretrained: str | None = None
    cache: Path | None = None

    @property
    def name(self) -> str:
        return self.encoder if self.encoder == OWN_ENCODER else f"{self.encoder}/{self.pretrained}"


@dataclass
class Rices:
    """The encoder, its transform and the train features (N, D), normalised."""

    encoder: nn.Module
    transform: ImageTransform
    train_ids: list[str]
    features: torch.Tensor
    info: DistInfo
    max_pixels: int
    seen: dict[str, torch.Tensor] = field(default_factory=dict)  # test features by sample id

    def nearest(self, queries: Sequence[FewshotSample], count: int) -> list[list[int]]:
        """Per query, the `count` most similar train indices, the most similar last.
        Collective: every rank calls it with the same queries."""
        import torch

        new = list({q.id: q for q in queries if q.id not in self.seen}.values())
        if new:
            features = embed(self, [q.image for q in new]).to(self.features.device)
            self.seen.update({q.id: f for q, f in zip(new, features, strict=True)})
        wanted = torch.stack([self.seen[q.id] for q in queries])
        order = (wanted @ self.features.T).argsort(dim=-1, descending=True)[:, :count]
        return [list(reversed(row)) for row in order.tolist()]


def build_rices(
    config: RicesConfig,
    own: tuple[nn.Module, ImageTransform],
    train: Sequence[FewshotSample],
    info: DistInfo,
    max_pixels: int,
) -> Rices:
    """The encoder named by `config` with every train image's features (from the cache when
    it holds this encoder's features of these train samples)."""
    import torch

    if config.encoder == OWN_ENCODER:
        encoder, transform = own
    else:
        from flamingo_cli.model.factory import build_vision_encoder

        encoder, transform, _ = build_vision_encoder(config.encoder, config.pretrained)
        encoder.to(info.device).eval()
    ids = [s.id for s in train]
    rices = Rices(encoder, transform, ids, torch.empty(0), info, max_pixels)
    cached = _read_cache(config, ids)
    rices.features = cached if cached is not None else embed(rices, [s.image for s in train])
    rices.features = rices.features.to(info.device)
    if cached is None and config.cache is not None and info.is_main:
        config.cache.parent.mkdir(parents=True, exist_ok=True)
        payload = {"encoder": config.name, "ids": ids, "features": rices.features.cpu()}
        torch.save(payload, config.cache)
    return rices


def _read_cache(config: RicesConfig, ids: list[str]) -> torch.Tensor | None:
    from flamingo_cli.model.openflamingo import NotPlainData, load_plain

    if config.cache is None or not config.cache.is_file():
        return None
    try:
        saved = load_plain(config.cache)
    except NotPlainData as exc:
        raise FlamingoError(
            f"cannot read the RICES feature cache {config.cache}: {exc.reason}",
            fix="delete the file; it is written again",
        ) from None
    if not isinstance(saved, dict) or saved.get("encoder") != config.name:
        return None
    if saved.get("ids") != ids:
        return None
    features: torch.Tensor = saved["features"]
    return features


def embed(rices: Rices, paths: Sequence[Path], batch: int = 64) -> torch.Tensor:
    """Normalised pooled features (len(paths), D); each rank embeds every world-size-th image
    and the parts are gathered (so every rank ends with all of them)."""
    import torch

    from flamingo_cli.evaluate.prompts import read_image

    info = rices.info
    mine = list(range(info.rank, len(paths), info.world_size))
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            pixels = torch.stack(
                [rices.transform(read_image(paths[i], rices.max_pixels)) for i in chunk]
            )
            parts.append(_pooled(rices.encoder(pixels.to(info.device))).float().cpu())
    found = torch.cat(parts) if parts else torch.empty(0)
    return _all_rows(found, mine, len(paths), info)


def _pooled(output: Any) -> torch.Tensor:
    """The pooled image embedding (open_clip towers with output_tokens return a pair)."""
    import torch.nn.functional as F

    pooled = output[0] if isinstance(output, tuple) else output
    return F.normalize(pooled.flatten(1), dim=-1)


def _all_rows(found: torch.Tensor, mine: list[int], total: int, info: DistInfo) -> torch.Tensor:
    if info.world_size == 1:
        return found
    import torch
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, (mine, found))
    width = next(f.shape[1] for _, f in gathered if f.numel())
    rows = torch.zeros(total, width)
    for positions, features in gathered:
        if positions:
            rows[positions] = features
    return rows
