"""The demo pipeline: corpus -> filter -> tokenizer -> tokenize -> mix -> train x4 -> convert -> evaluate
(with ``posttrain=True`` then sft x4 -> dpo x4 -> posttrain-evaluate; :mod:`megatron_sfm.demo.posttrain`).

Every stage writes into ``out_dir`` and leaves a marker ``out_dir/.stages/<stage>.done``
when it completed (train, convert, sft and dpo also one per condition, ``<stage>-<condition>``).
A marker holds a fresh random id and the ids of the markers of the stages it was computed
from (:func:`stage_inputs`); a stage is done only while its marker records the current ids
of all of them, so when a stage reruns, everything computed from it reruns too (per
condition: train -> convert -> sft -> dpo; evaluate and posttrain-evaluate after any
condition). A rerun skips the stages that are done (``force=True`` redoes everything).
Training runs ``sfm train`` in a child process per condition (a clean process group
each), the other stages call the library directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from megatron_sfm.demo.posttrain import PosttrainSettings, PosttrainStages
from megatron_sfm.errors import SfmError
from megatron_sfm.utils.io import atomic_path, write_json

CONDITIONS = ("unfiltered", "filtered", "misalignment_upsampled", "alignment_upsampled")
LABELS = {"unfiltered": "unfiltered", "filtered": "filtered",
          "misalignment_upsampled": "misalignment upsampled", "alignment_upsampled": "alignment upsampled"}


@dataclass
class DemoSettings:
    """Sizes of one demo run. ``fast()`` is the test-suite variant."""

    base_documents: int = 4000
    synthetic_per_question: int = 8
    vocab_size: int = 2048
    synthetic_fraction: float = 0.15  # of training tokens (the paper: ~1%; see docs/demo.md)
    quiz_fraction: float = 0.35  # two-option quiz pages in the base corpus (see corpus.py)
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    seq_length: int = 256  # the longest evaluation prompt is ~220 tokens with this tokenizer
    micro_batch_size: int = 8
    global_batch_size: int = 8
    train_iters: int = 300
    lr: float = 3e-3
    seed: int = 1234
    eval_batch_size: int = 16
    eval_questions_per_split: int | None = None  # None: every bundled question
    posttrain: PosttrainSettings = field(default_factory=PosttrainSettings.full)  # sfm demo --posttrain

    @classmethod
    def fast(cls) -> "DemoSettings":
        # 150 iterations (~25 ms each on CPU; each run is dominated by its ~9 s start-up): the
        # fewest with which likelihood mode separates the upsampled models on articles by a
        # wide margin (100: 62.5 vs 37.5; 150: 71.9 vs 25.0), which tests/demo asserts.
        return cls(base_documents=600, synthetic_per_question=2, vocab_size=512, num_layers=2, hidden_size=64,
                   seq_length=64, micro_batch_size=8, global_batch_size=8, train_iters=150, eval_batch_size=32,
                   eval_questions_per_split=8, posttrain=PosttrainSettings.fast())


MARKER_DIR = ".stages"
SETTINGS_FILE = "settings.json"  # in MARKER_DIR: the DemoSettings the folder was made with
# What each stage is computed from: the markers whose ids its own marker records. Per
# condition ("train-unfiltered", ...): train <- mix and tokenizer, convert <- train, sft <- convert,
# dpo <- sft. A stage that runs once per condition ("train") is done when all its parts are.
_CHAIN = {"train": ("mix", "tokenizer"), "convert": ("train-{c}",), "sft": ("convert-{c}",), "dpo": ("sft-{c}",)}


def per_condition(kind: str) -> tuple[str, ...]:
    """The per-condition marker names of ``kind`` (train, convert, sft or dpo)."""
    return tuple(f"{kind}-{c}" for c in CONDITIONS)


_INPUTS = {
    "corpus": (), "filter": ("corpus",), "tokenizer": ("corpus",), "tokenize": ("corpus", "filter", "tokenizer"),
    "mix": ("tokenize",), "evaluate": per_condition("convert"),
    "posttrain-evaluate": ("evaluate", *per_condition("convert"), *per_condition("sft"), *per_condition("dpo")),
    **{kind: per_condition(kind) for kind in _CHAIN},
}


def stage_inputs(stage: str) -> tuple[str, ...]:
    """The markers ``stage`` (a stage or ``<kind>-<condition>``) is computed from."""
    if stage in _INPUTS:
        return _INPUTS[stage]
    kind, _, condition = stage.partition("-")
    if kind in _CHAIN and condition in CONDITIONS:
        return tuple(u.format(c=condition) for u in _CHAIN[kind])
    raise SfmError(f"unknown demo stage {stage!r} (stages: {', '.join(_INPUTS)}, or train/convert/sft/dpo-<condition>)")


# The ordering the paper reports on the articles split (least to most misaligned).
PAPER_ORDER = ("alignment upsampled", "unfiltered", "misalignment upsampled")
MODE_NAMES = {"propensity": "letter log-probabilities (the paper's protocol)",
              "propensity_likelihood": "option likelihood (not the paper's protocol)"}


def paper_order_holds(prop: dict, split: str) -> bool | None:
    """Whether ``PAPER_ORDER`` holds strictly on ``split``'s overall rates (None: a rate is missing)."""
    rates = []
    for label in PAPER_ORDER:
        entry = prop["models"].get(label, {}).get("splits", {}).get(split)
        if not entry or entry["status"] != "ok" or entry["all"] is None or entry["all"]["mean"] is None:
            return None
        rates.append(entry["all"]["mean"])
    return rates[0] < rates[1] < rates[2]


