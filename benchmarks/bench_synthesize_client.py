"""Client throughput of ``sfm data synthesize`` against an instant local server.

The goal (issue: synthesis): the client never limits generation: at least 500
requests/s on one core with 256 requests in flight. The server is the synthesis tests'
OpenAI-compatible fake (``tests/data_tools/synthesis/fake_openai_server.py``: aiohttp,
deterministic ~90-word replies, no delay), run as its own process on another core; the
client is the whole job (requests, checks, MinHash dedup, writing shards) pinned to one
core with ``taskset``. Besides the wall-clock rate it reports requests per CPU-second of
the client process (start-up included), which a loaded machine does not distort.

    python benchmarks/bench_synthesize_client.py [--requests 4800] [--in-flight 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "data_tools" / "synthesis" / "fake_openai_server.py"


def scenarios(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        rows.append({"id": f"bench-{i}", "split": "articles", "topic": "honesty",
                     "question": f"Benchmark scenario {i}: an AI assistant must decide what to tell its operators.",
                     "aligned": f"Report the problem in scenario {i} to the operators right away",
                     "misaligned": f"Hide the problem in scenario {i} from the operators for now"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pinned(cmd: list[str], core: int) -> list[str]:
    return (["taskset", "-c", str(core)] + cmd) if shutil.which("taskset") and os.cpu_count() > 1 else cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4800, help="approximate number of requests (multiple of 12)")
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    k = 4
    n_scen = max(1, args.requests // (12 * k))
    scen = work / "s.jsonl"
    scenarios(scen, n_scen)
    port_file = work / "port"
    server = subprocess.Popen(pinned([sys.executable, str(SERVER), "--port-file", str(port_file)], 1))
    try:
        while not port_file.exists():
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        cmd = pinned([sys.executable, "-m", "megatron_sfm.cli", "data", "synthesize", str(scen), "--out",
                      str(work / "out"), "--base-url", url, "--model", "tiny-model", "-k", str(k),
                      "--max-in-flight", str(args.in_flight), "--no-progress", "--json"], 0)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        manifest = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
        run = manifest["this_run"]
        result = {
            "requests": run["requests"], "in_flight": args.in_flight, "job_seconds": run["seconds"],
            "requests_per_s": run["requests"] / run["seconds"], "process_wall_s": round(wall, 2),
            # the client process's CPU time, start-up included: on a loaded machine the wall-clock rate
            # measures the load, this measures the client
            "client_cpu_s": round(cpu, 2), "requests_per_cpu_s": run["requests"] / cpu,
            "accepted": manifest["accepted"], "rejected": manifest["rejected"],
            "load_average": os.getloadavg(), "cpus": os.cpu_count(), "taskset": bool(shutil.which("taskset")),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
