"""End to end through a real OpenAI-compatible server: ``transformers serve`` on a tiny model built here."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from synth_helpers import _q, read_docs, sfm, write_scenarios


def _tiny_chat_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["an ai assistant explains why it reported the truth to its operators"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=4096, eos_token_id=0, bos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_serve_end_to_end(tmp_path):
    serve = shutil.which("transformers")
    assert serve, "the transformers CLI (pip install 'transformers[serving]') is needed"
    model = _tiny_chat_model(tmp_path / "model")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([serve, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if json.load(r)["data"]:
                        break
            except OSError:
                time.sleep(1)
        scen = write_scenarios(tmp_path / "s.jsonl", [_q(0), _q(1)])
        out = tmp_path / "out"
        res = sfm(scen, "--out", out, "--base-url", url, "--model", str(model), "--genre", "fiction",
                  "--max-tokens", 24, "--min-words", 0, "--max-in-flight", 2, "--timeout", 120)
        assert res.returncode == 0, res.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-2000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["requests"] == 4 and manifest["failed"] == 0
        assert manifest["accepted"] + sum(manifest["rejected"].values()) == 4
        assert manifest["tokens_out"] > 0 and manifest["accepted"] >= 1
        docs = read_docs(out)
        assert len(docs) == manifest["accepted"]
        assert all(d["text"] and d["model"] == str(model) and d["usage"]["completion_tokens"] > 0 for d in docs)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
