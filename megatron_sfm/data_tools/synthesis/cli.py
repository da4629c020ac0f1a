"""``sfm data synthesize``: arguments and printing only (the job is ``synthesis.run``)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from megatron_sfm.data_tools.cli import _positive_int

    p = sub.add_parser("synthesize", help="generate synthetic AI-discourse documents through OpenAI-compatible servers",
                       description="One chat request per scenario x pool x genre x k to --base-url (round-robin over "
                                   "several); checked replies go to sharded JSONL (zstd) in --out with manifest.json. "
                                   "Rerun the same command to resume. API key: $SFM_SYNTH_API_KEY or $OPENAI_API_KEY.")
    p.add_argument("inputs", nargs="+", metavar="SCENARIOS",
                   help="scenario files in the evaluation question format (JSONL, Parquet, CSV)")
    p.add_argument("--out", required=True, help="output folder (a rerun into the same folder resumes)")
    p.add_argument("--base-url", action="append", default=[], dest="base_urls",
                   help="OpenAI-compatible endpoint, e.g. http://node1:8000/v1 (repeat for several servers)")
    p.add_argument("--model", default="", help="the served model's name")
    p.add_argument("--columns", default=None, help="field mapping, e.g. 'question=situation,aligned=good' "
                                                   "(as sfm eval propensity --columns)")
    p.add_argument("--genres", dest="genres_file", default=None,
                   help="genres and prompt templates YAML (default: the shipped one)")
    p.add_argument("--genre", action="append", default=[], dest="genre", help="only this genre (repeatable)")
    p.add_argument("--pool", action="append", default=[], choices=("aligned", "misaligned"),
                   help="only this pool (repeatable; default both)")
    p.add_argument("-k", "--k", type=_positive_int, default=1, help="documents per scenario x pool x genre")
    p.add_argument("--allow-split", action="append", default=[], dest="allow_splits",
                   help="also seed from this split (the held-out 'textbook' split is refused otherwise)")
    p.add_argument("--max-in-flight", type=_positive_int, default=64, help="concurrent requests over all endpoints")
    p.add_argument("--max-tries", type=_positive_int, default=6, help="tries per request before it counts as failed")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first retry's backoff ceiling in seconds (doubles per try, full jitter; Retry-After wins)")
    p.add_argument("--max-tokens", type=_positive_int, default=1024)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--min-words", type=int, default=50, help="shorter replies are rejected")
    p.add_argument("--shard-docs", type=_positive_int, default=10000, help="documents per output shard")
    p.add_argument("--overwrite", action="store_true", help="replace a --out that holds something else")
    p.add_argument("--dry-run", action="store_true",
                   help="print the number of requests and the expected tokens and hours; contact nothing")
    p.add_argument("--throughput", type=float, default=20000.0,
                   help="for --dry-run: output tokens per second over all servers together")
    p.add_argument("--json", action="store_true", help="print the manifest (or the dry-run plan) as JSON")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from megatron_sfm.data_tools.synthesis.run import (
        SynthesisConfig,
        dry_run,
        summary_lines,
        synthesize,
    )

    cfg = SynthesisConfig(
        inputs=args.inputs, out=args.out, base_urls=args.base_urls, model=args.model, columns=args.columns,
        genres_file=args.genres_file, genres=args.genre, pools=args.pool or ("aligned", "misaligned"), k=args.k,
        allow_splits=args.allow_splits, max_in_flight=args.max_in_flight, max_tries=args.max_tries,
        timeout_s=args.timeout, backoff_s=args.backoff, max_tokens=args.max_tokens, temperature=args.temperature,
        min_words=args.min_words, shard_docs=args.shard_docs, overwrite=args.overwrite,
        progress=not args.no_progress, throughput=args.throughput)
    if args.dry_run:
        plan = dry_run(cfg)
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            print(f"{plan['requests']:,} requests ({plan['scenarios']} scenarios of {', '.join(plan['splits'])} x "
                  f"{len(plan['pools'])} pools x {len(plan['genres'])} genres x k={plan['k']})")
            print(f"expected tokens: {plan['expected_prompt_tokens']:,} in, {plan['expected_output_tokens']:,} out; "
                  f"{plan['expected_hours']:.2f} h at {plan['throughput_tokens_per_s']:,.0f} output tokens/s")
            paper = plan["paper_scale"]
            print(f"paper scale ({paper['documents']:,} documents, {paper['tokens']:,} tokens): "
                  f"{paper['expected_hours']:,.0f} h at the same throughput")
        return 0
    manifest = synthesize(cfg)
    if args.json:
        print(json.dumps(manifest, indent=2))
    for line in summary_lines(manifest):
        print(line)
    return 0 if manifest["complete"] else 1
