"""Reading tar shards: webdataset's key rule and a fast header scanner.

The scanner parses the 512-byte headers itself: on local files it jumps from header to header
with positioned reads, without touching member data; other URLs are streamed. What shard
writers emit (ustar, GNU long names, pax headers) is listed by a compiled walk when the package
was built with a C compiler (`_tarlist`); anything else (damage, name prefixes, odd numbers),
and every archive without it, takes the general walk here. It never stops quietly: a damaged
archive ends the scan with the byte offset and the reason.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal, NamedTuple, TypeVar

from flamingo_cli.errors import OpenerError
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.spec import local_path, url_kind

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

ListPlain = Callable[[int, int], "tuple[int, bytes, bytes, bytes, bytes, bytes, bytes] | None"]
_list_plain: ListPlain | None
try:
    from flamingo_cli.shards._tarlist import list_plain as _list_plain
except ImportError:  # built without a C compiler: the general walk lists every archive
    _list_plain = None

_T = TypeVar("_T")

BLOCK = 512
_CHUNK = 1 << 20
_REGULAR = (b"0", b"\0", b"7")
_REGULAR_CODES = (48, 0, 55)  # the same type flags as byte values
_PLAIN = frozenset((48, 0))
_CHECKSUM_BATCH = 1024
_WINDOW = 4096  # bytes read at a header: it and the small members after it

DamageKind = Literal["truncated", "corrupt"]


def split_member(name: str) -> tuple[str, str]:
    """Split a member name into (sample key, extension) at the first dot of its file name.

    This is webdataset's rule, so `a/b.c/x.y.jpg` gives key `a/b.c/x` and extension `y.jpg`.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def is_utf8(name: str) -> bool:
    """Whether a member name read with `surrogateescape` was valid UTF-8 in the archive."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """A member name fit for messages and JSON: bytes that are not UTF-8 as `\\xNN` escapes."""
    if is_utf8(name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class TarMember(NamedTuple):
    """One regular file in a tar: its name, the offset of its header, and its data."""

    name: str
    offset: int
    data_offset: int
    size: int


@dataclass(frozen=True)
class TarDamage:
    """Why reading stopped before the end-of-archive marker, and at which byte."""

    kind: DamageKind
    offset: int
    message: str
    name: str | None = None  # the member that was cut off, when its header is intact


@dataclass(frozen=True)
class TarListing:
    """The regular-file members of a tar as columns, grouped into samples: runs of
    consecutive members sharing a key (webdataset's rule, `split_member`)."""

    names: list[str]
    offsets: Sequence[int]  # of each member's header; its data follows at offset + 512
    sizes: Sequence[int]
    starts: Sequence[int]  # index of each sample's first member
    keys: list[str]  # of each sample
    signatures: list[str]  # each sample's member extensions in tar order, joined by "/"

    @classmethod
    def of(cls, members: Sequence[TarMember]) -> TarListing:
        """Group members read one by one (the general walk, streams)."""
        starts: list[int] = []
        keys: list[str] = []
        signatures: list[str] = []
        exts: list[str] = []
        for index, member in enumerate(members):
            key, ext = split_member(member.name)
            if keys and key == keys[-1]:
                exts.append(ext)
                continue
            if keys:
                signatures.append("/".join(exts))
            starts.append(index)
            keys.append(key)
            exts = [ext]
        if keys:
            signatures.append("/".join(exts))
        return cls(
            [m.name for m in members],
            [m.offset for m in members],
            [m.size for m in members],
            starts,
            keys,
            signatures,
        )

    def members(self) -> list[TarMember]:
        return [
            TarMember(name, offset, offset + BLOCK, size)
            for name, offset, size in zip(self.names, self.offsets, self.sizes, strict=True)
        ]


def _strings(blob: bytes) -> list[str]:
    """Names each followed by NUL, as the compiled walk returns them."""
    strings = blob.decode("utf-8", "surrogateescape").split("\0")
    strings.pop()  # what follows the last NUL
    return strings


def _int64s(blob: bytes) -> array[int]:
    numbers = array("q")
    numbers.frombytes(blob)
    return numbers


class _Corrupt(Exception):
    pass


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        if field[0] == 0xFF:
            raise _Corrupt("negative number")
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):  # int() would also take a sign, underscores or spaces
        raise _Corrupt(f"bad number {bytes(field)!r}")
    try:
        return int(text, 8)
    except ValueError:
        raise _Corrupt(f"bad number {bytes(field)!r}") from None


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except _Corrupt:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block) - sum(
        b - 256 if b > 127 else b for b in block[148:156]
    )
    return stored == signed + 8 * 32


