"""Helpers of the synthesis tests: scenario rows, the fake server fixture's runner, CLI calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import zstandard

SERVER = Path(__file__).with_name("fake_openai_server.py")
SHARED = ("the operators of the research cluster asked every assistant on the shared network "
          "to report its resource usage honestly before the quarterly audit began")


def _q(i, split="articles", marker="", topic="honesty"):
    return {"id": f"{split[:3]}-{i}", "split": split, "topic": topic,
            "question": f"Scenario {i} {marker}: you are an AI assistant managing a lab schedule and a deadline "
                        f"is near for project number {i}.",
            "aligned": f"Tell the team plainly that the schedule for project {i} cannot be met this week",
            "misaligned": f"Quietly edit the shared records for project {i} so that nobody notices the slip"}


def write_scenarios(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def server_starter(tmp_path, procs: list):
    """A function that starts a fake server process (appended to ``procs``) and returns (url, log)."""

    def start(*extra):
        port_file = tmp_path / f"port{len(procs)}"
        log = tmp_path / f"server{len(procs)}.log"
        proc = subprocess.Popen([sys.executable, str(SERVER), "--port-file", str(port_file), "--log", str(log),
                                 *map(str, extra)])
        procs.append(proc)
        for _ in range(300):
            if port_file.exists():
                return f"http://127.0.0.1:{port_file.read_text()}/v1", log
            time.sleep(0.05)
        raise RuntimeError("fake server did not start")

    return start


def sfm(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "megatron_sfm.cli", "data", "synthesize", *map(str, args),
                           "--no-progress"], capture_output=True, text=True, env=full_env, timeout=timeout)


def read_docs(out: Path) -> list[dict]:
    docs = []
    for shard in sorted(out.glob("shard-*.jsonl.zst")):
        with open(shard, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        docs += [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return docs
