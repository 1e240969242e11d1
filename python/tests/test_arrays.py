"""kvcrunch.Codec and kvcrunch.Policy on numpy arrays (and torch tensors when torch is installed)."""
import numpy as np
import pytest

import kvcrunch

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("spec,bits,max_rel", [
    ("f16", 16.0, 1e-3), ("q8_0", 8.5, 0.02), ("q4_0", 4.5, 0.35), ("kivi4", None, 0.35),
    ("turbo3", None, 0.6), ("turbo:bits=4", None, 0.35)])
def test_codec_roundtrip_and_bytes(spec, bits, max_rel):
    c = kvcrunch.Codec(spec, dim=64)
    n = 4 * c.block_tokens  # whole blocks: measured bits == descriptor bits
    x = randn(n, 64)
    p = c.encode(x)
    assert p.n_tokens == n and p.dim == 64 and p.n_tail == 0
    assert p.nbytes == len(p.tobytes())
    assert p.bits_per_value == pytest.approx(c.bits_per_value)
    if bits is not None:
        assert c.bits_per_value == pytest.approx(bits)
    y = p.decode()
    assert y.shape == x.shape and y.dtype == np.float32
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < max_rel, (spec, rel)
    if spec != "f16":
        assert p.nbytes < x.size * 2  # smaller than fp16


@pytest.mark.parametrize("spec", ["q8_0", "q4_0", "turbo3", "qjl", "kivi2", "polar"])
def test_score_equals_decode_dot(spec):
    c = kvcrunch.Codec(spec, dim=64, kind="key")
    x = randn(3 * c.block_tokens + 5, 64)  # 5 tokens left in the fp16 tail unless block_tokens=1
    p = c.encode(x)
    q = randn(4, 64)
    s = p.score(q)
    assert s.shape == (4, x.shape[0])
    ref = q @ p.decode().T
    if spec == "qjl":  # QJL scores with its estimator, not with a decoded vector
        assert np.corrcoef(s.ravel(), (q @ x.T).ravel())[0, 1] > 0.8
    else:
        np.testing.assert_allclose(s, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_tail_tokens_in_fp16():
    c = kvcrunch.Codec("kivi2", dim=64)  # keys: blocks of 32 tokens
    assert c.block_tokens == 32
    x = randn(40, 64)
    p = c.encode(x)
    assert (p.n_blocks, p.n_tail) == (1, 8)
    np.testing.assert_allclose(p.decode()[32:], x[32:], rtol=1e-3, atol=1e-3)


def test_bad_specs_raise_value_error_with_cpp_message():
    with pytest.raises(ValueError, match="unknown cache type 'nope'"):
        kvcrunch.Codec("nope")
    with pytest.raises(ValueError, match="bitz"):
        kvcrunch.Codec("q4_0:bitz=3")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        kvcrunch.Policy("nope:ratio=0.5")
    with pytest.raises(ValueError):
        kvcrunch.Policy("snapkv:ratio=abc")
    with pytest.raises(TypeError):
        kvcrunch.Codec(3)


def test_bad_arrays_raise():
    c = kvcrunch.Codec("q8_0")
    with pytest.raises(ValueError, match=r"\[n_tokens, dim\]"):
        c.encode(randn(2, 3, 64))
    bad = randn(4, 64)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        c.encode(bad)
    p = c.encode(randn(4, 64))
    with pytest.raises(ValueError, match="dim=64"):
        p.score(randn(2, 32))
    with pytest.raises(TypeError):
        c.encode(object())


def test_encode_accepts_other_dtypes_and_layouts():
    c = kvcrunch.Codec("q8_0")
    x = randn(64, 8).T  # non-contiguous view
    a = c.encode(x.astype(np.float64)).decode()
    b = c.encode(np.ascontiguousarray(x)).decode()
    np.testing.assert_array_equal(a, b)


def test_policy_knorm_keeps_lowest_norm_keys():
    keys = randn(2, 100, 64)
    kept = kvcrunch.Policy("knorm:ratio=0.75").select(keys)
    assert kept.shape == (2, 25)
    for h in range(2):
        want = np.sort(np.argsort(np.linalg.norm(keys[h], axis=-1), kind="stable")[:25])
        np.testing.assert_array_equal(kept[h], want)


def test_policy_streaming_keeps_sinks_and_window():
    kept = kvcrunch.Policy("streaming:sink=4,window=10").select(randn(3, 50, 64))
    np.testing.assert_array_equal(kept, np.tile(np.r_[0:4, 40:50], (3, 1)))


def test_policy_snapkv_uses_queries():
    keys = randn(1, 64, 16)
    # Queries aligned with token 10's key: SnapKV must keep it.
    q = np.tile(keys[0, 10] * 4, (1, 8, 1)).astype(np.float32)
    pol = kvcrunch.Policy("snapkv:budget=12,window=8")
    kept = pol.select(keys, queries=q)
    assert kept.shape == (1, 12)
    assert 10 in kept[0]
    assert set(range(56, 64)) <= set(kept[0].tolist())  # the observation window is kept
    with pytest.raises(ValueError, match="pass queries"):
        pol.select(keys)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        pol.select(randn(2, 64, 16), queries=randn(3, 8, 16))


def test_registry_listings():
    names = [n for n, _ in kvcrunch.codecs()]
    assert "q8_0" in names and "turbo" in names
    assert kvcrunch.codec_aliases()["kivi2"].startswith("kivi:bits=2")
    assert "snapkv" in [n for n, _ in kvcrunch.policies()]


def test_torch_tensors_cross():
    torch = pytest.importorskip("torch")
    c = kvcrunch.Codec("q8_0")
    x = torch.randn(16, 64, dtype=torch.float16)
    y = c.encode(x).decode()
    assert np.abs(y - x.float().numpy()).max() < 0.05
    kept = kvcrunch.Policy("knorm:budget=4").select(torch.randn(2, 10, 64))
    assert kept.shape == (2, 4)
