"""The compiled listing of plain tars against the general walk and Python's tarfile."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from flamingo_cli.shards import tar as tar_module
from flamingo_cli.shards.tar import TarListing, TarReader, split_member

Columns = tuple[list[str], list[int], list[int], list[int], list[str], list[str]]

needs_compiled = pytest.mark.skipif(
    tar_module._list_plain is None and os.environ.get("CI") != "true",
    reason="the compiled tar walk was not built (no C compiler at install time)",
)


def columns(listing: TarListing) -> Columns:
    return (
        listing.names,
        list(listing.offsets),
        list(listing.sizes),
        list(listing.starts),
        listing.keys,
        listing.signatures,
    )


def tar_bytes(
    members: list[tuple[tarfile.TarInfo, bytes]],
    format: int = tarfile.USTAR_FORMAT,
    mtime: float | None = None,
) -> bytes:
    """A tar written by Python's tarfile; a float `mtime` in PAX format puts a pax header
    before every member, as webdataset's TarWriter does."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for info, data in members:
            info.size = len(data)
            if mtime is not None:
                info.mtime = mtime  # type: ignore[assignment]
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def files(*names: str, size: int = 3) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tarfile.TarInfo(name), name.encode()[:size].ljust(size, b"-")) for name in names]


def compiled(path: Path) -> TarListing | None:
    with TarReader(str(path)) as reader:
        return reader._list_fast()


