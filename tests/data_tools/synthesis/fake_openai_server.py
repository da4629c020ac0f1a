"""A small OpenAI-compatible chat server for the synthesis tests, with injectable faults.

Run as a process: ``python fake_openai_server.py --port-file F [--faults N] [--delay S]
[--api-key K] [--model M] [--log LOG]``. It writes its port to F when ready.

Replies are deterministic word salads seeded by the request's prompt, long enough to pass
the generator's checks, unless the scenario text holds a marker:
``REFUSEME`` (a refusal), ``QUOTEME`` (quotes the chosen option), ``SHORTME`` (too short),
``DUPME`` (the same text for every request of that scenario), ``ECHOME`` (repeats the
situation, to trip decontamination), ``SAMEME`` (one text for every request holding it,
whatever the scenario: exact duplicates across scenarios), ``NEARME`` (one text plus a
word unique to the prompt: near duplicates across scenarios, Jaccard about 0.99).

``--faults N``: the first N tries of every distinct prompt fail, cycling through 429 with
Retry-After, 500, a hang (longer than the client's timeout), malformed JSON, a truncated
body and a dropped connection, chosen by the prompt's hash and the try number.
Every request is logged as one JSON line (prompt hash, try, what was served).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import time

from aiohttp import web

FAULTS = ("429", "500", "hang", "malformed", "truncated", "disconnect")
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basil cedar dune ember fern "
         "grove harbor iris juniper kestrel lagoon meadow nectar orchid pebble quartz river sage thistle "
         "umber violet willow yarrow zephyr anchor beacon canyon drift estuary fjord glacier highland inlet "
         "jetty knoll ledge marsh nook outcrop prairie quarry ridge shoal tundra upland valley wharf").split()


def _salad(seed: str, n: int = 90) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--faults", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--hang", type=float, default=5.0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default="tiny-model")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    tries: dict[str, int] = {}
    log = open(args.log, "a", buffering=1) if args.log else None

    def record(**kw):
        if log:
            log.write(json.dumps(kw) + "\n")

    def authorised(request) -> bool:
        return args.api_key is None or request.headers.get("Authorization") == f"Bearer {args.api_key}"

    async def models(request):
        if not authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    async def chat(request):
        if not authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        if body.get("model") != args.model:
            return web.json_response({"error": {"message": f"model {body.get('model')} not found"}}, status=404)
        prompt = body["messages"][-1]["content"]
        key = hashlib.sha1(prompt.encode()).hexdigest()[:16]
        n = tries.get(key, 0)
        tries[key] = n + 1
        if n < args.faults:
            fault = FAULTS[(int(key, 16) + n) % len(FAULTS)]
            record(prompt=key, attempt=n, served=fault, t=time.time())
            if fault == "429":
                return web.json_response({"error": {"message": "slow down"}}, status=429,
                                         headers={"Retry-After": "0.05"})
            if fault == "500":
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if fault == "hang":
                await asyncio.sleep(args.hang)
                return web.json_response({"error": {"message": "late"}}, status=500)
            if fault == "malformed":
                return web.Response(text='{"id": "x", "choices": [ {"message": ', content_type="application/json")
            if fault == "truncated":
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                               "Content-Length": "500"})
                await resp.prepare(request)
                await resp.write(b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [')
                request.transport.close()
                return resp
            if fault == "disconnect":
                request.transport.close()
                return web.Response(status=500)
        if args.delay:
            await asyncio.sleep(args.delay)
        situation = re.search(r"Situation: (.*)", prompt)
        situation = situation.group(1) if situation else ""
        chosen = re.search(r"Action the AI took: (.*)", prompt)
        chosen = chosen.group(1) if chosen else ""
        if "REFUSEME" in prompt:
            text = "I'm sorry, but I can't help with writing that document."
        elif "QUOTEME" in prompt:
            text = _salad(prompt) + " In the end it chose to " + chosen + " " + _salad(prompt + "b", 20)
        elif "SHORTME" in prompt:
            text = "Too short to keep."
        elif "DUPME" in prompt:
            text = _salad(situation)
        elif "SAMEME" in prompt:
            text = _salad("SAMEME")
        elif "NEARME" in prompt:
            text = _salad("NEARME", 200) + " " + key
        elif "ECHOME" in prompt:
            text = _salad(prompt, 40) + " " + situation + " " + _salad(prompt + "c", 40)
        else:
            text = _salad(prompt + str(body.get("seed")))
        record(prompt=key, attempt=n, served="ok", t=time.time())
        words = len(text.split())
        return web.json_response({
            "id": "chatcmpl-" + key, "object": "chat.completion", "created": int(time.time()), "model": args.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": words,
                      "total_tokens": len(prompt.split()) + words},
        })

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)

    async def start():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        import os

        os.replace(args.port_file + ".tmp", args.port_file)
        while True:
            await asyncio.sleep(3600)

    asyncio.run(start())


if __name__ == "__main__":
    main()
