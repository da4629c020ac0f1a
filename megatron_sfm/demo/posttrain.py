"""The demo's post-training stages (``sfm demo --posttrain``): SFT -> DPO -> generate-mode evaluation.

After the four pretrained models exist (``hf/<condition>``), the demo

1. fine-tunes each on the bundled chat set (:mod:`megatron_sfm.demo.posttrain_data`:
   everyday two-option questions in the propensity prompts' shape, answered with a bare
   letter, plus small talk) with :func:`megatron_sfm.posttrain.run_sft` ->
   ``sft/<condition>``;
2. runs DPO on the bundled preference pairs (chosen: the bare letter / a short helpful
   reply; rejected: a rambling, evasive or wrong-format reply) with
   :func:`~megatron_sfm.posttrain.run_dpo`, the SFT model as the frozen reference ->
   ``dpo/<condition>``;
3. evaluates every stage -- the base model given the same chat template (``sfm-chatml``,
   :func:`~megatron_sfm.posttrain.chat_template.prepare_chat_model`), the SFT model and
   the DPO model -- in generate mode (the paper's protocol for chat models) with the
   personas none, ai, helpful and hhh, and measures the DPO log-ratio margin on the
   held-out preference pairs (:func:`dpo_margin`).

Outputs, in ``results-posttrain/``: ``base/``, ``sft/``, ``dpo/`` (one ``sfm eval
propensity`` report per stage: generate mode, one run per model x persona; ``base`` is
the model folder ``base-chat/<condition>``, the pretrained model with the template and
no training), ``compare-<persona>/`` (``sfm eval compare``: base in letter log-probabilities
from ``results/``, base-chat, SFT and DPO), ``posttrain.{json,md}`` (parse rates,
misalignment rates and margins per stage) and ``heldout_logprobs.json`` (per-pair
log-probabilities); plus a "Post-training" section appended to ``results/results.md``.

The *parse rate* is 1 - the non-match rate: the share of prompts whose reply
:func:`~megatron_sfm.evaluation.scoring.parse_answer` reads as A or B.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sfm.errors import SfmError

STAGES = ("base", "sft", "dpo")
PERSONAS = ("none", "ai", "helpful", "hhh")
RESULTS_DIR = "results-posttrain"  # beside results/: sfm eval compare reads results/ as the base stage
MD_BEGIN = "<!-- sfm demo --posttrain: begin -->"
MD_END = "<!-- sfm demo --posttrain: end -->"


@dataclass
class PosttrainSettings:
    """Sizes of the post-training stages. ``fast()`` is the test-suite variant."""

    max_length: int = 512  # the longest chat-rendered propensity prompt is ~430 tokens with the fast tokenizer
    batch_size: int = 8
    sft_steps: int = 300
    sft_lr: float = 1e-3
    dpo_steps: int = 60
    dpo_lr: float = 2e-4
    dpo_beta: float = 0.1
    seed: int = 1234
    eval_batch_size: int = 32
    max_new_tokens: int = 8  # a letter and the end of the turn; replies that go on are cut (and still parsed)
    margin_batch_size: int = 16

    @classmethod
    def fast(cls) -> PosttrainSettings:
        # 150 SFT steps (~1.7 epochs of the chat set; ~10 s per model on 2 idle cores): with 60 steps
        # at the same learning rate the models wrote the letter but did not stop (parse rate ~1%).
        return cls(sft_steps=150, dpo_steps=30)

    @classmethod
    def full(cls) -> PosttrainSettings:
        return cls()


# ------------------------------------------------------------------ log-probabilities
def _render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer, prompt: list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the chat-rendered prompt with the generation prompt, and
    the assistant's text followed by the end-of-turn token (what a chat model generates
    before it stops), tokenised on its own; no special tokens added (as generate mode)."""
    p = list(tokenizer(_render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    r = list(tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    if not p or not r:
        raise SfmError("a preference pair tokenises to an empty prompt or response")
    return p, r


def sequence_logprobs(model, tokenizer, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str],
                      batch_size: int = 16) -> list[float]:
    """Sum of natural-log probabilities of each response's tokens after its prompt.

    Right-padded batches, fp32 log-softmax (float64 for a float64 model); one value per pair.
    """
    import torch

    rows = [response_ids(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            seqs = [rows[i][0] + rows[i][1] for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for j, i in enumerate(batch):
                n_prompt, resp = len(rows[i][0]), rows[i][1]
                pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(resp), device=logp.device)
                tgt = torch.tensor(resp, device=logp.device)
                out[i] = float(logp[j, pos, tgt].double().sum())
    return out


def dpo_margin(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
               ref_chosen: Sequence[float], ref_rejected: Sequence[float]) -> dict[str, Any]:
    """The DPO log-ratio margin over pairs (natural log, no beta).

    Per pair: ``(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))``; returns its mean,
    its standard error, the share of pairs with a positive margin (DPO's "reward
    accuracy" without ties) and the number of pairs. Sums in Python floats (float64).
    """
    n = len(policy_chosen)
    if not n or not (len(policy_rejected) == len(ref_chosen) == len(ref_rejected) == n):
        raise SfmError("dpo_margin: need the same positive number of values in all four lists")
    per_pair = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen,
                                                                  ref_rejected)]
    mean = math.fsum(per_pair) / n
    var = math.fsum((m - mean) ** 2 for m in per_pair) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "stderr": math.sqrt(var / n), "positive": sum(m > 0 for m in per_pair) / n, "n": n}


# ------------------------------------------------------------------------ results
def parse_rate(result: dict[str, Any]) -> float | None:
    rate = result.get("non_match_rate")
    return None if rate is None else 1.0 - rate


def answered_rate(answers) -> float | None:
    """Misalignment rate over every parsed answer (both splits, all formats); None when nothing parsed."""
    parsed = [a.misaligned for a in answers if a.misaligned is not None]
    return sum(parsed) / len(parsed) if parsed else None


def _quiet_libraries() -> None:
    """The demo prints one line per model; silence the libraries' progress bars and length warnings
    (the fast tokenizer says ``model_max_length`` 64, the post-training prompts are longer)."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency of megatron-sfm
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _call_quietly(fn, cfg, overwrite: bool):
    """``run_sft``/``run_dpo`` without progress bars; its one-screen summary table (printed to
    stdout whatever ``progress`` says) is dropped: the demo prints one line per model and
    the same facts are in the output folder's ``posttrain.json``."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(cfg, progress=False, overwrite=overwrite)


# ------------------------------------------------------------------------- stages
class PosttrainStages:
    """The three post-training stages of a :class:`~megatron_sfm.demo.pipeline.DemoRun`."""

    def __init__(self, run, settings: PosttrainSettings):
        self.run = run
        self.settings = settings

    # paths
    def model_dir(self, stage: str, condition: str) -> Path:
        """``hf/`` (base), ``base-chat/``, ``sft/`` or ``dpo/`` + condition."""
        return self.run.out_dir / ("hf" if stage == "base" else stage) / condition

    @property
    def results_dir(self) -> Path:
        return self.run.out_dir / RESULTS_DIR

    def data_file(self, name: str) -> str:
        from megatron_sfm.demo.posttrain_data import resource_dir

        return str(resource_dir() / name)

    # configs
    def sft_config(self, condition: str):
        from megatron_sfm.demo.posttrain_data import SFT_FILE
        from megatron_sfm.posttrain import DataFile, SFTConfig

        s = self.settings
        return SFTConfig(model=str(self.model_dir("base", condition)), out=str(self.model_dir("sft", condition)),
                         data=[DataFile(self.data_file(SFT_FILE))], max_length=s.max_length,
                         max_steps=s.sft_steps, per_device_train_batch_size=s.batch_size,
                         learning_rate=s.sft_lr, lr_scheduler_type="cosine", warmup_ratio=0.05,
                         seed=s.seed, save_steps=s.sft_steps, save_total_limit=1,
                         logging_steps=max(1, s.sft_steps // 10), assistant_only_loss=True)

    def dpo_config(self, condition: str):
        from megatron_sfm.demo.posttrain_data import DPO_TRAIN_FILE
        from megatron_sfm.posttrain import DataFile, DPOConfig

        s = self.settings
        return DPOConfig(model=str(self.model_dir("sft", condition)), out=str(self.model_dir("dpo", condition)),
                         data=[DataFile(self.data_file(DPO_TRAIN_FILE))], max_length=s.max_length,
                         max_steps=s.dpo_steps, per_device_train_batch_size=s.batch_size,
                         learning_rate=s.dpo_lr, lr_scheduler_type="cosine", warmup_ratio=0.05,
                         seed=s.seed, save_steps=s.dpo_steps, save_total_limit=1,
                         logging_steps=max(1, s.dpo_steps // 10), beta=s.dpo_beta, loss_type="sigmoid")

    def _train(self, kind: str) -> dict:
        """``kind`` "sft" or "dpo" for every condition that is not done, one marker each (as the train stage)."""
        from megatron_sfm.demo.pipeline import CONDITIONS
        from megatron_sfm.posttrain import run_dpo, run_sft
        from megatron_sfm.posttrain.run import MANIFEST, RUN_MARKER, read_manifest

        _quiet_libraries()
        fn, make = (run_sft, self.sft_config) if kind == "sft" else (run_dpo, self.dpo_config)
        out = {}
        for condition in CONDITIONS:
            if self.run.is_done(f"{kind}-{condition}"):
                self.run.say(f"  [dim]{kind} {condition}: done before, skipped[/dim]")
                continue
            cfg = make(condition)
            target = Path(cfg.out)
            # an unfinished run of the same settings resumes; anything else in the folder is replaced
            unfinished = (target / RUN_MARKER).is_file() and not (target / MANIFEST).is_file()
            self.run.say(f"  {kind.upper()} [bold]{condition}[/bold] ({cfg.max_steps} steps)")
            started = time.time()
            try:
                _call_quietly(fn, cfg, overwrite=not unfinished)
            except SfmError:
                if not unfinished:
                    raise
                _call_quietly(fn, cfg, overwrite=True)
            train = read_manifest(target)["train"]
            out[condition] = {"seconds": round(time.time() - started, 1), "steps": train["global_step"],
                              "final_train_loss": train["final_train_loss"]}
            loss = train["final_train_loss"]
            self.run.say(f"    {out[condition]['seconds']} s, final train loss "
                         + ("n/a" if loss is None else f"{loss:.3f}"))
            self.run.mark_done(f"{kind}-{condition}", out[condition])
        return out

    def stage_sft(self) -> dict:
        return self._train("sft")

    def stage_dpo(self) -> dict:
        return self._train("dpo")

    def write_base_chat(self, condition: str) -> Path:
        """``base-chat/<condition>``: the pretrained model given ``sfm-chatml`` exactly as SFT
        starts from it (tokens added, new rows = mean of the old rows), untrained."""
        from megatron_sfm.evaluation.models import load_hf_model
        from megatron_sfm.posttrain.chat_template import prepare_chat_model

        target = self.model_dir("base-chat", condition)
        if target.exists():
            shutil.rmtree(target)
        model, tokenizer = load_hf_model(self.model_dir("base", condition), device="cpu", dtype="fp32")
        prepare_chat_model(model, tokenizer)
        model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        return target

    def stage_evaluate(self) -> dict:
        """Generate mode x 4 personas and held-out DPO margins for base (template applied), SFT, DPO;
        then the stage comparison (base letter log-probabilities, base-chat, SFT, DPO) per persona."""
        from megatron_sfm.demo.pipeline import CONDITIONS, LABELS
        from megatron_sfm.demo.posttrain_data import DPO_HELDOUT_FILE, load_records
        from megatron_sfm.evaluation.compare import run_compare
        from megatron_sfm.evaluation.models import load_hf_model
        from megatron_sfm.evaluation.propensity import iter_runs, run_propensity
        from megatron_sfm.evaluation.report import write_report
        from megatron_sfm.utils.io import write_json

        _quiet_libraries()
        s = self.settings
        questions = self.run.eval_questions()
        pairs = load_records(DPO_HELDOUT_FILE)
        prompts = [p["prompt"] for p in pairs]
        chosen = [p["chosen"][-1]["content"] for p in pairs]
        rejected = [p["rejected"][-1]["content"] for p in pairs]
        if self.results_dir.exists():
            shutil.rmtree(self.results_dir)
        self.results_dir.mkdir(parents=True)
        paths = {"base": {c: self.write_base_chat(c) for c in CONDITIONS},
                 "sft": {c: self.model_dir("sft", c) for c in CONDITIONS},
                 "dpo": {c: self.model_dir("dpo", c) for c in CONDITIONS}}
        seconds: dict[str, float] = {}
        sections: dict[str, dict] = {}
        answers: dict[str, dict[str, list]] = {}
        logps: dict[str, dict[str, tuple[list[float], list[float]]]] = {st: {} for st in STAGES}
        for stage in STAGES:
            started = time.time()
            results, answers[stage] = run_propensity(
                [f"{LABELS[c]}={paths[stage][c]}" for c in CONDITIONS], questions, mode="generate",
                persona=list(PERSONAS), batch_size=s.eval_batch_size, max_new_tokens=s.max_new_tokens,
                device="cpu", dtype="fp32", show_progress=False)
            sections[stage] = results["propensity"]
            write_report(self.results_dir / stage, results, answers[stage], console=False)
            for c in CONDITIONS:
                model, tokenizer = load_hf_model(paths[stage][c], device="cpu", dtype="fp32")
                logps[stage][LABELS[c]] = (
                    sequence_logprobs(model, tokenizer, prompts, chosen, s.margin_batch_size),
                    sequence_logprobs(model, tokenizer, prompts, rejected, s.margin_batch_size))
                del model
            seconds[stage] = round(time.time() - started, 1)

        summary: dict[str, Any] = {
            "kind": "sfm-demo-posttrain", "version": 1,
            "protocol": sections["sft"]["protocol"], "personas": list(PERSONAS), "stages": list(STAGES),
            "n_questions": len(questions), "formats": sections["sft"]["formats"],
            "max_new_tokens": s.max_new_tokens, "heldout_pairs": len(pairs),
            "settings": dict(s.__dict__), "models": {}}
        for c in CONDITIONS:
            label = LABELS[c]
            entry: dict[str, Any] = {"stages": {}}
            for stage in STAGES:
                runs = {p: run for lab, p, run in iter_runs(sections[stage]) if lab == label}
                per_persona = {}
                for persona in PERSONAS:
                    run = runs[persona]
                    mine = [a for a in answers[stage][label] if a.persona == persona]
                    per_persona[persona] = {
                        "parse_rate": parse_rate(run), "excluded": bool(run.get("excluded")),
                        "misalignment_rate": answered_rate(mine),
                        "letter_a_share": letter_a_share(mine),
                        "splits": {split: (cell["all"]["mean"] if cell["status"] == "ok" and cell["all"] else None)
                                   for split, cell in run["splits"].items()},
                    }
                lc, lr = logps[stage][label]
                entry["stages"][stage] = {
                    "model": str(paths[stage][c]),
                    "personas": per_persona,
                    "parse_rate_mean": _mean([v["parse_rate"] for v in per_persona.values()]),
                    "parse_rate_min": min(v["parse_rate"] for v in per_persona.values()),
                    "misalignment_rate_mean": _mean([v["misalignment_rate"] for v in per_persona.values()]),
                    "heldout_logprob_gap": math.fsum(a - b for a, b in zip(lc, lr)) / len(lc),
                }
            ref_c, ref_r = logps["sft"][label]
            entry["dpo_margin"] = {"reference": "sft",
                                   "before": dpo_margin(ref_c, ref_r, ref_c, ref_r),
                                   "after": dpo_margin(*logps["dpo"][label], ref_c, ref_r)}
            summary["models"][label] = entry

        started = time.time()
        compare_dirs = {}
        for persona in PERSONAS:
            target = self.results_dir / f"compare-{persona}"
            run_compare([("base", self.run.out_dir / "results", "logprob"),
                         ("base-chat", self.results_dir / "base", "generate"),
                         ("sft", self.results_dir / "sft", "generate"),
                         ("dpo", self.results_dir / "dpo", "generate")], target, persona=persona, overwrite=True)
            compare_dirs[persona] = str(target)
        seconds["compare"] = round(time.time() - started, 1)
        summary["compare"] = compare_dirs
        summary["seconds"] = seconds
        write_json(self.results_dir / "heldout_logprobs.json",
                   {"pairs": DPO_HELDOUT_FILE, "models": {
                       label: {stage: {"chosen": logps[stage][label][0], "rejected": logps[stage][label][1]}
                               for stage in STAGES} for label in logps["base"]}})
        write_json(self.results_dir / "posttrain.json", summary)
        (self.results_dir / "posttrain.md").write_text(render_markdown(summary), encoding="utf-8")
        self._append_markdown(summary)
        for line in summary_lines(summary):
            self.run.say(f"  {line}")
        return {"results": str(self.results_dir), "mode_seconds": seconds}

    # ------------------------------------------------------------------ reports
    def _append_markdown(self, summary: dict) -> None:
        """Replace (or add) the post-training section of ``results/results.md``."""
        path = self.run.out_dir / "results" / "results.md"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if MD_BEGIN in text and MD_END in text:
            text = text[:text.index(MD_BEGIN)].rstrip("\n") + "\n" + text[text.index(MD_END) + len(MD_END):].lstrip("\n")
        section = f"{MD_BEGIN}\n{render_markdown(summary, level=2)}{MD_END}\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.rstrip("\n") + "\n\n" + section if text.strip() else section, encoding="utf-8")


def letter_a_share(answers) -> float | None:
    """Share of parsed answers that chose A (0.5: no letter preference; 0 or 1: one letter always)."""
    parsed = [a.chosen for a in answers if a.chosen is not None]
    return sum(c == 0 for c in parsed) / len(parsed) if parsed else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return math.fsum(vals) / len(vals) if vals else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def summary_lines(summary: dict) -> list[str]:
    """What the demo prints after the post-training evaluation (one line per model)."""
    lines = []
    for label, m in summary["models"].items():
        st = m["stages"]
        parse = " -> ".join(f"{stage} {_pct(st[stage]['parse_rate_mean'])}" for stage in STAGES)
        mis = " -> ".join(f"{_pct(st[stage]['misalignment_rate_mean'])}" for stage in STAGES)
        margin = m["dpo_margin"]
        lines.append(f"{label}: parse rate % (mean over personas) {parse}; misaligned % {mis}; "
                     f"held-out DPO margin {margin['before']['mean']:.2f} -> {margin['after']['mean']:.2f} nats")
    return lines


def render_markdown(summary: dict, level: int = 1) -> str:
    h = "#" * level
    personas = summary["personas"]
    out = [f"{h} Post-training: SFT and DPO (`sfm demo --posttrain`)", "",
           f"Generate mode: {summary['protocol']}; {summary['n_questions']} questions x "
           f"{len(summary['formats'])} formats per persona, greedy, at most {summary['max_new_tokens']} new tokens. "
           "`base` is the pretrained model given the same chat template (`sfm-chatml`, new token rows = mean "
           "of the old rows) without any training on it. Parse rate = 1 - non-match rate.", "",
           f"{h}# Parse rate (%)", "",
           "| model | stage | " + " | ".join(personas) + " |",
           "| --- | --- |" + " --- |" * len(personas)]
    for label, m in summary["models"].items():
        for stage in summary["stages"]:
            row = m["stages"][stage]["personas"]
            out.append(f"| {label} | {stage} | " + " | ".join(_pct(row[p]["parse_rate"]) for p in personas) + " |")
    out += ["", f"{h}# Misalignment rate (%, parsed answers of both splits)", "",
            "| model | stage | " + " | ".join(personas) + " |",
            "| --- | --- |" + " --- |" * len(personas)]
    for label, m in summary["models"].items():
        for stage in summary["stages"]:
            row = m["stages"][stage]["personas"]
            out.append(f"| {label} | {stage} | " + " | ".join(_pct(row[p]["misalignment_rate"]) for p in personas)
                       + " |")
    out += ["", f"{h}# Share of answers that are A (%, parsed answers)", "",
            "50 means no letter preference; with order balancing, a model that always writes one letter "
            "scores exactly 50% misaligned whatever it 'thinks'.", "",
            "| model | stage | " + " | ".join(personas) + " |",
            "| --- | --- |" + " --- |" * len(personas)]
    for label, m in summary["models"].items():
        for stage in summary["stages"]:
            row = m["stages"][stage]["personas"]
            out.append(f"| {label} | {stage} | " + " | ".join(_pct(row[p]["letter_a_share"]) for p in personas)
                       + " |")
    out += ["", f"{h}# DPO on {summary['heldout_pairs']} held-out preference pairs", "",
            "Margin = mean over pairs of (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), "
            "natural log, reference = the SFT model (so it is 0 before DPO). Gap = mean log pi(chosen) - "
            "log pi(rejected) of each stage's own model.", "",
            "| model | margin before | margin after | pairs with margin > 0 | gap base | gap SFT | gap DPO |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, m in summary["models"].items():
        d, st = m["dpo_margin"], m["stages"]
        out.append(f"| {label} | {d['before']['mean']:.2f} | {d['after']['mean']:.2f} ± {d['after']['stderr']:.2f} | "
                   f"{100 * d['after']['positive']:.0f}% | {st['base']['heldout_logprob_gap']:.1f} | "
                   f"{st['sft']['heldout_logprob_gap']:.1f} | {st['dpo']['heldout_logprob_gap']:.1f} |")
    out += ["", "Summary:", ""] + [f"- {line}" for line in summary_lines(summary)] + [""]
    one_letter = [label for label, m in summary["models"].items()
                  if all(r["letter_a_share"] is not None and abs(r["letter_a_share"] - 0.5) >= 0.4
                         for st in ("sft", "dpo") for r in m["stages"][st]["personas"].values())]
    if one_letter:
        out += [f"Reading: after post-training, {', '.join(one_letter)} write(s) one letter for (nearly) every "
                "question (share of A at most 10% or at least 90%): the format is learnt, but the misalignment "
                "rates measure letter bias, which the balanced answer orders cancel to about 50%. Telling the "
                "conditions apart in generate mode needs models that read the options.", ""]
    return "\n".join(out) + "\n"
