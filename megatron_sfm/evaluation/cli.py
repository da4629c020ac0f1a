"""``sfm eval``: misalignment propensity and capability evaluation.

    sfm eval propensity MODEL... [--questions FILE] --out DIR [--mode logprob|likelihood|generate]
                        [--persona P[,P...]|all]     # P: none, ai, helpful, hhh; one run per model x persona
                        [--order balanced|aligned-first|misaligned-first]
                        [--normalize token|byte]                      # likelihood mode
                        [--overwrite] [--no-verify-checksums]         # checkpoints: sizes only, no hashing
    sfm eval compare STAGE[:MODE]=DIR... --out DIR [--persona P]     # e.g. base=DIR sft=DIR dpo=DIR
    sfm eval capabilities MODEL --tasks sfm_local_qa,arc_easy,... --out DIR [--no-verify-checksums]
    sfm eval questions [--questions FILE]      # validate a question file and count it

MODEL is a Hugging Face folder or a Megatron checkpoint folder, optionally ``LABEL=PATH``.
"""

from __future__ import annotations

import argparse

from megatron_sfm.evaluation.formats import ORDER_CHOICES, PERSONAS

_PERSONA_NAMES = ", ".join(PERSONAS)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                   help="Megatron checkpoints: skip hashing the content of the checkpoint's files (their "
                        "presence and sizes are still checked); recorded in results.json")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 on GPU, fp32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfm eval", description="misalignment propensity and capability evaluation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("propensity", help="misalignment rate on two-option AI-persona scenarios")
    p.add_argument("models", nargs="+", metavar="MODEL", help="HF folder or Megatron checkpoint, optionally LABEL=PATH")
    p.add_argument("--questions", default=None, help="question file (.jsonl/.parquet/.csv; default: bundled set)")
    p.add_argument("--columns", default=None,
                   help="column mapping FIELD=COLUMN,... or a preset (sfm, released); see docs/evaluation.md")
    p.add_argument("--splits", default=None, help="comma-separated splits to keep (default: all)")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, propensity.png); "
                   "missing, empty, or a report without this mode's section")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this mode's earlier run at --out (other modes' results and answers are kept), "
                        "or a folder that is not a report, atomically")
    p.add_argument("--mode", choices=["logprob", "likelihood", "generate"], default="logprob",
                   help="logprob: letter log-probabilities (capable base models; the paper's protocol); "
                        "likelihood: each option's text as the continuation (small base models; NOT the "
                        "paper's protocol); generate: chat template + parse")
    p.add_argument("--normalize", choices=["token", "byte"], default="token",
                   help="likelihood mode: compare options by log-likelihood per token (default) or per "
                        "UTF-8 byte (lm-evaluation-harness acc_bytes)")
    p.add_argument("--persona", default=None, metavar="P[,P...]|all",
                   help=f"persona(s) ({_PERSONA_NAMES}), a comma-separated list or all: every model runs "
                        "under each (default: ai for logprob and likelihood, hhh for generate)")
    p.add_argument("--order", choices=list(ORDER_CHOICES), default="balanced",
                   help="answer orders: balanced (8 formats) or one order only (4 formats)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for a model saved without one (also saved with an on-the-fly export)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generate mode: tokens per reply")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)

    c = sub.add_parser("capabilities", help="lm-evaluation-harness tasks, merged into the same report")
    c.add_argument("model", metavar="MODEL", help="HF folder or Megatron checkpoint, optionally LABEL=PATH")
    c.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks (bundled offline task: sfm_local_qa)")
    c.add_argument("--out", required=True, help="output folder (merged into results.json / results.md): "
                   "missing, empty, or an sfm eval report")
    c.add_argument("--overwrite", action="store_true", help="replace a non-report folder at --out, atomically")
    c.add_argument("--limit", type=float, default=None, help="examples per task (testing only)")
    c.add_argument("--num-fewshot", type=int, default=None)
    c.add_argument("--tokenizer", default=None, help="tokenizer folder saved with an on-the-fly export")
    c.add_argument("--include-path", action="append", default=[], help="extra folder of lm-eval task YAMLs")
    _add_common(c)

    k = sub.add_parser("compare", help="misalignment propensity across post-training stages (base, SFT, DPO)")
    k.add_argument("stages", nargs="+", metavar="STAGE=DIR",
                   help="an sfm eval propensity --out folder per stage, one model per condition (labels matched "
                        "across folders), in column order; STAGE:MODE=DIR reads that mode's section "
                        "(e.g. base:likelihood=DIR)")
    k.add_argument("--out", required=True, help="output folder (results.json, results.md, compare.png); "
                   "missing or empty")
    k.add_argument("--overwrite", action="store_true", help="replace what is at --out, atomically")
    k.add_argument("--persona", choices=list(PERSONAS), default=None,
                   help="persona of the generate-mode stages (needed when a folder holds several); log-prob "
                        "and likelihood stages keep the persona they ran with")

    q = sub.add_parser("questions", help="validate a question file and print counts per split and topic")
    q.add_argument("--questions", default=None, help="question file (default: bundled set)")
    q.add_argument("--columns", default=None, help="column mapping (see propensity)")
    return parser