def general(path: Path) -> tuple[TarListing, int, object]:
    with TarReader(str(path)) as reader:
        listing = TarListing.of(reader._walk_general())
        return listing, reader.end, reader.damage


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def odd_kinds() -> list[tuple[tarfile.TarInfo, bytes]]:
    """A folder, a symlink and a hard link between files: no members, skipped by size."""
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("d/link.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
    hard = tarfile.TarInfo("d/hard.txt")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.txt"
    return [*files("a.txt", "a.jpg"), (folder, b""), (link, b""), *files("d/b.txt"), (hard, b"")]


def test_the_listing_groups_members_into_samples_by_webdatasets_rule() -> None:
    names = ["a/b.c/x.y.jpg", "a/b.c/x.txt", "a/b.c/x", "z.txt", "z.txt", "a/b.c/x.json"]
    members = [tar_module.TarMember(n, 512 * i, 512 * i + 512, i) for i, n in enumerate(names)]
    listing = TarListing.of(members)
    assert listing.starts == [0, 3, 5]
    assert listing.keys == ["a/b.c/x", "z", "a/b.c/x"]
    assert listing.signatures == ["y.jpg/txt/", "txt/txt", "json"]
    assert [split_member(n)[0] for n in names] == ["a/b.c/x"] * 3 + ["z"] * 2 + ["a/b.c/x"]
    assert listing.members() == members


FORMATS = {
    "ustar": (tarfile.USTAR_FORMAT, None),
    "gnu": (tarfile.GNU_FORMAT, None),  # long names as 'L' members
    "pax": (tarfile.PAX_FORMAT, None),  # pax headers only for long or non-ASCII names
    "pax-every-member": (tarfile.PAX_FORMAT, 1_700_000_000.25),
}
LONG = "d/" + "n" * 150 + ".json"


@needs_compiled
@pytest.mark.parametrize("layout", list(FORMATS))
def test_compiled_and_general_walks_list_the_same(tmp_path: Path, layout: str) -> None:
    format, mtime = FORMATS[layout]
    names = [f"{i:06d}.{ext}" for i in range(1500) for ext in ("jpg", "txt", "json")]
    sizes = [(i * 37) % 3000 for i in range(len(names))]
    members = [(tarfile.TarInfo(n), b"x" * s) for n, s in zip(names, sizes, strict=True)]
    members += files("dir.v1/sub/k.tar.gz", "dir.v1/sub/k.txt", "noext", "n" * 100)
    if format != tarfile.USTAR_FORMAT:  # ustar splits long names into a prefix: not listed
        members += files(LONG, "d/" + "n" * 150 + ".txt", "caf\u00e9.jpg", size=5000)
    members += odd_kinds()
    path = write(tmp_path / "shard.tar", tar_bytes(members, format, mtime))
    fast = compiled(path)
    assert fast is not None
    reference, end, damage = general(path)
    assert damage is None
    assert columns(fast) == columns(reference)
    with TarReader(str(path)) as reader:
        assert reader.listing() == fast
        assert reader.end == end
    with tarfile.open(path) as tar:
        regular = [m for m in tar if m.isreg()]
    assert fast.names == [m.name for m in regular]
    assert list(fast.sizes) == [m.size for m in regular]
    assert [o + 512 for o in fast.offsets] == [m.offset_data for m in regular]
    keys = ["dir.v1/sub/k", "noext", "n" * 100]
    if format != tarfile.USTAR_FORMAT:
        keys += ["d/" + "n" * 150, "caf\u00e9"]
    assert fast.keys[1500:] == [*keys, "a", "d/b"]
    assert fast.signatures[-2:] == ["txt/jpg", "txt"]


@needs_compiled
def test_shards_written_by_webdataset_are_listed_by_the_compiled_walk(tmp_path: Path) -> None:
    import webdataset as wds

    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(50):
            writer.write({"__key__": f"s{i:04d}", "jpg": b"\xff" * (i * 97), "txt": "caption"})
    with tarfile.open(path) as tar:
        assert all(m.pax_headers for m in tar)  # its float mtimes: a pax header per member
    fast = compiled(path)
    assert fast is not None
    assert columns(fast) == columns(general(path)[0])
    assert fast.keys == [f"s{i:04d}" for i in range(50)]
    assert list(fast.sizes)[:4] == [0, 7, 97, 7]


@needs_compiled
def test_names_that_are_not_utf8_round_trip(tmp_path: Path) -> None:
    raw = tar_bytes(files("cafe.jpg", "cafe.txt"))
    data = bytearray(raw)
    for header in (0, 1024):
        data[header + 3] = 0xE9  # caf\xe9: Latin-1, not UTF-8
        data[header + 148 : header + 156] = b" " * 8
        data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    path = write(tmp_path / "latin1.tar", bytes(data))
    fast = compiled(path)
    assert fast is not None
    assert columns(fast) == columns(general(path)[0])
    assert fast.keys == ["caf\udce9"]
    assert fast.names[0].encode("utf-8", "surrogateescape") == b"caf\xe9.jpg"


def _checksummed(data: bytearray, header: int) -> bytearray:
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    return data


def _declined() -> dict[str, bytes]:
    plain = files("a.jpg", "a.txt", size=700)
    cases = {"ustar prefix": tar_bytes([*plain, *files("folder/" * 15 + "p.txt")])}
    odd_size = tarfile.TarInfo("b.txt")
    odd_size.pax_headers = {"size": "1e3"}  # a pax size that is not a number
    cases["pax size that is not a number"] = tar_bytes(
        [*plain, (odd_size, b"x")], tarfile.PAX_FORMAT
    )
    pax_plus = tarfile.TarInfo("c.txt")
    pax_plus.pax_headers = {"comment": "+"}
    written = bytearray(tar_bytes([*plain, (pax_plus, b"y")], tarfile.PAX_FORMAT))
    at = written.index(b"13 comment=+\n")
    written[at : at + 13] = b"+13 comment=\n"  # int() takes a sign: only Python reads it
    cases["pax length with a sign"] = bytes(written)
    clean = tar_bytes(plain)
    second = 512 + 1024  # the second member's header
    cases["truncated member"] = clean[: second + 512 + 100]
    cases["no end-of-archive block"] = clean[: second + 512 + 1024]
    corrupt = bytearray(clean)
    corrupt[second + 10] ^= 0x01
    cases["bad checksum"] = bytes(corrupt)
    negative = bytearray(clean)
    negative[second + 124 : second + 136] = b"-0000001274\0"
    cases["signed size"] = bytes(_checksummed(negative, second))
    base256 = bytearray(clean)
    base256[second + 124 : second + 136] = b"\x80" + (700).to_bytes(11, "big")
    cases["base-256 size"] = bytes(_checksummed(base256, second))
    signed = bytearray(clean)
    signed[second + 50] = 0xFF  # a signed checksum as some old writers computed it
    signed[second + 148 : second + 156] = b" " * 8
    total = sum(b - 256 if b > 127 else b for b in signed[second : second + 512])
    signed[second + 148 : second + 156] = b"%06o\0 " % total
    cases["signed checksum"] = bytes(signed)
    return cases


@needs_compiled
@pytest.mark.parametrize("case", list(_declined()))
def test_the_compiled_walk_leaves_anything_unusual_to_the_general_walk(
    tmp_path: Path, case: str
) -> None:
    path = write(tmp_path / "odd.tar", _declined()[case])
    assert compiled(path) is None
    reference, _end, damage = general(path)
    with TarReader(str(path)) as reader:
        listing = reader.listing()
        assert reader.damage == damage
    assert columns(listing) == columns(reference)
    readable = {"ustar prefix": 3, "base-256 size": 2, "signed checksum": 2}
    readable |= {"pax length with a sign": 3}
    if case in readable:
        assert damage is None and len(listing.names) == readable[case]
    else:
        assert damage is not None


@needs_compiled
@pytest.mark.parametrize("layout", ["ustar", "gnu", "pax-every-member"])
def test_damaged_headers_never_make_the_walks_disagree(tmp_path: Path, layout: str) -> None:
    """Random byte changes in headers and in pax or long-name data: the compiled walk lists
    exactly what the general walk lists from a clean read, or leaves the archive to it."""
    format, mtime = FORMATS[layout]
    names = [f"{i:03d}.{e}" for i in range(6) for e in ("jpg", "txt")]
    if format != tarfile.USTAR_FORMAT:
        names.insert(5, LONG)
    clean = tar_bytes(files(*names, size=600), format, mtime)
    blocks = [o for o in range(0, len(clean) - 1024, 512)]
    headers = [o for o in blocks if clean[o + 257 : o + 262] == b"ustar"]
    extended = [o + 512 for o in headers if clean[o + 156] in b"xL"]  # pax or long-name data
    rng = random.Random(layout)
    accepted = 0
    for trial in range(300):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 3)):
            header = rng.choice(headers)
            if extended and rng.random() < 0.3:
                at = rng.choice(extended) + rng.randrange(40)
            else:
                field = rng.choice(
                    [(0, 100), (124, 136), (148, 156), (156, 157), (257, 265), (345, 346)]
                )
                at = header + rng.randrange(*field)
            data[at] = rng.choice(b"0127 \0.x/_=-+\n\x80\xff")
            if rng.random() < 0.7:  # mostly keep checksums right, so more is parsed
                for fixed in headers:
                    if data[fixed : fixed + 512] != clean[fixed : fixed + 512]:
                        _checksummed(data, fixed)
        path = write(tmp_path / f"{trial}.tar", bytes(data))
        fast = compiled(path)
        if fast is None:
            continue
        accepted += 1
        reference, end, damage = general(path)
        assert damage is None, trial
        assert columns(fast) == columns(reference), trial
        with TarReader(str(path)) as reader:
            reader.listing()
            assert reader.end == end
    assert 30 < accepted < 300  # both sides of the decision were exercised


