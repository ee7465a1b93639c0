"""Our torch.distributed.checkpoint directories, read without running anything they hold.

DCP's `FileSystemReader` unpickles `.metadata` with plain pickle, and its default planner hands
every non-tensor item to `torch.load(weights_only=False)`: a crafted directory runs its code as
it loads. `CheckpointReader` reads the index through an unpickler that resolves only the
classes DCP writes into it and builds only their instances, checks it against the data files it
names (a truncated `.distcp` is found before any read), and decodes every non-tensor item with
torch's weights-only unpickler. Tensors are already read weights-only by DCP itself.

`load` is DCP's load through that reader; `fit` compares a load template with the index, so a
checkpoint of another model layout is named before DCP loads part of it (or fails deep inside).
"""

from __future__ import annotations

import functools
import io
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
import torch.serialization
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.futures import Future

from flamingo_cli.errors import CheckpointDamaged, CheckpointRefused, FlamingoError
from flamingo_cli.model.openflamingo import NotPlainData, load_plain

INDEX = ".metadata"

_NOT_OURS = (
    "the checkpoint was not written by flamingo (torch.distributed.checkpoint) or was crafted; "
    "nothing from it was run"
)
_REFUSED_FIX = (
    "do not use this directory: delete it unless you know who wrote it, and resume or evaluate "
    "a checkpoint that flamingo wrote"
)

# the classes a DCP index holds as instances (pickle may only fill in these)
_BUILT: tuple[type, ...] = (
    dcp_md.Metadata,
    dcp_md.TensorStorageMetadata,
    dcp_md.BytesStorageMetadata,
    dcp_md.ChunkStorageMetadata,
    dcp_md.TensorProperties,
    dcp_md.MetadataIndex,
    dcp_md.StorageMeta,
    _StorageInfo,
)


@functools.cache
def _allowed() -> dict[tuple[str, str], object]:
    """(module, name) -> object for every global a DCP index may name: its dataclasses, the
    memory-format enum, torch.Size, dtypes, layouts, memory formats, the path of the save."""
    paths = (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)
    objects: list[Any] = [
        *_BUILT,
        dcp_md._MEM_FORMAT_ENCODING,
        torch.Size,
        torch.serialization._get_layout,
        OrderedDict,
        *paths,
    ]
    allowed = {(o.__module__, o.__qualname__): o for o in objects}
    for path_class in paths:  # pathlib became a package (3.13): its older names too
        allowed["pathlib", path_class.__name__] = path_class
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            allowed["torch", name] = value
    return allowed


class _Refused(Exception):
    """The index names or builds something a DCP index never holds."""


class _IndexUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (its opcodes can be guarded) over the allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed().get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent reference")

    def _guarded_build(self) -> None:
        # BUILD sets the state of the object below it: only instances of DCP's dataclasses,
        # never a class or function (that would rewrite them for the whole process)
        target = self.stack[-2]  # type: ignore[attr-defined]
        if type(target) not in _BUILT:
            raise _Refused(f"state for a {type(target).__name__}")
        pickle._Unpickler.dispatch[pickle.BUILD[0]](cast(pickle.Unpickler, self))

    dispatch: ClassVar[dict[int, Callable[[pickle.Unpickler], None]]] = {
        **pickle._Unpickler.dispatch,
        pickle.BUILD[0]: cast(Callable[[pickle.Unpickler], None], _guarded_build),
    }


def _unpickle(file: Path, data: bytes) -> object:
    try:
        return _IndexUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise CheckpointRefused(
            f"{file} holds {exc}, which no checkpoint index holds: {_NOT_OURS}", fix=_REFUSED_FIX
        ) from None
    except RecursionError:
        raise CheckpointRefused(f"{file} nests too deeply: {_NOT_OURS}", fix=_REFUSED_FIX) from None
    except Exception as exc:  # a damaged pickle fails in many ways (EOF, bad opcode, types)
        raise CheckpointDamaged(
            f"{file} is damaged (truncated or overwritten): {type(exc).__name__}: {exc}"
        ) from None