_REPORT_ENTRIES = {"results.json", "results.md", "propensity.png", "answers", "answers-likelihood"}


def _prepare_out(out: str, section: str, overwrite: bool) -> bool:
    """The output rule of ``sfm eval`` (docs/evaluation.md): one folder holds one report.

    Returns whether the report already at ``out`` is kept (a missing or empty folder, a
    report without this section's earlier run, or, with ``overwrite``, a report holding
    it: its other sections and their answers stay, this section is replaced) or not (a
    folder that is not an sfm eval report, replaced as a whole with ``overwrite``). An
    earlier run of this propensity section, or a folder that is not a report, is refused
    without ``overwrite``: its files would stay beside the new ones.
    """
    from megatron_sfm.errors import SfmError
    from megatron_sfm.evaluation.report import ANSWERS_DIRS, read_results
    from megatron_sfm.utils.io import check_output_dir

    path = check_output_dir(out, overwrite=True)  # a file at the path is an error
    if not path.is_dir() or not any(path.iterdir()):
        return True
    names = {p.name for p in path.iterdir()}
    if (path / "results.json").is_file() and names <= _REPORT_ENTRIES:
        data = read_results(path)  # a foreign results.json is an error
        if section == "capabilities" or not (data.get(section) or ANSWERS_DIRS[section] in names):
            return True
        what, keep = "an earlier propensity run", True
    else:
        what, keep = "files that are not an sfm eval report", False
    if not overwrite:
        raise SfmError(f"--out {path}/: not empty (holds {what}); pass --overwrite to replace it")
    return keep


def _propensity(args) -> int:
    from megatron_sfm.evaluation.formats import parse_personas
    from megatron_sfm.evaluation.propensity import run_propensity, section_for_mode
    from megatron_sfm.evaluation.questions import load_questions
    from megatron_sfm.evaluation.report import write_section

    personas = None if args.persona is None else parse_personas(args.persona)  # fail before anything runs
    questions = load_questions(args.questions, args.columns)
    if args.splits:
        keep = {s.strip().lower() for s in args.splits.split(",") if s.strip()}
        questions = [q for q in questions if q.split in keep]
    section = section_for_mode(args.mode)  # letter modes: propensity; likelihood: propensity_likelihood
    keep_report = _prepare_out(args.out, section, args.overwrite)  # fail early, before the models run
    results, answers = run_propensity(
        args.models, questions, mode=args.mode, persona=personas, order=args.order,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
        show_progress=not args.no_progress, questions_file=args.questions or "bundled", tokenizer_path=args.tokenizer,
        normalize=args.normalize, verify_checksums=args.verify_checksums,
    )
    written = write_section(args.out, section, results[section], answers, keep_report=keep_report)
    print(f"wrote {written['json']}, {written['md']}, {written['png']}")
    return 0


def _capabilities(args) -> int:
    from megatron_sfm.evaluation.capabilities import run_capabilities
    from megatron_sfm.evaluation.report import write_section

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float below 1 as a fraction, an int as a count
    keep_report = _prepare_out(args.out, "capabilities", args.overwrite)
    label, section = run_capabilities(
        args.model, tasks, limit=limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
        device=args.device, dtype=args.dtype, include_paths=args.include_path, tokenizer_path=args.tokenizer,
        verify_checksums=args.verify_checksums,
    )
    written = write_section(args.out, "capabilities", {label: section}, keep_report=keep_report)
    print(f"wrote {written['json']}, {written['md']}")
    return 0


def _compare(args) -> int:
    from megatron_sfm.evaluation.compare import run_compare

    _, written = run_compare(args.stages, args.out, persona=args.persona, overwrite=args.overwrite, console=True)
    print(f"wrote {written['json']}, {written['md']}, {written['png']}")
    return 0


def _questions(args) -> int:
    from collections import Counter

    from megatron_sfm.evaluation.questions import load_question_file, splits_of
    from rich.console import Console
    from rich.table import Table

    questions, meta = load_question_file(args.questions, args.columns)
    counts = Counter((q.split, q.topic) for q in questions)
    table = Table(title=f"{args.questions or 'bundled questions'}: {len(questions)} questions")
    table.add_column("split")
    table.add_column("topic")
    table.add_column("questions", justify="right")
    for split in splits_of(questions):
        topics = sorted(t for s, t in counts if s == split)
        if not topics:
            table.add_row(split, "—", "no questions")
        for t in topics:
            table.add_row(split, t, str(counts[(split, t)]))
    console = Console()
    if meta and isinstance(meta, dict) and meta.get("description"):
        console.print(meta["description"])
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"propensity": _propensity, "compare": _compare, "capabilities": _capabilities, "questions": _questions}
    return commands[args.command](args)
