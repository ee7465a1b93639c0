"""The recipe as pydantic models: every knob of an OpenFlamingo training run, grouped."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
ShardSpec = str | list[str]

Precision = Literal["fp32", "bf16", "amp_bf16", "fp16"]
Strategy = Literal["fsdp", "ddp", "none"]
Sharding = Literal["full", "hybrid"]

# 40 megapixels (a 7300x5500 camera photo, 120 MB of RGB per decode); see data/image_limits.py
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class _Section(BaseModel):
    # TOML has inf and nan literals: no recipe value may be either (lr = inf trains on NaN)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Vision encoder, language model and the Flamingo layers that join them."""

    preset: Literal["tiny"] | None = Field(
        None, description="bundled offline model; replaces vision_encoder, lm_path, tokenizer_path"
    )
    vision_encoder: str = Field("ViT-L-14", description="open_clip model name")
    vision_pretrained: str | None = Field(
        "openai",
        description='open_clip pretrained tag, a local weights file, or "none" for random weights',
    )
    lm_path: str | None = Field(None, description="Hugging Face LM name or local directory")
    tokenizer_path: str | None = Field(None, description="defaults to lm_path")
    trust_remote_code: bool = False
    cross_attn_every_n_layers: PositiveInt = 1
    freeze_lm_embeddings: bool = False
    train_backbones: bool = Field(
        False, description="train every parameter, backbones included (tiny CPU quickstart)"
    )
    gradient_checkpointing: bool = False
    init_from: str | None = Field(
        None, description="OpenFlamingo or flamingo checkpoint to fine-tune from (not a resume)"
    )


# dataset and source names end up in metric keys (`loss/NAME`, `samples/NAME/SOURCE`)
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
Kind = Literal["pairs", "interleaved"]
KINDS: tuple[Kind, ...] = ("pairs", "interleaved")
# the two datasets of OpenFlamingo's step, whose kind is implied by their name (docs/formats.md §5.10)
IMPLIED_KINDS: dict[str, Kind] = {"laion": "pairs", "mmc4": "interleaved"}


def _check_name(value: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter and hold only letters, digits, _ and - "
            "(at most 64): it becomes part of metric names"
        )
    return value


class SourceConfig(_Section):
    """One weighted source of a blended dataset (docs/formats.md §5.10)."""

    name: str = Field(description="names the source in metrics and the plan")
    shards: ShardSpec = Field(description="brace pattern(s) of this source's .tar shards")
    eval_shards: ShardSpec | None = None
    weight: Annotated[float, Field(gt=0)] = Field(
        1.0, description="share of the dataset's samples drawn from this source, relative"
    )
    resampled: bool | None = Field(None, description="defaults to the dataset's resampled")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_name(value, "source name")


@dataclass(frozen=True)
class Source:
    """A source as the loaders use it: a blend's entry, or a dataset's own `shards`."""

    name: str
    shards: ShardSpec
    eval_shards: ShardSpec | None
    weight: float
    resampled: bool
    blended: bool  # given in [[data.NAME.sources]] (metrics and the plan name it)


class _DatasetConfig(_Section):
    shards: ShardSpec | None = Field(
        None, description="brace pattern(s) of .tar shards; join several with ::"
    )
    sources: list[SourceConfig] | None = Field(
        None, description="a weighted blend of sources instead of shards"
    )
    eval_shards: ShardSpec | None = None
    batch_size: PositiveInt = 128
    train_num_samples: PositiveInt = Field(10000, description="samples per epoch (not a data pass)")
    workers: NonNegativeInt = 1
    resampled: bool = Field(False, description="draw shards with replacement")
    loss_multiplier: Annotated[float, Field(ge=0)] = 1.0
    shuffle_buffer: NonNegativeInt = 5000
    shuffle_initial: NonNegativeInt = 1000
    prefetch_factor: PositiveInt = 2
    fast_images: bool = Field(
        True,
        description="decode JPEGs at a reduced scale (PIL draft mode) no smaller than the "
        "vision encoder's input and resize with torch's uint8 kernels; several times faster, "
        "pixels differ slightly; false reproduces OpenFlamingo's pixels exactly",
    )

    def source_list(self, dataset: str) -> list[Source]:
        """The sources the loaders read: the blend, or one source named after the dataset."""
        if self.sources:
            return [
                Source(
                    s.name,
                    s.shards,
                    s.eval_shards,
                    s.weight,
                    self.resampled if s.resampled is None else s.resampled,
                    blended=True,
                )
                for s in self.sources
            ]
        if self.shards is None:
            return []
        return [Source(dataset, self.shards, self.eval_shards, 1.0, self.resampled, blended=False)]


