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