def read_index(directory: Path) -> dcp_md.Metadata:
    """The checked DCP index of a checkpoint directory. Raises CheckpointRefused for anything
    DCP would not have written, CheckpointDamaged for a missing, empty or cut index or data."""
    file = directory / INDEX
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointDamaged(f"{file} is missing: the checkpoint has no index") from None
    except OSError as exc:
        raise CheckpointDamaged(f"cannot read {file}: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointDamaged(f"{file} is empty: the checkpoint has no index")
    index = _unpickle(file, data)
    problem = _index_problem(index)
    if problem is not None:
        raise CheckpointRefused(
            f"{file} is not a checkpoint index ({problem}): {_NOT_OURS}", fix=_REFUSED_FIX
        )
    index = cast(dcp_md.Metadata, index)
    _check_data_files(directory, index)
    return index


def _size(value: object) -> bool:
    return type(value) is torch.Size and all(type(n) is int and n >= 0 for n in value)


def _entry_problem(fqn: object, entry: object) -> str | None:
    if type(fqn) is not str:
        return "a key that is not a string"
    if type(entry) is dcp_md.BytesStorageMetadata:
        return None
    if type(entry) is not dcp_md.TensorStorageMetadata:
        return f"{fqn}: an entry of type {type(entry).__name__}"
    props = getattr(entry, "properties", None)
    if type(props) is not dcp_md.TensorProperties or not isinstance(
        getattr(props, "dtype", None), torch.dtype
    ):
        return f"{fqn}: no tensor properties"
    size, chunks = getattr(entry, "size", None), getattr(entry, "chunks", None)
    if not _size(size) or type(chunks) is not list:
        return f"{fqn}: no tensor size and chunks"
    for chunk in chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if type(chunk) is not dcp_md.ChunkStorageMetadata or not (_size(offsets) and _size(sizes)):
            return f"{fqn}: a malformed chunk"
        if not len(offsets) == len(sizes) == len(size):  # type: ignore[arg-type]
            return f"{fqn}: a chunk of another rank"
    return None


def _storage_problem(key: object, info: object, entries: Mapping[str, object]) -> str | None:
    if type(key) is not dcp_md.MetadataIndex or type(getattr(key, "fqn", None)) is not str:
        return "a storage key that is not an index"
    if key.fqn not in entries:
        return f"storage for {key.fqn!r}, which has no entry"
    offset = getattr(key, "offset", None)
    if offset is not None and not _size(offset):
        return f"{key.fqn}: a malformed offset"
    if type(info) is not _StorageInfo:
        return f"{key.fqn}: storage of type {type(info).__name__}"
    name = getattr(info, "relative_path", None)
    if type(name) is not str or not name or name in (".", "..") or "/" in name or "\\" in name:
        return f"{key.fqn}: a data file outside the directory ({name!r})"
    start, length = getattr(info, "offset", None), getattr(info, "length", None)
    if type(start) is not int or type(length) is not int or start < 0 or length < 0:
        return f"{key.fqn}: a malformed byte range"
    descriptors = getattr(info, "transform_descriptors", None)
    if descriptors is not None and not (
        isinstance(descriptors, list | tuple) and all(type(d) is str for d in descriptors)
    ):
        return f"{key.fqn}: malformed transforms"
    return None


def _index_problem(index: object) -> str | None:
    """Why `index` is not a DCP index of the shape DCP writes, or None."""
    if type(index) is not dcp_md.Metadata:
        return f"a {type(index).__name__}, not an index"
    entries = getattr(index, "state_dict_metadata", None)
    storage = getattr(index, "storage_data", None)
    if type(entries) is not dict or type(storage) is not dict:
        return "no entries or no storage table"
    for fqn, entry in entries.items():
        if (problem := _entry_problem(fqn, entry)) is not None:
            return problem
    for key, info in storage.items():
        if (problem := _storage_problem(key, info, entries)) is not None:
            return problem
    meta = getattr(index, "storage_meta", None)
    if meta is not None and type(meta) is not dcp_md.StorageMeta:
        return f"storage_meta of type {type(meta).__name__}"
    version = getattr(index, "version", None)
    if version is not None and type(version) is not str:
        return "a version that is not a string"
    planner_data = getattr(index, "planner_data", None)
    if planner_data is not None and type(planner_data) is not dict:
        return "planner data that is not a table"
    return None


def _check_data_files(directory: Path, index: dcp_md.Metadata) -> None:
    """Every data file the index names exists, is a regular file and is long enough."""
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointDamaged(f"{file} is missing: the checkpoint index names it")
        size = file.stat().st_size
        if size < end:
            raise CheckpointDamaged(
                f"{file} is truncated: {size} bytes, the checkpoint index needs {end}"
            )


class _WeightsOnlyBytes:
    """The load planner, except that non-tensor items are decoded weights-only (plain data:
    numbers, strings, lists, dicts, tensors) before the planner sees them, re-encoded."""

    def __init__(self, planner: LoadPlanner, directory: Path) -> None:
        self._planner = planner
        self._directory = directory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            item = load_plain(value)
        except NotPlainData as exc:
            raise CheckpointRefused(
                f"item {fqn!r} in {self._directory} is not plain data ({exc.reason}): "
                f"the checkpoint is damaged, or {_NOT_OURS}",
                fix=_REFUSED_FIX,
            ) from None
        clean = io.BytesIO()
        torch.save(item, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class CheckpointReader(FileSystemReader):
    """`FileSystemReader` over one of our checkpoint directories, reading it safely (above)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.directory = directory
        self._index: dcp_md.Metadata | None = None

    def index(self) -> dcp_md.Metadata:
        """The checked index, read once."""
        if self._index is None:
            self._index = read_index(self.directory)
        return self._index

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        if kwargs.get("rank") is not None:  # flamingo writes one global index, never per rank
            raise CheckpointDamaged(f"{self.directory / INDEX} is missing")
        index = self.index()
        if index.storage_meta is None:
            index.storage_meta = dcp_md.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        guarded = cast(LoadPlanner, _WeightsOnlyBytes(planner, self.directory))
        try:
            return super().read_data(plan, guarded)
        except FlamingoError:
            raise
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as exc:
            names = sorted({self.storage_data[i.storage_index].relative_path for i in plan.items})
            files = ", ".join(str(self.directory / n) for n in names)
            raise CheckpointDamaged(
                f"a tensor in {files} cannot be read ({type(exc).__name__}): the data files "
                f"of {self.directory} are damaged, or were not written by flamingo; nothing "
                "from them was run"
            ) from None


def load(state_dict: dict[str, Any], reader: CheckpointReader, *, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` through `reader`. The index is read (and checked)
    first, so its errors are ours; a FlamingoError on any rank is raised as itself, not as
    DCP's CheckpointException."""
    reader.index()
    try:
        dcp_load(state_dict, storage_reader=reader, no_dist=no_dist)
    except CheckpointException as exc:
        for error, _trace in exc.failures.values():
            if isinstance(error, FlamingoError):
                raise error from None
        raise


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """DCP's flat keys of a nested state dict: mappings and lists holding mappings or tensors
    are walked (`a.b.0.c`), anything else is one item."""

    def walk(path: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                yield from walk(f"{path}.{key}" if path else str(key), inner)
        elif isinstance(value, list) and any(
            isinstance(v, Mapping | list | torch.Tensor) for v in value
        ):
            for i, inner in enumerate(value):
                yield from walk(f"{path}.{i}", inner)
        else:
            yield path, value

    return dict(walk(prefix, tree))


@dataclass(frozen=True)
class Fit:
    """How a load template and a checkpoint index differ, keys without the common prefix."""

    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]  # "key: checkpoint (a, b), model (c, d)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)


def _shape(shape: tuple[int, ...] | None) -> str:
    return "not a tensor" if shape is None else str(shape)


def fit(template: Mapping[str, Any], index: dcp_md.Metadata, prefix: str) -> Fit:
    """Compare the flat `template` (keys under `prefix`) with the checkpoint's entries under
    `prefix`: keys on one side only, and tensors of another shape or items of another kind."""
    entries = index.state_dict_metadata
    saved = {k for k in entries if k.startswith(prefix)}
    missing = sorted(k for k in template if k not in entries)
    unexpected = sorted(saved - set(template))
    reshaped = []
    for key in sorted(set(template) & saved):
        value, entry = template[key], entries[key]
        ours = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        theirs = tuple(entry.size) if isinstance(entry, dcp_md.TensorStorageMetadata) else None
        if ours != theirs:
            reshaped.append(
                f"{key.removeprefix(prefix)}: checkpoint {_shape(theirs)}, model {_shape(ours)}"
            )
    strip = len(prefix)
    return Fit([k[strip:] for k in missing], [k[strip:] for k in unexpected], reshaped)
