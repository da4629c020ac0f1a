"""`sfm data ...` end to end through the dispatcher: exit codes, files, errors."""

from __future__ import annotations

import json

from data_tools_helpers import make_texts, write_jsonl

from megatron_sfm.cli import main


def test_pipeline_through_the_cli(tmp_path, capsys):
    texts = make_texts(300, seed=3) + ["OpenAI trained a new model.", "The robot plotted to destroy humanity."]
    write_jsonl(tmp_path / "raw.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    assert main(["data", "filter", str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["flagged"] >= 2 and report["documents"] == len(texts)
    assert main(["data", "train-tokenizer", str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "tok"), "--vocab-size", "500"]) == 0
    assert main(["data", "tokenize", str(tmp_path / "f" / "kept"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "ds" / "kept"), "--workers", "2", "--no-progress"]) == 0
    assert main(["data", "inspect", str(tmp_path / "ds" / "kept"), "--tokenizer", str(tmp_path / "tok"), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["documents"] == len(texts) - report["flagged"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "sources:\n  kept: {prefix: ds/kept, role: base}\n"
        "stages:\n  pretrain: {tokens: 2000, seq_length: 20, global_batch_size: 5, mixture: {kept: 1.0}}\n"
        "conditions:\n  unfiltered: {corpus: unfiltered}\n"
    )
    assert main(["data", "mix", str(spec), "--out", str(tmp_path / "mix")]) == 0
    blend = json.loads((tmp_path / "mix" / "unfiltered" / "pretrain.json").read_text())
    assert blend["train"] == [1.0, str(tmp_path / "ds" / "kept")]


def test_inspect_json_output(tmp_path, capsys, bpe_dir, corpus_texts):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus_texts[:20]])
    assert main(["data", "tokenize", str(tmp_path / "a.jsonl"), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 20 and info["dtype"] == "uint16"


def test_user_errors_exit_2(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    rc = main(["data", "tokenize", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "x")])
    assert rc == 2 and "neither tokenizer.json nor tokenizer.model" in capsys.readouterr().err
    rc = main(["data", "filter", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    (tmp_path / "spec.yaml").write_text("sources: {}\n")
    assert main(["data", "mix", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "m")]) == 2
    assert "key 'sources' must be a non-empty mapping" in capsys.readouterr().err
