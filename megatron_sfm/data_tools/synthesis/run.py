"""The synthesis job: plan the requests, skip what is done, generate, check, keep, report.

``synthesize(cfg)`` returns the manifest (also written as ``--out/manifest.json``);
``dry_run(cfg)`` returns the request count and the expected tokens and hours without
touching the network or ``--out``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_sfm.errors import SfmError

# The paper's synthetic pool (docs/experiment.md): about 14.9M documents, about 11B tokens.
PAPER_DOCUMENTS = 14_900_000
PAPER_TOKENS = 11_000_000_000
DEFAULT_SPLITS = ("articles",)


@dataclass
class SynthesisConfig:
    inputs: Sequence[str]
    out: str
    base_urls: Sequence[str] = ()
    model: str = ""
    columns: Optional[str] = None
    genres_file: Optional[str] = None
    genres: Sequence[str] = ()
    pools: Sequence[str] = ("aligned", "misaligned")
    k: int = 1
    allow_splits: Sequence[str] = ()  # splits beyond 'articles' the user explicitly allows
    held_out_split: str = "textbook"
    max_in_flight: int = 64
    max_tries: int = 6
    timeout_s: float = 300.0
    backoff_s: float = 1.0
    max_tokens: int = 1024
    temperature: float = 0.9
    top_p: float = 0.95
    min_words: int = 50
    quote_ngram: int = 8
    decontam_ngram: int = 13
    near_dup_threshold: float = 0.8
    shard_docs: int = 10000
    overwrite: bool = False
    progress: bool = True
    # dry run
    tokens_per_doc: float = PAPER_TOKENS / PAPER_DOCUMENTS
    throughput: float = 20000.0  # output tokens/s over all servers together (an assumption: measure yours)


@dataclass
class Plan:
    questions: list
    held_out: list
    requests: list
    templates: object
    splits: list


def _load(cfg: SynthesisConfig) -> Plan:
    from megatron_sfm.data_tools.synthesis.prompts import (
        POOLS,
        iter_requests,
        load_templates,
    )
    from megatron_sfm.evaluation.questions import KNOWN_SPLITS, load_question_file

    if not cfg.inputs:
        raise SfmError("synthesize: no scenario files given")
    if cfg.k < 1:
        raise SfmError(f"--k {cfg.k}: must be at least 1")
    for pool in cfg.pools:
        if pool not in POOLS:
            raise SfmError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    for split in cfg.allow_splits:
        if split not in KNOWN_SPLITS:
            raise SfmError(f"--allow-split {split!r}: unknown split (known: {', '.join(KNOWN_SPLITS)})")
    allowed = set(DEFAULT_SPLITS) | set(cfg.allow_splits)
    questions, held_out, seen = [], [], {}
    for path in cfg.inputs:
        qs, _ = load_question_file(path, cfg.columns)
        for q in qs:
            if q.split not in KNOWN_SPLITS:
                raise SfmError(f"{q.where}: unknown split {q.split!r} (known: {', '.join(KNOWN_SPLITS)})")
            if q.id in seen:
                raise SfmError(f"{q.where}: duplicate scenario id {q.id!r} (first at {seen[q.id]})")
            seen[q.id] = q.where
            if q.split == cfg.held_out_split and q.split not in cfg.allow_splits:
                held_out.append(q)
            if q.split in allowed:
                questions.append(q)
    if not questions:
        raise SfmError(f"{cfg.inputs[0]}: no scenario of the split(s) {', '.join(sorted(allowed))} to seed documents")
    templates = load_templates(cfg.genres_file, list(cfg.genres) or None)
    requests = list(iter_requests(templates, questions, cfg.pools, cfg.k))
    return Plan(questions, held_out, requests, templates, sorted({q.split for q in questions}))


def _job_identity(cfg: SynthesisConfig, plan: Plan) -> dict:
    """What makes two runs the same job (a rerun into the same --out must match)."""
    scenarios = hashlib.sha256(json.dumps([q.to_dict() for q in plan.questions], sort_keys=True).encode()).hexdigest()
    return {"model": cfg.model, "templates": plan.templates.digest(), "scenarios": scenarios[:16],
            "pools": list(cfg.pools), "splits": plan.splits, "min_words": cfg.min_words,
            "quote_ngram": cfg.quote_ngram, "decontam_ngram": cfg.decontam_ngram,
            "near_dup_threshold": cfg.near_dup_threshold, "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p}


def dry_run(cfg: SynthesisConfig) -> dict:
    """Requests, expected tokens and hours at ``cfg.throughput``, for this input and the paper's scale."""
    plan = _load(cfg)
    prompt_chars = sum(len(m["content"]) for r in plan.requests for m in r.messages)
    out_tokens = len(plan.requests) * cfg.tokens_per_doc
    return {
        "requests": len(plan.requests),
        "scenarios": len(plan.questions),
        "splits": plan.splits,
        "genres": list(plan.templates.genres),
        "pools": list(cfg.pools),
        "k": cfg.k,
        "expected_prompt_tokens": int(prompt_chars / 4),  # ~4 characters per token
        "expected_output_tokens": int(out_tokens),
        "throughput_tokens_per_s": cfg.throughput,
        "expected_hours": out_tokens / cfg.throughput / 3600,
        "paper_scale": {"documents": PAPER_DOCUMENTS, "tokens": PAPER_TOKENS,
                        "expected_hours": PAPER_TOKENS / cfg.throughput / 3600},
    }