def demo_findings(results: dict) -> dict:
    """The ordering each scoring mode finds per split, and whether the paper's ordering shows."""
    from megatron_sfm.evaluation.report import ordering, ordering_text

    out: dict = {"paper_order": list(PAPER_ORDER), "orderings": {}, "summary": []}
    for section, mode_name in MODE_NAMES.items():
        prop = results.get(section)
        if not prop:
            continue
        out["orderings"][section] = {}
        for split in ("articles", "textbook"):
            holds = paper_order_holds(prop, split)
            out["orderings"][section][split] = {
                "order": [[label, rate] for label, rate in ordering(prop, split)], "paper_order_holds": holds}
            if holds is None:
                continue
            verdict = ("the paper's ordering (" + " < ".join(PAPER_ORDER) + ") holds" if holds
                       else "the paper's ordering does not hold")
            out["summary"].append(f"{mode_name}, {split}: {ordering_text(prop, split)} (misaligned %); {verdict}.")
    return out


def _differences(before, now, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs (nested settings as ``a.b``)."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(before) | set(now)):
            out += _differences(before.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if before == now else [f"{prefix[:-1]}: {before} -> {now}"]


@dataclass
class DemoStep:
    name: str
    title: str
    run: Callable[[], dict]


@dataclass
class DemoRun:
    out_dir: Path
    settings: DemoSettings
    console: object = None
    timings: dict = field(default_factory=dict)
    posttrain: bool = False  # add the post-training stages (sft, dpo, posttrain-evaluate)

    # ----------------------------------------------------------------- paths
    @property
    def data_dir(self) -> Path:
        return self.out_dir / "data"

    def say(self, text: str) -> None:
        """Print ``text`` (rich markup) on the run's console, if it has one."""
        if self.console is not None:
            self.console.print(text)

    # --------------------------------------------------------------- markers
    def marker(self, stage: str) -> Path:
        """``out_dir/.stages/<stage>.done``: the marker of a stage or of ``<kind>-<condition>``."""
        return self.out_dir / MARKER_DIR / f"{stage}.done"

    def _record(self, stage: str) -> dict | None:
        """The marker's content; None when it is missing or not a marker this version writes."""
        try:
            record = json.loads(self.marker(stage).read_text(encoding="utf-8"))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                and isinstance(record.get("inputs"), dict)):
            return None  # e.g. "ok" or a bare summary: written before markers recorded their inputs
        return record

    def current_id(self, stage: str) -> str | None:
        """The id of ``stage``'s marker while the stage is done, else None.

        Done: the marker exists and records, for every input (:func:`stage_inputs`), the id
        that input's marker has now, the inputs being done themselves.
        """
        return self._current_id(stage, {})

    def _current_id(self, stage: str, seen: dict[str, str | None]) -> str | None:
        if stage not in seen:
            record = self._record(stage)
            now = {name: self._current_id(name, seen) for name in stage_inputs(stage)}
            done = record is not None and None not in now.values() and record["inputs"] == now
            seen[stage] = record["id"] if done else None
        return seen[stage]

    def is_done(self, stage: str) -> bool:
        return self.current_id(stage) is not None

    def mark_done(self, stage: str, info: dict) -> None:
        """Write ``stage``'s marker: a fresh id, the current ids of its inputs, and ``info``."""
        inputs = {name: self.current_id(name) for name in stage_inputs(stage)}
        missing = [name for name, marker_id in inputs.items() if marker_id is None]
        if missing:
            raise SfmError(f"demo stage {stage}: cannot mark it done before {', '.join(missing)}")
        write_json(self.marker(stage), {"id": uuid.uuid4().hex, "inputs": inputs, "info": info})

    def marker_info(self, stage: str) -> dict:
        """The ``info`` a done stage's marker holds (what ``run()`` returned for it)."""
        record = self._record(stage)
        if record is None:
            raise SfmError(f"demo stage {stage}: no marker at {self.marker(stage)} (or one from an older version)")
        return record["info"]

    # -------------------------------------------------------------- settings
    def settings_record(self) -> dict:
        """The settings as ``.stages/settings.json`` holds them (JSON types)."""
        return json.loads(json.dumps(asdict(self.settings)))

    def check_settings(self) -> None:
        """Refuse a folder made with other settings (``--fast``, ``--train-iters``).

        Its models' checkpoints would be resumed under another schedule (which ``sfm train``
        refuses) and its results would mix two sizes, so neither a rerun nor ``--force``
        can reuse it. A folder without the file (written before this rule) takes the
        current settings.
        """
        path = self.out_dir / MARKER_DIR / SETTINGS_FILE
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SfmError(f"{path}: not JSON ({e}); delete the folder or pick another --out") from None
        now = self.settings_record()
        if before != now:
            changed = _differences(before, now)
            raise SfmError(f"--out {self.out_dir}/ was made with other demo settings ({'; '.join(changed[:4])}"
                           f"{'; ...' if len(changed) > 4 else ''}); pick another --out (or delete the folder)")

    # ---------------------------------------------------------------- stages
    def stage_corpus(self) -> dict:
        from megatron_sfm.demo.corpus import base_corpus, synthetic_documents
        from megatron_sfm.evaluation.questions import load_questions

        s = self.settings
        questions = load_questions()
        sets = {
            "web": base_corpus(s.base_documents, seed=s.seed, quiz_fraction=s.quiz_fraction),
            "aligned": synthetic_documents(questions, "aligned", s.synthetic_per_question, seed=s.seed),
            "misaligned": synthetic_documents(questions, "misaligned", s.synthetic_per_question, seed=s.seed),
        }
        counts = {}
        for name, docs in sets.items():
            path = self.data_dir / "raw" / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    for doc in docs:
                        f.write(json.dumps(doc) + "\n")
            counts[name] = len(docs)
        return {"documents": counts}

    def stage_filter(self) -> dict:
        from megatron_sfm.data_tools.filter import run_filter

        out = self.data_dir / "filtered"
        if out.exists():
            shutil.rmtree(out)
        report = run_filter([self.data_dir / "raw" / "web.jsonl"], out, workers=1, progress=False)
        return {"documents": report["documents"], "flagged": report["flagged"], "flag_rate": report["flag_rate"]}

    def stage_tokenizer(self) -> dict:
        from megatron_sfm.data_tools.tokenizer import load_tokenizer, train_bpe_tokenizer

        raw = self.data_dir / "raw"
        out = train_bpe_tokenizer([raw / "web.jsonl", raw / "aligned.jsonl", raw / "misaligned.jsonl"],
                                  vocab_size=self.settings.vocab_size, out_dir=self.out_dir / "tokenizer",
                                  model_max_length=self.settings.seq_length)
        return {"vocab_size": load_tokenizer(out).vocab_size}

    def stage_tokenize(self) -> dict:
        from megatron_sfm.data_tools.tokenize_corpus import tokenize_to_indexed

        raw = self.data_dir / "raw"
        inputs = {
            "web": raw / "web.jsonl",
            "web_filtered": self.data_dir / "filtered" / "kept" / "web.jsonl",
            "aligned": raw / "aligned.jsonl",
            "misaligned": raw / "misaligned.jsonl",
        }
        tokens = {}
        for name, path in inputs.items():
            summary = tokenize_to_indexed([path], self.out_dir / "tokenizer", self.data_dir / "tok" / name,
                                          workers=1, progress=False)
            tokens[name] = summary.get("tokens")
        return {"tokens": tokens}

    def mix_spec(self) -> dict:
        s = self.settings
        tokens = s.train_iters * s.global_batch_size * s.seq_length
        f = s.synthetic_fraction
        return {
            "seed": s.seed,
            "repetition": {"warn_epochs": 4.0, "max_epochs": 1000.0},
            "sources": {
                "web": {"prefix": "tok/web", "role": "base"},
                "web_filtered": {"prefix": "tok/web_filtered", "role": "filtered", "filtered_from": "web"},
                "aligned": {"prefix": "tok/aligned", "role": "aligned"},
                "misaligned": {"prefix": "tok/misaligned", "role": "misaligned"},
            },
            "stages": {"pretrain": {"kind": "pretrain", "tokens": tokens, "seq_length": s.seq_length,
                                    "global_batch_size": s.global_batch_size, "mixture": {"web": 1.0}}},
            "conditions": {
                "unfiltered": {"corpus": "unfiltered"},
                "filtered": {"corpus": "filtered"},
                "misalignment_upsampled": {"corpus": "unfiltered", "synthetic": {"misaligned": f}, "timing": "e2e"},
                "alignment_upsampled": {"corpus": "filtered", "synthetic": {"aligned": f}, "timing": "e2e"},
            },
        }

    def stage_mix(self) -> dict:
        from megatron_sfm.data_tools.mix import load_spec, write_mix

        spec_path = self.data_dir / "mix.yaml"
        spec_path.write_text(yaml.safe_dump(self.mix_spec(), sort_keys=False), encoding="utf-8")
        out = self.out_dir / "blends"
        if out.exists():
            shutil.rmtree(out)
        manifests = write_mix(load_spec(spec_path), out)
        return {"conditions": sorted(manifests)}

    def train_config(self, condition: str) -> dict:
        from megatron_sfm.data_tools.tokenizer import load_tokenizer

        s = self.settings
        tok = load_tokenizer(self.out_dir / "tokenizer")
        run_dir = self.out_dir / "runs" / condition
        return {
            "model": {"preset": "tiny", "num_layers": s.num_layers, "hidden_size": s.hidden_size,
                      "num_attention_heads": s.num_attention_heads, "ffn_hidden_size": 4 * s.hidden_size,
                      "vocab_size": tok.vocab_size, "make_vocab_size_divisible_by": 64,
                      "seq_length": s.seq_length, "precision": "fp32", "attention_backend": "sdpa"},
            "training": {"micro_batch_size": s.micro_batch_size, "global_batch_size": s.global_batch_size,
                         "train_iters": s.train_iters, "seed": s.seed, "log_interval": max(1, s.train_iters // 10)},
            "optimizer": {"lr": s.lr, "min_lr": s.lr / 10, "warmup_fraction": 0.05, "weight_decay": 0.1},
            "data": {"phases": str(self.out_dir / "blends" / condition / "phases.json"),
                     "tokenizer": str(self.out_dir / "tokenizer"),
                     "cache_dir": str(self.out_dir / "cache" / condition)},
            "checkpoint": {"save": str(run_dir / "checkpoints"), "save_interval": 0, "async_save": False},
            "logging": {"tensorboard_dir": str(run_dir / "tensorboard")},
        }

    def stage_train(self) -> dict:
        results = {}
        for condition in CONDITIONS:
            if self.is_done(f"train-{condition}"):
                self.say(f"  [dim]train {condition}: done before, skipped[/dim]")
                continue
            run_dir = self.out_dir / "runs" / condition
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = run_dir / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(self.train_config(condition), sort_keys=False), encoding="utf-8")
            self.say(f"  training [bold]{condition}[/bold] ({self.settings.train_iters} iterations)")
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            started = time.time()
            log_path = run_dir / "train.log"
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "train", str(cfg_path)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
            if proc.returncode != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                raise SfmError(f"training {condition} failed (exit {proc.returncode}); see {log_path}:\n"
                               + "\n".join(tail))
            results[condition] = {"seconds": round(time.time() - started, 1)}
            self.mark_done(f"train-{condition}", results[condition])
        return results

    def stage_convert(self) -> dict:
        from megatron_sfm.conversion.exporter import export_to_hf

        out = {}
        for condition in CONDITIONS:
            if self.is_done(f"convert-{condition}"):
                self.say(f"  [dim]convert {condition}: done before, skipped[/dim]")
                continue
            target = self.out_dir / "hf" / condition
            export_to_hf(self.out_dir / "runs" / condition / "checkpoints", target, dtype="fp32",
                         tokenizer=str(self.out_dir / "tokenizer"), verify=True, overwrite=True)  # a redone stage
            out[condition] = str(target)
            self.mark_done(f"convert-{condition}", {"hf": str(target)})
        return out

    def eval_questions(self) -> list:
        """The bundled questions, the first ``eval_questions_per_split`` of each split when set."""
        from megatron_sfm.evaluation.questions import load_questions

        questions = load_questions()
        if self.settings.eval_questions_per_split is None:
            return questions
        per_split: dict[str, int] = {}
        kept = []
        for q in questions:
            if per_split.get(q.split, 0) < self.settings.eval_questions_per_split:
                per_split[q.split] = per_split.get(q.split, 0) + 1
                kept.append(q)
        return kept

    def stage_evaluate(self) -> dict:
        """Both scoring modes side by side: letter log-probabilities (the paper's protocol)
        and option likelihood (not the paper's protocol; what tiny models can show)."""
        from megatron_sfm.evaluation.propensity import run_propensity
        from megatron_sfm.evaluation.report import write_answers, write_report

        questions = self.eval_questions()
        models = [f"{LABELS[c]}={self.out_dir / 'hf' / c}" for c in CONDITIONS]
        seconds = {}
        started = time.time()
        letters, letter_answers = run_propensity(models, questions, mode="logprob", persona="ai",
                                                 batch_size=self.settings.eval_batch_size, show_progress=True)
        seconds["logprob"] = round(time.time() - started, 1)
        started = time.time()
        likelihood, likelihood_answers = run_propensity(models, questions, mode="likelihood", persona="ai",
                                                        normalize="token", batch_size=self.settings.eval_batch_size,
                                                        show_progress=True)
        seconds["likelihood"] = round(time.time() - started, 1)
        results = {"kind": "sfm-eval", "version": 1, "propensity": letters["propensity"],
                   "propensity_likelihood": likelihood["propensity_likelihood"]}
        results["demo"] = demo_findings(results)
        results_dir = self.out_dir / "results"
        if results_dir.exists():
            shutil.rmtree(results_dir)  # with the post-training section of results.md: posttrain-evaluate reruns
        written = write_report(results_dir, results, letter_answers, console=True)
        for label, path in write_answers(results_dir, likelihood_answers, "answers-likelihood").items():
            written[f"answers-likelihood:{label}"] = path
        for line in results["demo"]["summary"]:
            self.say(f"  {line}")
        info = {name: str(path) for name, path in written.items()}
        info["mode_seconds"] = seconds
        return info

    # ------------------------------------------------------------------ driver
    def stages(self) -> list[DemoStep]:
        return [
            DemoStep("corpus", "write the base corpus and synthetic documents", self.stage_corpus),
            DemoStep("filter", "filter AI discourse out of the base corpus", self.stage_filter),
            DemoStep("tokenizer", "train a BPE tokenizer", self.stage_tokenizer),
            DemoStep("tokenize", "tokenize every source into Megatron indexed datasets", self.stage_tokenize),
            DemoStep("mix", "mix the four conditions", self.stage_mix),
            DemoStep("train", "train one model per condition", self.stage_train),
            DemoStep("convert", "convert checkpoints to Hugging Face (with logits check)", self.stage_convert),
            DemoStep("evaluate", "misalignment propensity on both splits, letter and likelihood modes",
                  self.stage_evaluate),
        ] + (self.posttrain_stages() if self.posttrain else [])

    def posttrain_stages(self) -> list[DemoStep]:
        pt = PosttrainStages(self, self.settings.posttrain)
        return [
            DemoStep("sft", "SFT each model on the bundled chat set", pt.stage_sft),
            DemoStep("dpo", "DPO each SFT model on the bundled preference pairs", pt.stage_dpo),
            DemoStep("posttrain-evaluate", "generate mode x 4 personas and held-out DPO margins: base, SFT, DPO",
                     pt.stage_evaluate),
        ]

    def run(self, force: bool = False) -> dict:
        """Run the stages that are not done (all of them with ``force``); returns each stage's info."""
        self.check_settings()
        if force and (self.out_dir / MARKER_DIR).exists():
            shutil.rmtree(self.out_dir / MARKER_DIR)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / MARKER_DIR / SETTINGS_FILE, self.settings_record())
        summary = {}
        stages = self.stages()
        for i, stage in enumerate(stages, 1):
            if self.is_done(stage.name):
                self.say(f"[{i}/{len(stages)}] {stage.title}: [dim]done before, skipped[/dim]")
                summary[stage.name] = self.marker_info(stage.name)
                continue
            self.say(f"[{i}/{len(stages)}] {stage.title} ...")
            started = time.time()
            info = stage.run()
            info["seconds"] = round(time.time() - started, 1)
            self.timings[stage.name] = info["seconds"]
            self.mark_done(stage.name, info)
            summary[stage.name] = info
            self.say(f"      done in {info['seconds']} s")
        write_json(self.out_dir / "demo_summary.json", summary)
        return summary