def test_a_twelve_digit_size_field_is_read_whole(tmp_path: Path) -> None:
    data = bytearray(tar_bytes(files("a.txt", "b.txt", size=10)))
    data[124:136] = b"000000000012"  # 12 digits and no terminator: 10 bytes, as tar reads it
    path = write(tmp_path / "twelve.tar", bytes(_checksummed(data, 0)))
    reference, _end, damage = general(path)
    assert damage is None
    assert reference.names == ["a.txt", "b.txt"] and reference.sizes == [10, 10]
    underscore = bytearray(data)
    underscore[124:136] = b"0000_000012\0"  # int() would take it; tar does not
    path = write(tmp_path / "underscore.tar", bytes(_checksummed(underscore, 0)))
    _listing, _end, damage = general(path)
    assert damage is not None and damage.kind == "corrupt" and damage.offset == 0


def test_without_the_compiled_walk_everything_is_listed_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "shard.tar", tar_bytes([*files("a.jpg", "a.txt", "b.jpg"), *odd_kinds()])
    )
    with TarReader(str(path)) as reader:
        expected = columns(reader.listing())
    monkeypatch.setattr(tar_module, "_list_plain", None)
    with TarReader(str(path)) as reader:
        assert columns(reader.listing()) == expected
        assert reader.damage is None
    assert expected[4] == ["a", "b", "a", "d/b"]


def test_the_compiled_walk_is_built_in_ci() -> None:
    if tar_module._list_plain is None:
        if os.environ.get("CI") == "true":
            pytest.fail("flamingo_cli.shards._tarlist was not built: CI has gcc and headers")
        pytest.skip("the compiled tar walk was not built (no C compiler at install time)")
    assert tar_module._list_plain.__module__ == "flamingo_cli.shards._tarlist"