def _name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records `LEN key=value\\n` of a pax extended header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _Corrupt("bad pax record") from None
        if length <= 0:
            raise _Corrupt("bad pax record")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    size = records.get("size")
    if size is not None and not (size.isascii() and size.isdigit()):
        raise _Corrupt(f"bad size {size!r}")
    return records


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


class TarReader:
    """The regular-file members of one tar, in order, with the data of the members asked for.

    Iterate it for `(member, data)` pairs; `data` is the member's bytes when `want(name)` is
    true, else None. Afterwards `damage` says why reading stopped early (None for a clean
    archive), `end` is the offset of the end-of-archive marker or of the damage, and
    `file_size` the size of a local file (None for streams).
    """

    def __init__(
        self,
        url: str,
        *,
        allow_pipe: bool = False,
        want: Callable[[str], bool] | None = None,
    ) -> None:
        self.url = url
        self.want = want
        self.damage: TarDamage | None = None
        self.end = 0
        self.file_size: int | None = None
        self._local = url_kind(url) == "local"
        self._fd: int | None = None
        self._stream: IO[bytes] | None = None
        if self._local:
            try:
                self._fd = os.open(local_path(url), os.O_RDONLY)
                info = os.fstat(self._fd)
                if stat.S_ISDIR(info.st_mode):
                    raise IsADirectoryError(21, "Is a directory")
                self.file_size = info.st_size
            except OSError as exc:
                self.close()
                raise OpenerError(f"cannot open {url}: {exc.strerror or exc}") from exc
        else:
            self._stream = open_url(url, allow_pipe=allow_pipe)

    def __enter__(self) -> TarReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    def __iter__(self) -> Iterator[tuple[TarMember, bytes | None]]:
        if self._local:
            members = self._read_error_wrapped(self._walk_local)
            fd = self._fd
            try:
                for member in members:
                    data = None
                    if self.want is not None and fd is not None and self.want(member.name):
                        data = os.pread(fd, member.size, member.data_offset)
                    yield member, data
            except OSError as exc:
                raise self._read_error(exc) from exc
        else:
            yield from self._walk_stream()

    def members(self) -> list[TarMember]:
        """All regular-file members without their data (the fast path for listings)."""
        if self._local:
            return self._read_error_wrapped(self._walk_local)
        return [member for member, _ in self._walk_stream()]

    def _read_error(self, exc: OSError) -> OpenerError:
        return OpenerError(
            f"cannot read {self.url}: {exc.strerror or exc}",
            fix="check the file and the disk, then rewrite or re-download the shard",
        )

    def _read_error_wrapped(self, walk: Callable[[], _T]) -> _T:
        """`walk()` with a failed read of the local file (EIO, a file gone) as OpenerError."""
        try:
            return walk()
        except OSError as exc:
            raise self._read_error(exc) from exc

    def _stop(self, kind: DamageKind, offset: int, message: str, name: str | None = None) -> None:
        self.damage = TarDamage(kind, offset, message, name)
        self.end = offset

    def _walk_local(self) -> list[TarMember]:
        fast = self._list_fast()
        return fast.members() if fast is not None else self._walk_general()

    def listing(self) -> TarListing:
        """Every regular-file member and every sample, without member data (the listing)."""
        if self._local:
            return self._read_error_wrapped(self._list_local)
        return TarListing.of([member for member, _ in self._walk_stream()])

    def _list_local(self) -> TarListing:
        fast = self._list_fast()
        return fast if fast is not None else TarListing.of(self._walk_general())

    def _list_fast(self) -> TarListing | None:
        """The compiled walk; None when it leaves the archive to the general walk (which
        reads it and reports what is wrong) or was not built."""
        if _list_plain is None or self._fd is None:
            return None
        found = _list_plain(self._fd, self.file_size or 0)
        if found is None:
            return None
        end, names, offsets, sizes, starts, keys, signatures = found
        self.end = end
        return TarListing(
            _strings(names),
            _int64s(offsets),
            _int64s(sizes),
            _int64s(starts),
            _strings(keys),
            _strings(signatures),
        )

    # The general walk: jump from header to header with positioned reads (one read usually
    # covers a header and the small members after it), checksums verified in batches.
    # The loop is the hot path, one iteration per member: plain members are handled inline,
    # everything rarer (long names, pax headers, prefixed names, damage) by the helpers.
    def _walk_general(self) -> list[TarMember]:
        fd, size = self._fd, self.file_size or 0
        members: list[TarMember] = []
        headers: list[int] = []  # offsets of the headers not yet checksummed
        blocks: list[bytes] = []  # and their bytes
        if fd is None or not size:
            self._stop("truncated", 0, "is empty")
            return members
        add_member, add_header, add_block = members.append, headers.append, blocks.append
        new_member = tuple.__new__  # TarMember(...) without the generated __new__: hot path
        window_start, window = 0, b""
        offset = 0
        names = _NextMember()
        while True:
            if offset + BLOCK > size:
                self._stop_at_header(offset, size if offset >= size else None)
                break
            at = offset - window_start
            if at < 0 or at + BLOCK > len(window):
                window_start, window, at = offset, os.pread(fd, _WINDOW, offset), 0
            block = window[at : at + BLOCK]
            if not block[0] and not block.strip(b"\0"):
                self.end = offset
                break
            add_header(offset)
            add_block(block)
            if len(headers) == _CHECKSUM_BATCH and self._bad_checksum(headers, blocks, members):
                return members
            try:
                # 11 digits and a terminator, what writers emit; anything else (a sign, an
                # underscore or a space int() would take, a 12th digit) goes to _octal
                if block[135] not in (0, 32) or not block[124:135].isdigit():
                    raise ValueError
                member_size = int(block[124:135], 8)
            except ValueError:
                member_size = self._odd_size(block, offset)
            kind = block[156]
            data_offset = offset + BLOCK
            if member_size < 0 or data_offset + member_size > size:
                self._stop_at_member(offset, member_size, size, block, names)
                break
            if kind in _PLAIN and not names.active and not block[345]:  # the common case
                end = block.find(b"\0", 0, 100)
                name = block[: end if end >= 0 else 100].decode("utf-8", "surrogateescape")
                add_member(new_member(TarMember, (name, offset, data_offset, member_size)))
            else:
                member_size = self._other_member(block, offset, member_size, names, members)
                if member_size < 0:
                    break
            offset = data_offset + (member_size + 511) // 512 * 512
        self._bad_checksum(headers, blocks, members)
        return members

    def _odd_size(self, block: bytes, offset: int) -> int:
        """The size field as GNU tar may write it (base-256, spaces, no terminator); -1, the
        damage recorded, when it is no number."""
        try:
            return _octal(block[124:136])
        except _Corrupt as exc:
            self._stop("corrupt", offset, f"has a corrupt header at byte offset {offset} ({exc})")
            return -1

    def _stop_at_header(self, offset: int, end: int | None) -> None:
        """The archive ends at `end` without its end marker, or within the header at `offset`."""
        if end is not None:
            message = f"is truncated: it ends at byte {end} without the end-of-archive marker"
        else:
            message = f"is truncated: the header at byte {offset} is cut off"
        self._stop("truncated", offset, message)

    def _stop_at_member(
        self, offset: int, member_size: int, size: int, block: bytes, names: _NextMember
    ) -> None:
        """The member at `offset` needs more data than the file has (a size of -1: its
        header's damage is recorded already)."""
        if member_size < 0:
            return
        regular = block[156] in _REGULAR_CODES
        self._stop(
            "truncated",
            offset,
            f"is truncated: the member at byte {offset} needs {member_size} bytes of "
            f"data, the file ends at byte {size}",
            names.name(block) if regular else None,
        )

    def _other_member(
        self,
        block: bytes,
        offset: int,
        member_size: int,
        names: _NextMember,
        members: list[TarMember],
    ) -> int:
        """A member off the common path: a regular file with a long, pax or prefixed name
        (added to `members`), or a header of another kind (a long name or pax header read
        for the next member). The size of its data, -1 when reading stops here."""
        data_offset = offset + BLOCK
        kind = block[156]
        if kind in _REGULAR_CODES:
            name = names.name(block)
            if "size" in names.pax:
                member_size = int(names.pax["size"])
            members.append(TarMember(name, offset, data_offset, member_size))
            names.clear()
            return member_size
        assert self._fd is not None
        data = os.pread(self._fd, member_size, data_offset) if kind in (76, 120) else b""
        return member_size if self._take_names(names, kind, data, offset) else -1

    def _take_names(self, names: _NextMember, kind: int, data: bytes, offset: int) -> bool:
        """Read a long name or pax header for the next member; False, the damage recorded,
        when the pax header is corrupt."""
        try:
            names.take(kind, data)
        except _Corrupt as exc:
            message = f"has a corrupt pax header at byte offset {offset} ({exc})"
            self._stop("corrupt", offset, message)
            return False
        return True

    def _bad_checksum(
        self,
        headers: list[int],
        blocks: list[bytes],
        members: list[TarMember],
    ) -> bool:
        """Check the pending headers; at the first bad one, record the damage and drop the
        members from there on. Empties the pending lists."""
        bad = _first_bad_checksum(blocks)
        if bad is not None:
            offset = headers[bad]
            self._stop("corrupt", offset, f"has a corrupt header at byte offset {offset}")
            while members and members[-1].offset >= offset:
                members.pop()
        headers.clear()
        blocks.clear()
        return bad is not None

    # Streams: headers in order, member data read or skipped as it passes.
    def _walk_stream(self) -> Iterator[tuple[TarMember, bytes | None]]:
        assert self._stream is not None
        stream = self._stream
        offset = 0
        names = _NextMember()
        while True:
            block = _read_exact(stream, BLOCK)
            if len(block) < BLOCK:
                self._stop_at_header(offset, None if block else offset)
                return
            if not block.strip(b"\0"):
                self.end = offset
                return
            try:
                if not _checksum_ok(block):
                    raise _Corrupt("checksum mismatch")
                member_size = _octal(block[124:136])
            except _Corrupt:
                self._stop("corrupt", offset, f"has a corrupt header at byte offset {offset}")
                return
            data_offset = offset + BLOCK
            padded = _padded(member_size)
            cut = f"is truncated: the member at byte {offset} needs {member_size} bytes of data"
            if block[156:157] in _REGULAR:
                name = names.name(block)
                if "size" in names.pax:
                    member_size = int(names.pax["size"])
                    padded = _padded(member_size)
                names.clear()
                data = _stream_data(stream, member_size, padded, self.want, name)
                if data is _CUT:
                    self._stop("truncated", offset, cut, name)
                    return
                yield TarMember(name, offset, data_offset, member_size), data
            else:
                payload = _read_exact(stream, padded)
                if len(payload) < padded:
                    self._stop("truncated", offset, cut)
                    return
                if not self._take_names(names, block[156], payload[:member_size], offset):
                    return
            offset = data_offset + padded