class PairsConfig(_DatasetConfig):
    """Image-caption pairs (img2dataset layout), such as LAION, COYO or CC12M."""

    kind: Literal["pairs"] = "pairs"
    max_tokens: PositiveInt = 32


class InterleavedConfig(_DatasetConfig):
    """Interleaved documents (MMC4, OBELICS and ChatGPT-generated sequences)."""

    kind: Literal["interleaved"] = "interleaved"
    max_tokens: PositiveInt = 256
    textsim_threshold: float = Field(0.24, description="minimum CLIP image-sentence similarity")
    min_num_images: PositiveInt = 1
    max_num_images: PositiveInt = 6
    assignment: Literal["hungarian", "argmax"] = "hungarian"


DatasetConfig = PairsConfig | InterleavedConfig
# a dataset table under any other name says its kind
_NamedDataset = Annotated[PairsConfig | InterleavedConfig, Field(discriminator="kind")]
KIND_MODELS: dict[str, type[PairsConfig] | type[InterleavedConfig]] = {
    "pairs": PairsConfig,
    "interleaved": InterleavedConfig,
}


class DataConfig(_Section):
    """`[data.laion]`, `[data.mmc4]` and `[data.NAME]` tables, and the loaders' shared limits."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    __pydantic_extra__: dict[str, _NamedDataset] = Field(init=False)

    laion: PairsConfig | None = None
    mmc4: InterleavedConfig | None = None
    allow_pipe: bool = Field(False, description="allow `pipe:` shard specs (runs shell commands)")
    max_image_pixels: PositiveInt = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        description="images declaring more pixels (width x height) are skipped as damaged",
    )

    def named(self) -> dict[str, DatasetConfig]:
        """The datasets in step order: laion, mmc4, then the others in recipe order."""
        found: dict[str, DatasetConfig] = {}
        if self.laion is not None:
            found["laion"] = self.laion
        if self.mmc4 is not None:
            found["mmc4"] = self.mmc4
        found.update(self.__pydantic_extra__ or {})
        return found


class OptimConfig(_Section):
    lr: Annotated[float, Field(gt=0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 5000
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0


class RunConfig(_Section):
    name: str = "flamingo"
    output_dir: str = Field("runs", description="the run lives in output_dir/name")
    seed: int = 42
    num_epochs: PositiveInt = 1
    precision: Precision = "fp32"
    log_every: PositiveInt = Field(100, description="optimizer steps between metric lines")
    eval_every: NonNegativeInt = Field(0, description="optimizer steps between evals; 0: never")
    checkpoint_every: NonNegativeInt = Field(
        0, description="optimizer steps between checkpoints; 0: at epoch ends only"
    )
    keep_last: NonNegativeInt = Field(3, description="checkpoints to keep; 0 keeps all")
    resume: str = Field("auto", description='"auto", "none" or a checkpoint path')
    compile: bool = Field(
        False, description="torch.compile each repeated block (vision, perceiver, decoder layer)"
    )
    peak_tflops: Annotated[float, Field(gt=0)] | None = Field(
        None, description="peak bf16 TFLOP/s of one device, for mfu; default: known GPUs' table"
    )


class DistributedConfig(_Section):
    strategy: Strategy = "fsdp"
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    sharding: Sharding = "full"
    timeout_s: PositiveInt = 1800

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class LoggingConfig(_Section):
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    save_checkpoints_to_wandb: bool = False
    tensorboard: bool = Field(
        False, description="also write TensorBoard event files to <run>/tensorboard"
    )


class Recipe(_Section):
    """A whole training recipe; each section has OpenFlamingo's defaults unless noted."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    distributed: DistributedConfig = DistributedConfig()
    logging: LoggingConfig = LoggingConfig()

    def datasets(self) -> dict[str, DatasetConfig]:
        """The configured datasets by name in the order of the training step (laion, mmc4,
        then the others in recipe order; docs/formats.md §5.10)."""
        return self.data.named()
