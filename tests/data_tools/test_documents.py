"""Compressed shards are read to their verified end: a cut or corrupted .zst/.gz is a
one-line error naming the file (exit 2), never a shorter corpus, in every reading path."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard
from data_tools_helpers import make_texts

from megatron_sfm.cli import main
from megatron_sfm.data_tools import documents as docs
from megatron_sfm.errors import SfmError

TEXTS = make_texts(400, seed=7)
LINES = b"".join(json.dumps({"id": i, "text": t}).encode() + b"\n" for i, t in enumerate(TEXTS))
HALF = LINES.index(b"\n", len(LINES) // 2) + 1
FRAME1 = zstandard.ZstdCompressor(level=3).compress(LINES[:HALF])
FRAME2 = zstandard.ZstdCompressor(level=3).compress(LINES[HALF:])
GZ = gzip.compress(LINES, mtime=0)


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x5A
    return bytes(b)


# name -> (file bytes, words the one-line error must contain)
DAMAGED = {
    "cut_in_frame1.jsonl.zst": (FRAME1[: len(FRAME1) // 2], "truncated inside frame 1"),
    "cut_in_frame2.jsonl.zst": (FRAME1 + FRAME2[: len(FRAME2) // 2], "truncated inside frame 2"),
    "cut_in_frame2_header.jsonl.zst": (FRAME1 + FRAME2[:3], "truncated inside frame 2"),
    "empty.jsonl.zst": (b"", "empty"),
    "cut.jsonl.gz": (GZ[: len(GZ) // 2], "truncated"),
    "cut_trailer.jsonl.gz": (GZ[:-3], "truncated"),
    "corrupt_middle.jsonl.gz": (_flip(GZ, len(GZ) // 2), "damaged gzip file"),
    "corrupt_crc.jsonl.gz": (_flip(GZ, len(GZ) - 6), "CRC check failed"),
    "empty.jsonl.gz": (b"", "empty"),
}


@pytest.fixture
def damaged(tmp_path, request):
    name = request.param
    data, words = DAMAGED[name]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(data)
    return path, words


def _one_line_error(capsys, path, words):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"error: {path}: damaged ") and words in err, err


@pytest.mark.parametrize("damaged", sorted(DAMAGED), indirect=True)
def test_every_reader_refuses_a_damaged_file(damaged):
    path, words = damaged
    with pytest.raises(SfmError, match=words) as exc:
        list(docs.iter_jsonl_lines(path))
    assert str(path) in str(exc.value)
    with pytest.raises(SfmError, match=words):
        list(docs.iter_jsonl_blocks(path, 4096))
    with pytest.raises(SfmError, match=words):
        list(docs.iter_records(path))
    with pytest.raises(SfmError, match=words):
        with docs.open_binary(path) as f:
            while f.read(1000):
                pass


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("damaged", sorted(DAMAGED), indirect=True)
def test_filter_refuses_a_damaged_file(tmp_path, capsys, damaged, workers):
    path, words = damaged
    good = tmp_path / "in" / "good.jsonl.zst"
    good.write_bytes(FRAME1 + FRAME2)
    out = tmp_path / "out"
    rc = main(["data", "filter", str(good), str(path), "--out", str(out), "--workers", workers, "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, path, words)
    # nothing at all: no kept shard, no report claiming completion, no temporary leftovers
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("damaged", sorted(DAMAGED), indirect=True)
def test_tokenize_refuses_a_damaged_file(tmp_path, capsys, bpe_dir, damaged, workers):
    path, words = damaged
    good = tmp_path / "in" / "good.jsonl.gz"
    good.write_bytes(GZ)
    rc = main(["data", "tokenize", str(good), str(path), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "ds"),
               "--workers", workers, "--chunk-mb", "0.01", "--writer", "numpy", "--no-progress"])
    assert rc == 2
    _one_line_error(capsys, path, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no .bin/.idx, no temporaries


def test_intact_multi_frame_and_multi_member_files_are_read_fully(tmp_path):
    zst = tmp_path / "a.jsonl.zst"
    # three frames, the middle one empty, a fourth with a content checksum
    zst.write_bytes(FRAME1 + zstandard.ZstdCompressor().compress(b"")
                    + zstandard.ZstdCompressor(write_checksum=True).compress(LINES[HALF:]))
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(LINES[:HALF]) + gzip.compress(LINES[HALF:]))
    for path in (zst, gz):
        assert b"".join(line for _, line in docs.iter_jsonl_lines(path)) == LINES
        assert [r.doc["text"] for r in docs.iter_records(path)] == TEXTS
        joined = b"".join(b"".join(x + b"\n" for x in lines) for _, lines, _ in docs.iter_jsonl_blocks(path, 1000))
        assert joined == LINES


def test_filter_and_tokenize_read_an_intact_multi_frame_file_to_the_end(tmp_path, bpe_dir):
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(FRAME1 + FRAME2)
    assert main(["data", "filter", str(path), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["documents"] == len(TEXTS)
    assert main(["data", "tokenize", str(path), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "ds"),
                 "--chunk-mb", "0.01", "--writer", "numpy", "--no-progress"]) == 0
    from megatron_sfm.data_tools.inspect_dataset import inspect_indexed

    assert inspect_indexed(tmp_path / "ds")["documents"] == len(TEXTS)


def test_written_zstd_shards_carry_a_checksum_that_catches_corruption(tmp_path):
    path = tmp_path / "w.jsonl.zst"
    writer = docs.ShardWriter(path, "jsonl.zst")
    writer.write_raw(LINES, len(TEXTS))
    writer.close()
    assert b"".join(line for _, line in docs.iter_jsonl_lines(path)) == LINES
    data = path.read_bytes()
    path.write_bytes(data[:-2] + bytes([data[-2] ^ 0xFF]) + data[-1:])  # inside the 4-byte checksum
    with pytest.raises(SfmError, match=r"w\.jsonl\.zst: damaged zstd file: frame 1: .*checksum"):
        list(docs.iter_jsonl_lines(path))
