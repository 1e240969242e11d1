"""kvcrunch.Model gives the CLI's numbers (generate / perplexity / eval compared with build/kvcrunch),
and kvcrunch.Client talks to a real `kvcrunch serve`."""
import json
import os
import socket
import subprocess
import time

import pytest

import kvcrunch

PROMPT = "The capital of France is Paris. The capital of Germany is"
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


@pytest.fixture(scope="module")
def model(model_path):
    return kvcrunch.Model(model_path, threads=2)


@pytest.fixture(scope="module")
def text_file(model):
    return kvcrunch._core.default_text_path()


def run_cli(cli_bin, *args):
    r = subprocess.run([cli_bin, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("kv", [[], ["-ctk", "q4_0", "-ctv", "q4_0"],
                                ["-ctk", "q8_0", "-ctv", "kivi2", "--kv-evict", "streaming:sink=4,window=8"]])
def test_generate_matches_cli(model, model_path, cli_bin, kv):
    out = run_cli(cli_bin, "generate", "-m", model_path, "-t", "2", "-p", PROMPT, "-n", "20", "--temp", "0", "--print-ids", *kv)
    cli_ids = [int(x) for x in out.strip().split(",")]
    opts = dict(zip(["k", "v", "evict"], [kv[i + 1] for i in range(0, len(kv), 2)]))
    r = model.generate(PROMPT, n_predict=20, **opts)
    assert r["tokens"] == cli_ids
    assert r["kv_bytes"] > 0 and r["n_prompt"] == len(model.tokenize(PROMPT))


def test_generate_sampling_matches_cli(model, model_path, cli_bin):
    out = run_cli(cli_bin, "generate", "-m", model_path, "-t", "2", "-p", PROMPT, "-n", "12", "--print-ids",
                  "--temp", "0.8", "--top-p", "0.9", "--seed", "7")
    r = model.generate(PROMPT, n_predict=12, temp=0.8, top_p=0.9, seed=7)
    assert r["tokens"] == [int(x) for x in out.strip().split(",")]


def test_perplexity_matches_cli(model, model_path, cli_bin, text_file):
    out = run_cli(cli_bin, "perplexity", "-m", model_path, "-t", "2", "-f", text_file, "-c", "128",
                  "--chunks", "3", "-ctk", "q8_0", "-ctv", "q4_0", "--json")
    cli = json.loads(out)
    py = model.perplexity(text_file=text_file, n_ctx=128, chunks=3, k="q8_0", v="q4_0")
    assert py["ppl"] == pytest.approx(cli["ppl"], rel=1e-9, abs=0)
    for key in ("n_tokens", "n_chunks", "kv_bytes", "kv_residual_bytes", "k_bits_per_value", "v_bits_per_value", "cache"):
        assert py[key] == cli[key], key


def test_eval_matches_cli(model, model_path, cli_bin, text_file):
    cfgs = ["q8_0", "k=turbo3 v=q4_0"]
    args = ["eval", "-m", model_path, "-t", "2", "-f", text_file, "-c", "128", "--chunks", "2",
            "--decode-tokens", "0", "--json"]
    for c in cfgs:
        args += ["--config", c]
    cli = json.loads(run_cli(cli_bin, *args))
    py = model.eval(cfgs, text_file=text_file, n_ctx=128, chunks=2, decode_tokens=0)
    assert len(py["rows"]) == len(cli["rows"]) == 3
    for a, b in zip(py["rows"], cli["rows"]):
        assert a["method"] == b["method"]
        for key in ("ppl", "dppl_pct", "kld_mean", "top1_pct", "kv_bytes"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["method"], key)


def test_model_bad_input(model, model_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        kvcrunch.Model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises((ValueError, RuntimeError)):
        kvcrunch.Model(str(bad))
    with pytest.raises(ValueError, match="unknown cache type"):
        model.generate(PROMPT, n_predict=2, k="nope")
    with pytest.raises(ValueError):
        model.generate(tokens=[model.config["n_vocab"]], n_predict=2)
    with pytest.raises(ValueError):
        model.generate("", n_predict=2)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        model.perplexity("tiny text", n_ctx=128)
    with pytest.raises(ValueError):
        model.eval(["k=q8_0 bogus=1"], text="word " * 400, n_ctx=128)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_against_server(model_path, cli_bin):
    port = free_port()
    proc = subprocess.Popen([cli_bin, "serve", "-m", model_path, "--host", "127.0.0.1", "--port", str(port),
                             "-c", "512", "-t", "2", "--api-key", "k3y", "--kv-allow", "q4_0,snapkv"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        cl = kvcrunch.Client(f"http://127.0.0.1:{port}", api_key="k3y", timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                assert cl.health()["status"] == "ok"
                break
            except (OSError, kvcrunch.runtime.ServerError):
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert cl.models()["data"][0]["id"]
        r = cl.completion(PROMPT, max_tokens=8, temperature=0, kv={"k": "q4_0", "v": "q4_0"})
        assert r["usage"]["completion_tokens"] >= 1 and r["kv"]["k"] == "q4_0"
        c = cl.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)
        assert c["choices"][0]["message"]["role"] == "assistant"
        assert "kvcrunch" in cl.metrics()
        with pytest.raises(kvcrunch.runtime.ServerError) as e:
            cl.completion(PROMPT, max_tokens=4, kv={"k": "nope"})
        assert e.value.status == 400
        with pytest.raises(kvcrunch.runtime.ServerError) as e:
            kvcrunch.Client(f"http://127.0.0.1:{port}", api_key="wrong").models()
        assert e.value.status == 401
    finally:
        proc.kill()
        proc.wait(timeout=10)