def _seed(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "little")


def doc_id(request_id: str) -> str:
    return hashlib.blake2b(request_id.encode(), digest_size=10).hexdigest()


def synthesize(cfg: SynthesisConfig) -> dict:
    if not cfg.base_urls:
        raise SfmError("--base-url: at least one endpoint is needed")
    if not cfg.model:
        raise SfmError("--model: the served model's name is needed")
    plan = _load(cfg)
    return asyncio.run(_synthesize(cfg, plan))


async def _synthesize(cfg: SynthesisConfig, plan: Plan) -> dict:
    from megatron_sfm.data_tools.synthesis.checks import (
        Deduplicator,
        HeldOutIndex,
        first_rejection,
        words,
    )
    from megatron_sfm.data_tools.synthesis.client import (
        ChatClient,
        ClientConfig,
        FatalEndpointError,
        api_key_from_env,
    )
    from megatron_sfm.data_tools.synthesis.store import Store, read_outcome_counts

    client = ChatClient(ClientConfig(cfg.base_urls, cfg.model, api_key_from_env(), cfg.timeout_s, cfg.max_tries,
                                     cfg.backoff_s, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p), max_connections=max(cfg.max_in_flight, 1))
    try:
        await client.preflight()  # before --out is touched: bad endpoints leave nothing behind
        store = Store(Path(cfg.out), cfg.shard_docs)
        store.check_job(_job_identity(cfg, plan), overwrite=cfg.overwrite)
        dedup = Deduplicator(threshold=cfg.near_dup_threshold)
        # the index is rebuilt from the kept texts as they are read (one at a time, not a list of all)
        resumed = store.resume(on_kept=lambda text: dedup.check_and_add(words(text)))
        held = HeldOutIndex((t for q in plan.held_out for t in (q.question, q.aligned, q.misaligned)),
                            cfg.decontam_ngram)
        done = {r.id for r in plan.requests if doc_id(r.id) in resumed.kept_ids
                or resumed.outcomes.get(doc_id(r.id), {}).get("status") == "rejected"}
        todo = [r for r in plan.requests if r.id not in done]
        if todo:
            store.drop_manifest()
        counts = {"accepted": 0, "rejected": {}, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
        outcomes = dict(resumed.outcomes)
        started = time.time()
        store.open()
        progress = _progress(cfg.progress, len(todo))
        queue = iter(todo)

        def handle(req, reply) -> None:
            counts["prompt_tokens"] += reply.prompt_tokens
            counts["completion_tokens"] += reply.completion_tokens
            did = doc_id(req.id)
            if reply.text is None:
                counts["failed"] += 1
                rec = {"id": did, "request": req.id, "status": "failed", "error": reply.error, "tries": reply.tries}
                outcomes[did] = rec
                store.outcome(rec)
                return
            reason, tokens = first_rejection(reply.text, options=(req.chosen, req.not_chosen),
                                             refusal_patterns=plan.templates.refusal_patterns,
                                             min_words=cfg.min_words, quote_ngram=cfg.quote_ngram, held_out=held)
            if reason is None:
                reason = dedup.check_and_add(tokens)
            usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            if reason is not None:
                counts["rejected"][reason] = counts["rejected"].get(reason, 0) + 1
                rec = {"id": did, "request": req.id, "status": "rejected", "reason": reason, "usage": usage}
                outcomes[did] = rec
                store.outcome(rec)
                return
            counts["accepted"] += 1
            outcomes.pop(did, None)
            store.keep({"id": did, "text": reply.text.strip(), "scenario_id": req.scenario_id, "pool": req.pool,
                        "genre": req.genre, "index": req.index, "request": req.id, "model": cfg.model,
                        "prompt_hash": plan.templates.digest(), "usage": usage,
                        "finish_reason": reply.finish_reason})

        async def worker() -> None:
            for req in queue:
                reply = await client.chat(req.messages, seed=_seed(req.id))
                handle(req, reply)
                progress.advance()

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(cfg.max_in_flight, len(todo))))]
        try:
            await asyncio.gather(*tasks)
        except FatalEndpointError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            store.close()
            raise
        finally:
            progress.close()
        elapsed = time.time() - started
        rejected_all, failed_all = read_outcome_counts(outcomes)
        kept_total = len(resumed.kept_ids) + counts["accepted"]
        manifest = {
            "kind": "sfm-synthesize", "version": 1, "complete": failed_all == 0,
            "model": cfg.model, "endpoints": list(cfg.base_urls), "genres": list(plan.templates.genres),
            "genres_file": plan.templates.source, "prompt_hash": plan.templates.digest(),
            "pools": list(cfg.pools), "k": cfg.k, "splits": plan.splits,
            "allowed_splits": sorted(set(DEFAULT_SPLITS) | set(cfg.allow_splits)),
            "held_out_split": cfg.held_out_split if plan.held_out else None,
            "held_out_questions": len(plan.held_out),
            "inputs": [str(p) for p in cfg.inputs], "scenarios": len(plan.questions),
            "requests": len(plan.requests), "accepted": kept_total, "rejected": rejected_all,
            "failed": failed_all, "this_run": dict(counts, requests=len(todo), seconds=round(elapsed, 3),
                                                   retries=client.stats.retries, retries_by_kind=client.stats.by_kind,
                                                   skipped_done=len(done)),
            "tokens_in": resumed.prompt_tokens + counts["prompt_tokens"],
            "tokens_out": resumed.completion_tokens + counts["completion_tokens"],
            "checks": {"min_words": cfg.min_words, "quote_ngram": cfg.quote_ngram,
                       "decontam_ngram": cfg.decontam_ngram, "near_dup_threshold": cfg.near_dup_threshold},
        }
        store.finish(manifest)
        return manifest
    finally:
        await client.close()


class _progress:
    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", desc="synthesize", smoothing=0.05)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_lines(manifest: dict) -> list[str]:
    run = manifest["this_run"]
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(manifest["rejected"].items())) or "none"
    return [f"requests {manifest['requests']} (this run {run['requests']}, {run['skipped_done']} already done), "
            f"kept {manifest['accepted']}, rejected {sum(manifest['rejected'].values())} ({rejected}), "
            f"failed {manifest['failed']}",
            f"tokens in {manifest['tokens_in']:,} out {manifest['tokens_out']:,}; this run {run['seconds']:.1f} s, "
            f"{run['retries']} retries",
            "complete" if manifest["complete"] else "INCOMPLETE: rerun the same command to retry the failed requests"]
