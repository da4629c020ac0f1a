"""`sfm demo --out`: the demo's own output rule. A folder of an earlier demo run resumes
(tests/demo/test_demo.py reruns into it); any other non-empty folder is refused."""

from __future__ import annotations

from megatron_sfm.cli import main as sfm


def test_a_non_demo_folder_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert sfm(["demo", "--fast", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: --out {out}/: not empty and not an earlier demo run (no .stages/ inside); pick another folder"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_an_earlier_demo_run_resumes(tmp_path, monkeypatch):
    from megatron_sfm.demo import pipeline

    calls = []
    monkeypatch.setattr(pipeline.DemoRun, "run", lambda self, force=False: calls.append(force) or {})
    out = tmp_path / "demo"
    (out / ".stages").mkdir(parents=True)
    (out / ".stages" / "corpus.done").write_text("{}")
    assert sfm(["demo", "--fast", "--out", str(out)]) == 0
    assert sfm(["demo", "--fast", "--out", str(tmp_path / "new")]) == 0  # a missing folder is fine too
    assert calls == [False, False]


def test_a_folder_made_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    """`.stages/settings.json` records the settings; a rerun (or --force) with others is
    refused, naming what differs, and changes nothing."""
    import json

    from megatron_sfm.demo import pipeline

    monkeypatch.setattr(pipeline.DemoRun, "stages", lambda self: [])  # only the settings rule runs
    out = tmp_path / "demo"
    assert sfm(["demo", "--fast", "--out", str(out)]) == 0
    settings = out / ".stages" / "settings.json"
    recorded = json.loads(settings.read_text())
    assert recorded["train_iters"] == pipeline.DemoSettings.fast().train_iters
    assert recorded["posttrain"]["sft_steps"] == pipeline.DemoSettings.fast().posttrain.sft_steps
    assert sfm(["demo", "--fast", "--out", str(out)]) == 0  # the same settings resume
    for extra in ([], ["--force"]):
        capsys.readouterr()
        assert sfm(["demo", "--fast", "--train-iters", "7", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"error: --out {out}/ was made with other demo settings (train_iters: 150 -> 7); "
                       "pick another --out (or delete the folder)")
    assert sfm(["demo", "--out", str(out)]) == 2  # full sizes: many settings differ
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "base_documents: 600 -> 4000" in err and err.count(" -> ") == 4 and "; ...)" in err
    assert json.loads(settings.read_text()) == recorded
    assert (out / ".stages").is_dir()  # --force refused before it removed the markers
