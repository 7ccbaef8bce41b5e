from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from curate.io.wds import (
    IMAGE_EXTENSIONS,
    TarReadError,
    count_samples,
    index_tar,
    iter_members,
    iter_samples,
)


def image_bytes(fmt: str, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """Members in the given order, each behind a pax header block (as some writers add)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "x" * 600}
            tar.addfile(info, io.BytesIO(data))
    return path


def meta(uid: str, **extra: object) -> bytes:
    return json.dumps({"uid": uid, **extra}).encode()


def test_keys_follow_webdatasets_rule_up_to_the_first_dot_of_the_basename(tmp_path: Path) -> None:
    tar = write_tar(
        tmp_path / "keys.tar",
        {
            "a.b/c.jpg": b"1",  # a dot in a folder name is not the key's end
            "a.b/c.txt": b"2",
            "d.seg.png": b"3",  # key "d", extension "seg.png": not an image
            "d.TXT": b"4",  # extensions are lower-cased, as webdataset does
            "__meta__": b"skipped",
            "noextension": b"skipped",
        },
    )
    index = index_tar(tar)
    assert [(s.key, sorted(s.members)) for s in index.samples] == [("a.b/c", ["jpg", "txt"]), ("d", ["seg.png", "txt"])]
    assert [s.image_extension for s in index.samples] == ["jpg", None]
    assert count_samples(tar) == 1


def test_index_spans_read_back_as_the_members(tmp_path: Path) -> None:
    members = {"k1.jpg": image_bytes("JPEG"), "k1.txt": "a caption ä".encode(), "k1.json": meta("u1")}
    members |= {"k2.webp": image_bytes("WEBP"), "k2.json": meta("u2")}
    index = index_tar(write_tar(tmp_path / "spans.tar", members))
    read = {f"{s.key}.{ext}": index.read(span) for s in index.samples for ext, span in s.members.items()}
    assert read == members
    assert dict(iter_members(index.path)) == {
        "k1": {"jpg": members["k1.jpg"], "txt": members["k1.txt"], "json": members["k1.json"]},
        "k2": {"webp": members["k2.webp"], "json": members["k2.json"]},
    }


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_samples_carry_their_image_whatever_its_format(tmp_path: Path, fmt: str) -> None:
    extension = "jpg" if fmt == "jpeg" else fmt
    data = image_bytes(fmt.upper())
    tar = write_tar(
        tmp_path / f"{fmt}.tar",
        {
            f"0001.{extension}": data,
            "0001.txt": b"a red square",
            "0001.json": meta("u1", url="http://x/1"),
            "0002.json": meta("u2", caption="from the json"),  # no image, no txt
        },
    )
    first, second = iter_samples(tar)
    assert (first.key, first.uid, first.image_extension, first.image) == ("0001", "u1", extension, data)
    assert (first.caption, first.url, first.meta["uid"]) == ("a red square", "http://x/1", "u1")
    assert (second.image, second.image_extension, second.caption) == (None, None, "from the json")
    assert count_samples(tar) == 1
    assert extension in IMAGE_EXTENSIONS


def test_wanted_and_read_limit_what_is_read(tmp_path: Path) -> None:
    tar = write_tar(
        tmp_path / "wanted.tar",
        {"a.png": b"png-a", "a.txt": b"ta", "a.json": meta("ua"), "b.png": b"png-b", "b.json": meta("ub")},
    )
    assert [s.uid for s in iter_samples(tar, {"ub"})] == ["ub"]
    (only,) = iter_samples(tar, {"ua"}, read=())
    assert set(only.members) == {"json"} and only.image is None and only.image_extension == "png"
    assert index_tar(tar).read(only.spans["png"]) == b"png-a"


def test_a_sample_without_json_names_the_tar_and_key(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "nojson.tar", {"a.jpg": b"x", "a.json": meta("ua"), "b.jpg": b"y", "b.txt": b"t"})
    with pytest.raises(ValueError, match=r"nojson\.tar: sample 'b' has no \.json"):
        list(iter_samples(tar))
    with pytest.raises(ValueError, match=r"has no \.json"):
        list(iter_samples(tar, wanted={"ua"}))  # every sample is checked, wanted or not
    assert count_samples(tar) == 2  # counting needs no .json


def test_a_uid_in_two_samples_is_an_error(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "dup.tar", {"a.jpg": b"x", "a.json": meta("u"), "b.jpg": b"y", "b.json": meta("u")})
    with pytest.raises(ValueError, match=r"dup\.tar: uid 'u' appears in two samples \('a', 'b'\)"):
        list(iter_samples(tar))


def test_two_members_with_one_extension_in_a_sample_are_an_error(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "twice.tar", {"a.jpg": b"x", "a.JPG": b"y"})
    with pytest.raises(TarReadError, match=r"twice\.tar: two 'jpg' members in sample 'a'"):
        index_tar(tar)


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary", "before the end block"])
def test_a_truncated_tar_is_a_clear_error_naming_the_file(tmp_path: Path, where: str) -> None:
    whole = write_tar(tmp_path / "whole.tar", {f"k{i}.jpg": bytes(1000) for i in range(3)})
    spans = [sample.members["jpg"] for sample in index_tar(whole).samples]
    cut = {
        "inside a member": spans[1].offset + 10,
        "at a member boundary": spans[1].offset + 1024,  # the data padded to whole blocks
        "before the end block": spans[2].offset + 1024,
    }[where]
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(TarReadError, match=r"damaged\.tar: "):
        index_tar(damaged)
    with pytest.raises(ValueError, match=r"damaged\.tar: "):  # TarReadError is a ValueError
        count_samples(damaged)


def test_not_a_tar_and_an_empty_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 200)
    with pytest.raises(TarReadError, match=r"junk\.tar: not a readable tar"):
        index_tar(junk)
    empty = write_tar(tmp_path / "empty.tar", {})
    assert len(index_tar(empty)) == 0 and count_samples(empty) == 0 and list(iter_samples(empty)) == []
