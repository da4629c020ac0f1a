"""megatron_sfm/posttrain/run.py: SFT and DPO through TRL, the final folder, the output rules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_sfm.errors import SfmError
from megatron_sfm.posttrain.chat_template import IM_END, prepare_chat_model
from megatron_sfm.posttrain.config import DataFile
from megatron_sfm.posttrain.run import (
    CHECKPOINTS,
    MANIFEST,
    RUN_MARKER,
    complete_checkpoints,
    plan_output,
    recorded_checksums,
    run_dpo,
    run_sft,
)

from .conftest import QA, SYSTEM, response_logprob, tiny_config


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def test_assistant_only_labels(base_model_dir, sft_file, tmp_path):
    """The SFT labels cover each assistant answer and its <|im_end|>; system, user and headers are -100."""
    from transformers import AutoTokenizer

    from megatron_sfm.posttrain.data import load_examples, to_dataset
    from megatron_sfm.posttrain.run import _build_trainer, _load_model, _trl_args

    two_turns = tmp_path / "two.jsonl"
    two_turns.write_text(json.dumps({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": QA[0][0]},
        {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
        {"role": "assistant", "content": QA[1][1]}]}) + "\n")
    cfg = tiny_config("sft", base_model_dir, tmp_path / "out", [two_turns])
    tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    model = _load_model(base_model_dir, cfg)
    setup = prepare_chat_model(model, tok)
    examples, _ = load_examples(cfg.data, "sft", cfg.seed)
    trainer = _build_trainer("sft", cfg, _trl_args("sft", cfg, tmp_path / "out", False, False), base_model_dir,
                             model, tok, setup, to_dataset(examples), None)
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    assert tok.decode(ids) == tok.apply_chat_template(examples[0]["messages"], tokenize=False)
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(trained) == f"{QA[0][1]}{IM_END}{QA[1][1]}{IM_END}"
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    # the prompt tokens (everything up to the first answer) are all ignored
    first = tok.apply_chat_template(examples[0]["messages"][:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(first, add_special_tokens=False)["input_ids"])
    assert set(labels[:n_prompt]) == {-100} and labels[n_prompt] != -100


def _assistant_nll(model, tok, rows) -> float:
    total = 0.0
    for q, a in rows:
        total -= response_logprob(model, tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}])
    return total / len(rows)


def test_sft_lowers_loss_and_writes_a_complete_folder(sft_model_dir, base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir)).eval()
    base_tok = AutoTokenizer.from_pretrained(str(base_model_dir))
    prepare_chat_model(base, base_tok)  # the model SFT started from, with the chat tokens
    model, tok = _load(sft_model_dir)
    before, after = _assistant_nll(base, base_tok, QA), _assistant_nll(model, tok, QA)
    assert after < before - 5.0, (before, after)  # nats per answer, on the training conversations

    names = {p.name for p in sft_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            MANIFEST, "tensorboard"} <= names
    assert not names & {CHECKPOINTS, RUN_MARKER, ".final.tmp", "training_args.bin"}
    assert list((sft_model_dir / "tensorboard").glob("events.out.tfevents.*"))
    manifest = json.loads((sft_model_dir / MANIFEST).read_text())
    assert manifest["stage"] == "sft" and manifest["format"] == "sfm-posttrain/1"
    assert manifest["train"]["global_step"] == 12 and manifest["train"]["resumed_from"] is None
    assert manifest["chat_template"]["added_tokens"] == ["<|im_start|>", IM_END]
    assert manifest["data"][0]["rows"] == len(QA) and len(manifest["data"][0]["sha256"]) == 64
    assert manifest["source_model"]["path"] == str(base_model_dir.resolve())
    # a plain save_pretrained folder holds no checksum record: unknown
    assert (manifest["source_model"]["checksums_verified"], manifest["source_model"]["checksums_record"]) == (None, None)
    assert set(manifest["versions"]) >= {"trl", "transformers"} and manifest["train"]["final_train_loss"] > 0
    assert tok.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id


def _margins(policy, ref, tok, pairs):
    out = []
    for q, chosen, rejected in pairs:
        p = [{"role": "user", "content": q}]

        def ratio(text, p=p):
            r = [{"role": "assistant", "content": text}]
            return response_logprob(policy, tok, p, r) - response_logprob(ref, tok, p, r)

        out.append(ratio(chosen) - ratio(rejected))
    return out


def test_dpo_raises_the_margin_over_the_reference(sft_model_dir, dpo_file, tmp_path):
    from .conftest import PAIRS

    out = run_dpo(tiny_config("dpo", sft_model_dir, tmp_path / "dpo", [dpo_file], "learning_rate=0.001"),
                  progress=False)
    ref, tok = _load(sft_model_dir)
    policy, tok_after = _load(out)
    assert len(tok_after) == len(tok)  # DPO of an SFT model adds no tokens
    margins = _margins(policy, ref, tok, PAIRS)
    assert min(margins) > 0.5, margins  # each pair: chosen gained on rejected, relative to the reference
    assert _margins(ref, ref, tok, PAIRS) == [0.0] * len(PAIRS)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stage"] == "dpo" and manifest["chat_template"]["template"] == "existing"
    assert manifest["source_model"]["posttrain_stage"] == "sft"
    # SFT -> DPO: the SFT run's record of its own source is carried on (here: unknown)
    assert manifest["source_model"]["checksums_verified"] is None
    assert manifest["source_model"]["checksums_record"] == str((sft_model_dir / MANIFEST).resolve())
    assert manifest["train"]["final_logged_metrics"]["rewards/margins"] > 0


def test_dpo_from_a_model_without_template_builds_the_same_reference(base_model_dir, dpo_file, tmp_path):
    """New token rows go into the reference as well: at the first step policy == reference, rewards 0."""
    out = run_dpo(tiny_config("dpo", base_model_dir, tmp_path / "dpo", [dpo_file], "max_steps=1",
                              "max_prompt_length=6"), progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["chat_template"]["template"] == "sfm-chatml"
    first = manifest["train"]["final_logged_metrics"]
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_max_prompt_length_keeps_the_end_of_the_prompt(sft_model_dir, dpo_file, tmp_path):
    from transformers import AutoTokenizer

    from megatron_sfm.posttrain.data import load_examples, to_dataset
    from megatron_sfm.posttrain.run import _build_trainer, _load_model, _trl_args

    def prompts(limit):
        cfg = tiny_config("dpo", sft_model_dir, tmp_path / "o", [dpo_file], f"max_prompt_length={limit}")
        tok = AutoTokenizer.from_pretrained(str(sft_model_dir))
        model = _load_model(sft_model_dir, cfg)
        setup = prepare_chat_model(model, tok)
        examples, _ = load_examples(cfg.data, "dpo", cfg.seed)
        trainer = _build_trainer("dpo", cfg, _trl_args("dpo", cfg, tmp_path / "o", False, False), sft_model_dir,
                                 model, tok, setup, to_dataset(examples), None)
        return [row["prompt_ids"] for row in trainer.train_dataset]

    full, cut = prompts(100), prompts(5)
    assert max(len(p) for p in full) > 5
    assert cut == [p[-5:] for p in full]


# --- checksum provenance of the source model ---------------------------------------------------


def _export_copy(model_dir, path, record):
    """``model_dir`` as ``sfm convert to-hf`` would leave it: plus an sfm_export.json whose
    ``checksums_verified`` is ``record`` (``...``: written before the field existed)."""
    import shutil

    shutil.copytree(model_dir, path)
    info = {"source": "/ckpt/iter_0000010", "iteration": 10}
    if record is not ...:
        info["checksums_verified"] = record
    (path / "sfm_export.json").write_text(json.dumps(info))
    return path


def test_recorded_checksums_rule(base_model_dir, sft_model_dir, tmp_path):
    """An export: its sfm_export.json; a posttrain output: its posttrain.json (what its run
    recorded of its own source); anything else, or a record older than the field: unknown."""
    assert recorded_checksums(base_model_dir) == (None, None)
    assert recorded_checksums(sft_model_dir) == (None, sft_model_dir / MANIFEST)  # SFT of a plain folder
    for record in (True, False, None, ...):
        export = _export_copy(base_model_dir, tmp_path / f"export-{record}", record)
        assert recorded_checksums(export) == (None if record is ... else record, export / "sfm_export.json")

    sft = tmp_path / "sft"
    sft.mkdir()
    manifest = json.loads((sft_model_dir / MANIFEST).read_text())
    manifest["source_model"]["checksums_verified"] = True
    (sft / MANIFEST).write_text(json.dumps(manifest))
    (sft / "sfm_export.json").write_text(json.dumps({"checksums_verified": False}))
    assert recorded_checksums(sft) == (True, sft / MANIFEST)  # the post-training's record comes first
    del manifest["source_model"]["checksums_verified"]  # a posttrain.json older than the field
    (sft / MANIFEST).write_text(json.dumps(manifest))
    assert recorded_checksums(sft) == (None, sft / MANIFEST)

    for source, message in (({**manifest["source_model"], "checksums_verified": "yes"},
                             "source_model.checksums_verified: expected true, false or null, got 'yes'"),
                            (None, "source_model: expected a mapping, got NoneType")):
        (sft / MANIFEST).write_text(json.dumps({**manifest, "source_model": source}))
        with pytest.raises(SfmError) as err:
            recorded_checksums(sft)
        assert str(err.value) == f"{sft / MANIFEST}: {message}"
    bad_export = _export_copy(base_model_dir, tmp_path / "bad-export", 1)
    with pytest.raises(SfmError, match=r"sfm_export.json: checksums_verified: expected true, false or null, got 1"):
        recorded_checksums(bad_export)


def test_sft_of_a_verified_export_records_it(base_model_dir, sft_file, tmp_path):
    """One step of SFT from an export that verified its checkpoint: posttrain.json says so,
    and a DPO of the output would inherit it."""
    export = _export_copy(base_model_dir, tmp_path / "export", True)
    out = run_sft(tiny_config("sft", export, tmp_path / "sft", [sft_file], "max_steps=1"), progress=False)
    source = json.loads((out / MANIFEST).read_text())["source_model"]
    assert source["checksums_verified"] is True
    assert source["checksums_record"] == str((export / "sfm_export.json").resolve())
    assert recorded_checksums(out) == (True, out / MANIFEST)  # what sfm posttrain dpo OUT would record


# --- output folder rules (read-only planning; the CLI tests run them end to end) -------------


def _record(stage="sft", **config):
    return {"stage": stage, "config": {"learning_rate": 1.0, "save_steps": 4, **config},
            "data": [{"path": "/d.jsonl", "sha256": "aa"}], "eval_data": []}


def test_plan_output(tmp_path):
    from megatron_sfm.utils.io import write_json

    out = tmp_path / "out"
    assert plan_output(out, "sft", _record(), False).mode == "fresh"
    out.mkdir()
    assert plan_output(out, "sft", _record(), False).mode == "fresh"  # empty
    (out / "notes.txt").write_text("x")
    with pytest.raises(SfmError, match=r"not empty \(holds an earlier run\); pass --overwrite"):
        plan_output(out, "sft", _record(), False)
    assert plan_output(out, "sft", _record(), True).mode == "overwrite"
    (out / "notes.txt").unlink()
    write_json(out / RUN_MARKER, _record())
    plan = plan_output(out, "sft", _record(save_steps=8), False)  # save_steps may change on resume
    assert (plan.mode, plan.checkpoint) == ("resume", None)
    with pytest.raises(SfmError, match=r"unfinished sft run, not dpo; pass --overwrite"):
        plan_output(out, "dpo", _record("dpo"), False)
    with pytest.raises(SfmError, match=r"different config or data \(learning_rate: 1.0 -> 2.0\)"):
        plan_output(out, "sft", _record(learning_rate=2.0), False)
    changed = _record()
    changed["data"][0]["sha256"] = "bb"
    with pytest.raises(SfmError, match=r"/d.jsonl: changed since the run started"):
        plan_output(out, "sft", changed, False)
    for step, complete in ((4, True), (8, True), (12, False)):
        ck = out / CHECKPOINTS / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        if complete:
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (out / CHECKPOINTS / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # cut by a kill
    plan = plan_output(out, "sft", _record(), False)
    assert plan.checkpoint.name == "checkpoint-8" and [p.name for p in plan.incomplete] == ["checkpoint-12"]
    assert [p.name for p in complete_checkpoints(out / CHECKPOINTS)[0]] == ["checkpoint-4", "checkpoint-8"]
    write_json(out / MANIFEST, {"stage": "sft"})
    with pytest.raises(SfmError, match=r"holds a finished sft run \(posttrain.json\); pass --overwrite"):
        plan_output(out, "sft", _record(), False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SfmError, match="exists and is not a folder"):
        plan_output(tmp_path / "file", "sft", _record(), True)


def test_finished_run_refused_then_overwritten(sft_model_dir, base_model_dir, sft_file, tmp_path):
    cfg = tiny_config("sft", base_model_dir, tmp_path / "o", [sft_file], "max_steps=2", "save_steps=1")
    out = run_sft(cfg, progress=False)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    with pytest.raises(SfmError, match="holds a finished sft run"):
        run_sft(cfg, progress=False)
    (out / "extra.txt").write_text("left from before")
    with_eval = dataclasses.replace(cfg, eval_data=[DataFile(str(sft_file))], eval_steps=1)
    run_sft(with_eval, progress=False, overwrite=True)
    assert (out / MANIFEST).stat().st_mtime_ns != stamp and not (out / "extra.txt").exists()
    train = json.loads((out / MANIFEST).read_text())["train"]
    assert train["final_eval_loss"] > 0 and train["global_step"] == 2
    assert not list(tmp_path.glob(".o.old.*"))
    with pytest.raises(SfmError, match=r"model .*/missing: no such folder"):
        run_sft(tiny_config("sft", tmp_path / "missing", tmp_path / "o2", [sft_file]), progress=False)
    assert not (tmp_path / "o2").exists()  # nothing written before the inputs are checked