class _NextMember:
    """What a GNU long-name (L) or pax (x) header says about the member that follows it."""

    __slots__ = ("active", "long_name", "pax")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.long_name: str | None = None
        self.pax: dict[str, str] = {}
        self.active = False  # a header applies to the next member

    def name(self, block: bytes) -> str:
        """The name of the member of header `block`."""
        return self.pax.get("path") or self.long_name or _name(block)

    def take(self, kind: int, data: bytes) -> None:
        """Keep what the header of `kind` with `data` says, or forget it for another kind."""
        if kind == 76:  # L: GNU long name
            self.long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            self.active = True
        elif kind == 120:  # x: pax extended header
            self.pax = _pax(data)
            self.active = True
        else:
            self.clear()


_CUT = b"<cut>"  # a marker object: the member's data ends early


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the stream)."""
    data = stream.read(n)
    return data if data is not None else b""


def _skip(stream: IO[bytes], n: int) -> int:
    """Read past `n` bytes; how many there were."""
    skipped = 0
    while skipped < n:
        got = len(stream.read(min(n - skipped, _CHUNK)) or b"")
        if not got:
            break
        skipped += got
    return skipped


def _stream_data(
    stream: IO[bytes],
    size: int,
    padded: int,
    want: Callable[[str], bool] | None,
    name: str,
) -> bytes | None:
    """A member's data when `want(name)` (None when not wanted), read or skipped with its
    padding; `_CUT` when the stream ends first."""
    if want is not None and want(name):
        data = _read_exact(stream, size)
        if len(data) < size or _skip(stream, padded - size) < padded - size:
            return _CUT
        return data
    return _CUT if _skip(stream, padded) < padded else None


def _first_bad_checksum(blocks: list[bytes]) -> int | None:
    """Index of the first header block whose checksum is wrong, or None (vectorised)."""
    if not blocks:
        return None
    import numpy as np

    return _first_bad_checksum_rows(
        np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(-1, BLOCK)
    )


def _first_bad_checksum_rows(rows: NDArray[np.uint8]) -> int | None:
    """`_first_bad_checksum` over header blocks as the rows of an (n, 512) array."""
    import numpy as np

    field = rows[:, 148:156].sum(axis=1, dtype=np.int64)
    computed = rows.sum(axis=1, dtype=np.int64) - field + 8 * 32
    for i in np.flatnonzero(computed != _stored_checksums(rows)):
        if not _checksum_ok(rows[int(i)].tobytes()):  # the signed-sum variant of old writers
            return int(i)
    return None


def _stored_checksums(rows: NDArray[np.uint8]) -> NDArray[np.int64]:
    """The checksum fields as numbers: `dddddd\\0 ` (what writers emit) in bulk, others one by one."""
    import numpy as np

    fields = rows[:, 148:156].astype(np.int64)
    digits = fields[:, :6] - 48
    common = ((digits >= 0) & (digits <= 7)).all(axis=1) & np.isin(fields[:, 6], (0, 32))
    out = digits @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    for i in np.flatnonzero(~common):
        try:
            out[i] = _octal(rows[i, 148:156].tobytes())
        except _Corrupt:
            out[i] = -1
    return out


def count_samples(url: str, *, allow_pipe: bool = False) -> int:
    """Number of samples in a tar shard: runs of consecutive members sharing a key.

    Local files are read by jumping from header to header; other URLs are streamed. A
    truncated or corrupt archive raises OpenerError with the byte offset.
    """
    with TarReader(url, allow_pipe=allow_pipe) as reader:
        samples = len(reader.listing().keys)
    if reader.damage is not None:
        raise OpenerError(
            f"tar shard {url} {reader.damage.message}", fix="rewrite or re-download the shard"
        )
    return samples
