"""megatron_sfm/posttrain/data.py: formats, checks with FILE:LINE errors, the weighted mix."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_sfm.errors import SfmError
from megatron_sfm.posttrain.config import DataFile
from megatron_sfm.posttrain.data import (
    load_examples,
    mix_count,
    mix_indices,
    read_examples,
)

from .conftest import dpo_rows, sft_rows, write_jsonl


def _write(path, rows):
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_sft_formats(tmp_path, name):
    got = read_examples(_write(tmp_path / name, sft_rows()), "sft")
    assert got == [{"messages": r["messages"]} for r in sft_rows()]  # other fields ("id") dropped


def test_dpo_forms(tmp_path):
    user = lambda t: {"role": "user", "content": t}
    asst = lambda t: {"role": "assistant", "content": t}
    sys_ = {"role": "system", "content": "Be kind."}
    rows = [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"chosen": [sys_, user("Q?"), asst("Yes.")], "rejected": [sys_, user("Q?"), asst("No.")]},
        {"prompt": [user("Q?")], "chosen": [asst("Yes.")], "rejected": [asst("No.")]},
        {"prompt": [user("Q?")], "chosen": [user("Q?"), asst("Yes.")], "rejected": [user("Q?"), asst("No.")]},
        {"prompt": "Q?", "chosen": [asst("Yes.")], "rejected": [asst("No.")]},
    ]
    expected = {"prompt": [user("Q?")], "chosen": [asst("Yes.")], "rejected": [asst("No.")]}
    for name in ("p.jsonl", "p.parquet"):
        if name.endswith(".parquet"):  # one Parquet schema: the message-list forms only
            got = read_examples(_write(tmp_path / name, rows[2:4]), "dpo")
            assert got == [expected] * 2
            continue
        got = read_examples(_write(tmp_path / name, rows), "dpo")
        assert got[1] == {**expected, "prompt": [sys_, user("Q?")]}
        assert [g for i, g in enumerate(got) if i != 1] == [expected] * 4
    assert len(read_examples(_write(tmp_path / "d.jsonl", dpo_rows()), "dpo")) == len(dpo_rows())


def test_mix_counts_are_exact_and_deterministic(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                    {"role": "assistant", "content": f"a{i}"}]} for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"x{i}"},
                                                    {"role": "assistant", "content": f"y{i}"}]} for i in range(7)])
    files = [DataFile(str(a), 2.5), DataFile(str(b), 0.5)]
    mixed, stats = load_examples(files, "sft", seed=1)
    assert [(s.rows, s.examples) for s in stats] == [(10, 25), (7, 4)]  # floor(w * n + 0.5)
    assert len(mixed) == 29
    answers = [ex["messages"][1]["content"] for ex in mixed]
    assert answers[:20] == [f"a{i}" for i in range(10)] * 2  # two whole copies, then a fixed half
    assert sorted(set(answers[20:25])) == sorted(answers[20:25]) and len(set(answers[20:25])) == 5
    assert answers[20:25] == sorted(answers[20:25], key=lambda t: int(t[1:]))  # drawn rows keep file order
    again, _ = load_examples(files, "sft", seed=1)
    assert again == mixed
    other, _ = load_examples(files, "sft", seed=2)
    assert other[:20] == mixed[:20] and other != mixed  # only the drawn part depends on the seed
    assert mix_count(7, 0.5) == 4 and mix_count(3, 1 / 3) == 1 and mix_indices(4, 1.0, 0, 0) == [0, 1, 2, 3]
    assert stats[0].sha256 and stats[0].bytes == a.stat().st_size
    with pytest.raises(SfmError, match=r"weight 0.01 gives 0 of its 7 examples"):
        load_examples([DataFile(str(b), 0.01)], "sft", seed=1)


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


@pytest.mark.parametrize("kind, line, expected", [
    ("sft", '{"text": "hi"}', ":2: no key 'messages'"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     ":2: messages[1].role: 'bot' is not one of system, user, assistant"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     ":2: messages[1].content: empty"),
    ("sft", '{"messages": [{"role": "user"}]}', ":2: messages[0]: missing key 'content'"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}', ":2: messages: no assistant message"),
    ("sft", ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, '
             '{"role": "assistant", "content": "y"}]}'), ":2: messages[1].role: a system message may only be the first"),
    ("sft", '{"messages": "hi"}', ":2: messages: expected a list"),
    ("sft", '{"messages": [', ":2: invalid JSON"),
    ("dpo", '{"prompt": "q", "chosen": "a"}', ":2: no key 'rejected'"),
    ("dpo", '{"chosen": "a", "rejected": "b"}', ":2: no key 'prompt'"),
    ("dpo", '{"prompt": "q", "chosen": "", "rejected": "b"}', ":2: chosen: empty"),
    ("dpo", ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
             '"rejected": [{"role": "assistant", "content": "b"}]}'),
     ":2: chosen[0].role: the response must end with an assistant message"),
    ("dpo", ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
             '"rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]}'),
     ":2: chosen/rejected: the two conversations share no prompt messages"),
    ("dpo", ('{"prompt": [{"role": "user", "content": "q"}], '
             '"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
             '"rejected": [{"role": "assistant", "content": "b"}]}'),
     ":2: chosen/rejected: only chosen begins with the prompt"),
])
def test_bad_examples_name_file_line_and_key(tmp_path, kind, line, expected):
    good = GOOD if kind == "sft" else '{"prompt": "q", "chosen": "a", "rejected": "b"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(SfmError) as err:
        read_examples(path, kind)
    assert str(err.value).startswith(f"{path}{expected}"), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(SfmError, match="unknown shard format"):
        read_examples(_write(tmp_path / "a.csv", []), "sft")
    with pytest.raises(SfmError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl", "sft")
    with pytest.raises(SfmError, match="no examples"):
        read_examples(_write(tmp_path / "empty.jsonl", []), "sft")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]
    with pytest.raises(SfmError, match=r"a.parquet:1: messages\[1\].content: empty"):
        read_examples(_write(tmp_path / "a.parquet", rows), "sft")
