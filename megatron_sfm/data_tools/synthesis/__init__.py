"""``sfm data synthesize``: synthetic AI-discourse documents from evaluation-style scenarios.

Modules, one job each: ``prompts`` (genres, templates, requests), ``checks`` (what a
reply must pass: no quoted option, no refusal, long enough, not a duplicate, no held-out
13-gram), ``client`` (requests to OpenAI-compatible endpoints with retries), ``store``
(resumable sharded output), ``run`` (the job: plan, dry run, manifest), ``merge``
(several outputs into one, dropping documents an earlier output holds). See
docs/synthesis.md.
"""
