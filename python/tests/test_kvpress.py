"""kvpress presses on a kvcrunch cache (packed storage under any press), and kvcrunch policies as
presses. Runs where kvpress is installed (transformers >= 4.56, < 5.3)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kvpress")
import kvcrunch  # noqa: E402
import kvcrunch.hf  # noqa: E402
import kvcrunch.kvpress  # noqa: E402
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hf(model_path):
    d, f = os.path.split(model_path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return m, tok


@pytest.fixture(scope="module")
def context():
    with open(kvcrunch._core.default_text_path(), encoding="utf-8") as f:
        return f.read(200_000)[2000:4500]


def canon(k, v):
    """Rows of each (batch, head) in a canonical order (kvpress keeps top-k order, kvcrunch sorts
    by position): sorted by a random projection of the keys, values reordered alike."""
    r = torch.randn(k.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    order = torch.argsort(k.double() @ r, dim=-1)
    return (k.gather(2, order.unsqueeze(-1).expand_as(k)), v.gather(2, order.unsqueeze(-1).expand_as(v)))


def same_rows(c1, c2, layer):
    a, b = canon(c1.layers[layer].keys, c1.layers[layer].values), canon(c2.layers[layer].keys, c2.layers[layer].values)
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def prefill(m, ids, press, cache):
    with torch.no_grad(), press(m):
        m(ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("press", [KnormPress(0.5), SnapKVPress(0.75, window_size=16), StreamingLLMPress(0.5, n_sink=4)],
                         ids=["knorm50", "snapkv75", "streaming50"])
def test_press_on_kvcrunch_cache_equals_dynamic_cache(hf, context, press):
    m, tok = hf
    ids = tok(context, return_tensors="pt").input_ids[:, :300]
    ref = prefill(m, ids, press, DynamicCache())
    kc = prefill(m, ids, press, kvcrunch.hf.Cache(m.config, k="f32", v="f32"))
    for i in (0, 13, 29):
        assert same_rows(kc, ref, i), i
    n_keep = ref.layers[0].keys.shape[-2]
    assert kc.get_seq_length() == ref.get_seq_length() == n_keep
    assert kc.memory()["cells"] == 30 * 3 * n_keep


def test_press_keeps_rows_packed_and_bytes_under_30pct(hf, context):
    m, tok = hf
    ids = tok(context, return_tensors="pt").input_ids[:, :512]
    f16 = prefill(m, ids, KnormPress(0.5), kvcrunch.hf.Cache(m.config, k="f16", v="f16"))
    q4 = prefill(m, ids, KnormPress(0.5), kvcrunch.hf.Cache(m.config, k="q4_0", v="q4_0"))
    full = prefill(m, ids, KnormPress(0.0), kvcrunch.hf.Cache(m.config, k="q4_0", v="q4_0"))
    assert q4.memory()["cells"] == f16.memory()["cells"] == 30 * 3 * 256
    assert q4.memory()["kv_bytes"] <= 0.3 * f16.memory()["kv_bytes"]
    assert q4.memory()["kv_bytes"] < 0.6 * full.memory()["kv_bytes"]
    # the kept rows were not re-quantized: they equal the rows of the uncompressed q4_0 cache
    kept = q4.layers[3].keys[0, 1]
    allrows = full.layers[3].keys[0, 1]
    match = (kept[:, None, :] == allrows[None, :, :]).all(-1).any(-1)
    assert bool(match.all())


def test_pipeline_with_kvcrunch_cache(hf, context):
    m, tok = hf
    pipe = pipeline("kv-press-text-generation", model=m, tokenizer=tok)
    q = "What is this text about?"
    ref = pipe(context[:1500], question=q, press=KnormPress(0.5), cache=DynamicCache(), max_new_tokens=12)["answer"]
    cache = kvcrunch.hf.Cache(m.config, k="f32", v="f32")
    out = pipe(context[:1500], question=q, press=KnormPress(0.5), cache=cache, max_new_tokens=12)["answer"]
    assert out == ref
    # the pipeline removed the answer again: the cache holds the compressed context only
    n_ctx = len(tok(context[:1500]).input_ids)
    assert cache.get_seq_length() <= n_ctx


def test_policy_press(hf, context):
    m, tok = hf
    ids = tok(context, return_tensors="pt").input_ids[:, :256]
    press = kvcrunch.kvpress.PolicyPress("snapkv", compression_ratio=0.75)
    c = prefill(m, ids, press, kvcrunch.hf.Cache(m.config, k="q8_0", v="q8_0"))
    assert c.get_seq_length() == 64
    assert c.memory()["cells"] == 30 * 3 * 64
    with torch.no_grad():  # decode one token on the compressed cache (kvpress passes positions)
        kw = {"cache_position": torch.tensor([64])} if hasattr(c, "get_max_cache_shape") else {}
        logits = m(ids[:, -1:], past_key_values=c, position_ids=torch.tensor([[256]]), **kw).logits
    assert torch.isfinite(logits).all() and c.get_seq_length() == 65
    kn = prefill(m, ids, kvcrunch.kvpress.PolicyPress("knorm", compression_ratio=0.5), DynamicCache())
    ref = prefill(m, ids, KnormPress(0.5), DynamicCache())
    # kvcrunch's knorm keeps the same tokens as kvpress's KnormPress (lowest key norms)
    assert same_rows(kn, ref, 5)
    with pytest.raises(ValueError):
        kvcrunch.kvpress.PolicyPress("nope", compression_ratio=0.5)
    with pytest.raises(ValueError):
        kvcrunch.kvpress.PolicyPress("snapkv", compression_ratio=1.5)
