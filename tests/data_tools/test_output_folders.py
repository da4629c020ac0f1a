"""`sfm data filter/mix --out`: a non-empty output folder is refused (exit 2, untouched);
`--overwrite` replaces it so that only the new run's files remain."""

from __future__ import annotations

import json

import pytest
from data_tools_helpers import make_texts, write_jsonl

from megatron_sfm.cli import main


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def filter_inputs(tmp_path):
    write_jsonl(tmp_path / "old.jsonl", [{"text": t} for t in make_texts(30, seed=1)])
    write_jsonl(tmp_path / "new.jsonl", [{"text": t} for t in make_texts(20, seed=2)])
    return tmp_path


def test_filter_refuses_an_earlier_run_and_overwrite_replaces_it(filter_inputs, capsys):
    tmp = filter_inputs
    out = tmp / "filtered"
    assert main(["data", "filter", str(tmp / "old.jsonl"), "--out", str(out), "--no-progress"]) == 0
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    assert "kept/old.jsonl" in before
    capsys.readouterr()

    rc = main(["data", "filter", str(tmp / "new.jsonl"), "--out", str(out) + "/", "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}/: not empty (holds an earlier run); pass --overwrite to replace it")
    assert {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()} == before

    assert main(["data", "filter", str(tmp / "new.jsonl"), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert _tree(out) == ["flagged", "flagged/new.jsonl", "kept", "kept/new.jsonl", "report.json"]
    assert json.loads((out / "report.json").read_text())["documents"] == 20
    assert sorted(p.name for p in tmp.iterdir()) == ["filtered", "new.jsonl", "old.jsonl"]  # no temporaries


def test_filter_into_an_empty_folder_and_a_failed_overwrite_keeps_the_earlier_run(filter_inputs, capsys):
    tmp = filter_inputs
    out = tmp / "filtered"
    out.mkdir()  # an empty folder is fine
    assert main(["data", "filter", str(tmp / "old.jsonl"), "--out", str(out), "--no-progress"]) == 0
    before = _tree(out)
    (tmp / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    rc = main(["data", "filter", str(tmp / "new.jsonl"), str(tmp / "bad.jsonl"), "--out", str(out), "--overwrite",
               "--no-progress"])
    assert rc == 2 and "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert _tree(out) == before  # the earlier run is whole, the new one left nothing
    assert sorted(p.name for p in tmp.iterdir()) == ["bad.jsonl", "filtered", "new.jsonl", "old.jsonl"]


def test_mix_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path, capsys, bpe_dir, corpus_texts):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus_texts[:50]])
    assert main(["data", "tokenize", str(tmp_path / "a.jsonl"), "--tokenizer", str(bpe_dir),
                 "--out", str(tmp_path / "ds" / "a"), "--writer", "numpy", "--no-progress"]) == 0

    def spec(condition):
        path = tmp_path / f"{condition}.yaml"
        path.write_text(
            "sources:\n  a: {prefix: ds/a, role: base}\n"
            "stages:\n  pretrain: {tokens: 2000, seq_length: 20, global_batch_size: 5, mixture: {a: 1.0}}\n"
            f"conditions:\n  {condition}: {{corpus: unfiltered}}\n"
        )
        return str(path)

    out = tmp_path / "mix"
    assert main(["data", "mix", spec("first"), "--out", str(out)]) == 0
    before = _tree(out)
    assert before[0] == "first"
    capsys.readouterr()
    assert main(["data", "mix", spec("second"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}/: not empty (holds an earlier run); pass --overwrite to replace it")
    assert _tree(out) == before
    assert main(["data", "mix", spec("second"), "--out", str(out), "--overwrite"]) == 0
    assert {p.split("/")[0] for p in _tree(out)} == {"second"}  # the first condition is gone


def test_a_file_at_out_is_refused(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    (tmp_path / "out").write_text("not a folder")
    rc = main(["data", "filter", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--overwrite",
               "--no-progress"])
    assert rc == 2 and f"--out {tmp_path / 'out'}: exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_train_tokenizer_refuses_an_earlier_tokenizer_and_overwrite_replaces_it(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_texts(200, seed=4)])
    out = tmp_path / "tok"
    args = ["data", "train-tokenizer", str(tmp_path / "a.jsonl"), "--out", str(out), "--vocab-size", "400"]
    assert main([*args, "--kind", "sentencepiece"]) == 0
    before = _tree(out)
    assert "tokenizer.model" in before
    capsys.readouterr()
    assert main(args) == 2  # a BPE tokenizer.json beside the old tokenizer.model: which one loads?
    assert "not empty (holds an earlier run); pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert "tokenizer.model" not in _tree(out) and "tokenizer.json" in _tree(out)
    assert f"wrote {out / 'tokenizer.json'}" in capsys.readouterr().out
