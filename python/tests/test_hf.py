"""kvcrunch.hf.Cache under transformers' generate on the real SmolLM2 GGUF (loaded by transformers
with gguf_file=). Run under transformers 4.57 (kvpress's range) and the newest 5.x."""
import gc
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
import kvcrunch  # noqa: E402
import kvcrunch.hf  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"
torch.manual_seed(0)
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def kv_model(model_path):
    return kvcrunch.Model(model_path)


@pytest.fixture(scope="module")
def hf_model(model_path):
    d, f = os.path.split(model_path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    m.eval()
    return m


def dyn(m):
    try:
        return DynamicCache(config=m.config)
    except TypeError:
        return DynamicCache()


def gen(m, ids, cache, n, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_f16_equals_dynamic_cache_token_for_token(hf_model, kv_model):
    ids = torch.tensor([kv_model.tokenize(PROMPT)])
    ref = gen(hf_model, ids, dyn(hf_model), 40)
    cache = kvcrunch.hf.Cache(hf_model.config, k="f16", v="f16")
    out = gen(hf_model, ids, cache, 40)
    assert out.tolist() == ref.tolist()
    mem = cache.memory()
    n_tok = ids.shape[1] + 39  # the last generated token is never written
    assert mem["cells"] == 30 * 3 * n_tok
    assert cache.get_seq_length() == n_tok


def chunk_logprobs(m, ids, cache):
    with torch.no_grad():
        return torch.log_softmax(m(ids, past_key_values=cache, use_cache=True).logits.float(), -1)


def test_q8_0_kld_at_cli_level(hf_model, kv_model):
    n_ctx = 256
    with open(kvcrunch._core.default_text_path(), encoding="utf-8") as f:
        text = f.read(200_000)
    toks = kv_model.tokenize(text)[:n_ctx]
    ids = torch.tensor([toks])
    lp_ref = chunk_logprobs(hf_model, ids, dyn(hf_model))
    cache = kvcrunch.hf.Cache(hf_model.config, k="q8_0", v="q8_0")
    lp = chunk_logprobs(hf_model, ids, cache)
    sl = slice(n_ctx // 2, n_ctx - 1)  # the CLI's protocol: second half of the chunk
    kld = (lp_ref.exp() * (lp_ref - lp)).sum(-1)[0, sl].mean().item()
    cli = kv_model.eval(["q8_0"], text=text[:40_000], n_ctx=n_ctx, chunks=1, decode_tokens=0)
    cli_kld = cli["rows"][1]["kld_mean"]
    print(f"q8_0 KLD: transformers + kvcrunch.hf.Cache {kld:.5f}, kvcrunch CLI {cli_kld:.5f}")
    assert 0 < kld < max(3 * cli_kld, 0.005)
    # and q8_0 really holds fewer bytes than f16 (measured allocation)
    f16 = kvcrunch.hf.Cache(hf_model.config, k="f16", v="f16")
    chunk_logprobs(hf_model, ids, f16)
    assert cache.memory()["kv_bytes"] < 0.55 * f16.memory()["kv_bytes"]


def reference_streaming(m, ids, n_new, sink, window):
    """Greedy decode with a DynamicCache trimmed by hand to sink + window tokens after every step,
    original RoPE positions passed explicitly (what kvcrunch.hf.Cache must reproduce)."""
    cache = dyn(m)
    out = []
    pos = ids.shape[1]
    with torch.no_grad():
        logits = m(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for step in range(n_new):
            nxt = int(logits.argmax(-1))
            out.append(nxt)
            if step == n_new - 1:
                break
            for layer in cache.layers:
                n = layer.keys.shape[-2]
                if n > sink + window:
                    keep = list(range(sink)) + list(range(n - window, n))
                    layer.keys = layer.keys[:, :, keep]
                    layer.values = layer.values[:, :, keep]
            n_phys = cache.layers[0].keys.shape[-2]
            kw = dict(past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]]),
                      attention_mask=torch.ones(1, n_phys + 1, dtype=torch.long))
            if transformers.__version__ < "5.4":
                kw["cache_position"] = torch.tensor([n_phys])
            logits = m(torch.tensor([[nxt]]), **kw).logits[:, -1]
            pos += 1
    return out


def test_streaming_eviction_positions_and_masks(hf_model, kv_model):
    ids = torch.tensor([kv_model.tokenize(PROMPT + " And the capital of Italy is")])
    sink, window = 4, 12
    ref = reference_streaming(hf_model, ids, 24, sink, window)
    cache = kvcrunch.hf.Cache(hf_model.config, k="f32", v="f32", evict=f"streaming:sink={sink},window={window}")
    out = gen(hf_model, ids, cache, 24)
    assert out[0].tolist() == ref
    n_tok = ids.shape[1] + 23
    assert cache.get_seq_length() == n_tok  # logical length: RoPE positions continue
    kept = cache.kept(layer=5, head=1)
    np.testing.assert_array_equal(kept, np.r_[0:sink, n_tok - window:n_tok])
    assert cache.get_mask_sizes(1, 0) == (sink + window + 1, n_tok - sink - window)
    # eviction frees bytes: same run without a policy holds more
    full = kvcrunch.hf.Cache(hf_model.config, k="f32", v="f32")
    gen(hf_model, ids, full, 24)
    assert cache.memory()["kv_bytes"] < full.memory()["kv_bytes"]


def test_batch_left_padding_equals_dynamic_cache(hf_model, kv_model):
    a = kv_model.tokenize(PROMPT)
    b = kv_model.tokenize("Once upon a time")
    n = max(len(a), len(b))
    ids = torch.tensor([[0] * (n - len(a)) + a, [0] * (n - len(b)) + b])
    mask = torch.tensor([[0] * (n - len(a)) + [1] * len(a), [0] * (n - len(b)) + [1] * len(b)])
    ref = gen(hf_model, ids, dyn(hf_model), 16, mask)
    out = gen(hf_model, ids, kvcrunch.hf.Cache(hf_model.config, k="f16", v="f16"), 16, mask)
    assert out.tolist() == ref.tolist()
    with pytest.raises(ValueError, match="batch > 1"):
        gen(hf_model, ids, kvcrunch.hf.Cache(hf_model.config, k="q8_0", v="q8_0", evict="streaming:sink=4,window=8"), 4, mask)


def test_crop_then_continue(hf_model, kv_model):
    ids = torch.tensor([kv_model.tokenize(PROMPT)])
    c1 = kvcrunch.hf.Cache(hf_model.config, k="q8_0", v="q8_0")
    with torch.no_grad():
        hf_model(ids[:, :-3], past_key_values=c1)
        c2 = kvcrunch.hf.Cache(hf_model.config, k="q8_0", v="q8_0")
        hf_model(ids, past_key_values=c2)
        c2.crop(-3 if transformers.__version__ >= "5.15" else ids.shape[1] - 3)
    assert c2.get_seq_length() == ids.shape[1] - 3
    assert c2.memory()["cells"] == c1.memory()["cells"]
    k1, k2 = c1.layers[7].keys, c2.layers[7].keys
    assert torch.equal(k1, k2)


def test_bad_configuration_raises(hf_model):
    with pytest.raises(ValueError, match="unknown cache type"):
        kvcrunch.hf.Cache(hf_model.config, k="nope")
    with pytest.raises(ValueError, match="kvpress"):
        kvcrunch.hf.Cache(hf_model.config, evict="snapkv:ratio=0.5")
    with pytest.raises(ValueError):
        kvcrunch.hf.Cache(hf_model.config, evict="streaming:sink=-1")


RSS_SCRIPT = r"""
import gc, os, sys, torch
import kvcrunch.hf
from transformers import DynamicCache, LlamaConfig
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                  intermediate_size=1536, vocab_size=256)
g = torch.Generator().manual_seed(1)
shape = (1, 3, 512, 64)
chunks = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(8)]
gc.collect()
r0 = rss()
if sys.argv[1] == "dynamic":
    try:
        cache = DynamicCache(config=cfg)
    except TypeError:
        cache = DynamicCache()
else:
    cache = kvcrunch.hf.Cache(cfg, k=sys.argv[1], v=sys.argv[1])
with torch.no_grad():
    for k, v in chunks:
        for layer in range(30):
            out = cache.update(k, v, layer)
            del out
gc.collect()
print(rss() - r0, kvcrunch.hf.cache_bytes(cache))
"""


def test_memory_measured_by_process_rss():
    """4,096 tokens into each of 30 layers (3 KV heads, head_dim 64), each cache in a fresh
    process: the process grows by about the bytes the cache says it holds."""
    import subprocess
    import sys
    res = {}
    for name in ("dynamic", "q4_0", "q8_0"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        grow, held = (int(x) for x in out.stdout.split())
        res[name] = (grow, held)
        print(f"{name}: process RSS +{grow / 2**20:.1f} MiB, cache holds {held / 2**20:.1f} MiB")
    fp32_bytes = 2 * 30 * 3 * 64 * 4096 * 4
    assert res["dynamic"][1] == fp32_bytes
    assert res["dynamic"][0] > 0.8 * fp32_bytes
    for name in ("q4_0", "q8_0"):
        grow, held = res[name]
        assert 0.5 * held < grow < 1.5 * held + 8 * 2**20, name  # RSS follows the held bytes
    assert res["q4_0"][0] < 0.2 * res["dynamic"][0]
