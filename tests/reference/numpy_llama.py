#!/usr/bin/env python3
"""Independent numpy forward pass for llama-architecture GGUF files.

This is the correctness oracle for kvcrunch: it shares no code with the C++
runtime. Weights are dequantized with the PyPI ``gguf`` package
(``gguf.quants.dequantize``), then everything is plain numpy.

Precision: weights are dequantized exactly (the Q4_1 / Q8_0 block formulas,
done in float32 by gguf and then widened), and all activations/matmuls are
computed in ``dtype`` -- float64 by default (the reference), float32 when
asked (to measure how much plain f32 rounding alone moves the logits).
Activations are NOT quantized (llama.cpp / kvcrunch quantize activations to
8 bits for the quantized matmuls; that is the main source of the expected
differences).

Model: llama arch as written by llama.cpp's convert_hf_to_gguf.py:
  x = embd[tok]
  per layer: h = x + Wo . Attn(RoPE(Wq . rms(x)), RoPE(Wk . rms(x)), Wv . rms(x))
             x = h + Wdown . (silu(Wgate . rms(h)) * (Wup . rms(h)))
  logits = output(rms(x)), output = token_embd when there is no output.weight.

RoPE pairing: the converter permutes the HF q_proj/k_proj rows for the llama
arch so that the *adjacent* pairs (2i, 2i+1) of each head are rotated
(llama.cpp's LLAMA_ROPE_TYPE_NORM), with theta_i = base^(-2i/head_dim).
``rope="neox"`` (pairs (i, i + d/2), the HF rotate_half layout) is kept as an
option only so the choice can be checked empirically: on
SmolLM2-135M-Instruct.Q4_1.gguf, "norm" matches llama.cpp to ~1e-1 while
"neox" gives garbage (see tests/reference/check_forward.py --self-test and
bench/compare/README.md).

API:
  model = load(path, dtype=np.float64)
  logits = forward(model, token_ids)          # [n_tokens, n_vocab]
  ids = greedy(model, token_ids, n)           # n new ids, KV-cached
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np

try:
    import gguf
    from gguf import GGUFReader
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover
    raise SystemExit(f"numpy_llama: needs the PyPI 'gguf' package ({e}); "
                     "pip install -r tests/reference/requirements.txt")


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray  # [n_head*hd, n_embd]
    wk: np.ndarray  # [n_head_kv*hd, n_embd]
    wv: np.ndarray
    wo: np.ndarray  # [n_embd, n_head*hd]
    ffn_norm: np.ndarray
    w_gate: np.ndarray  # [n_ff, n_embd]
    w_up: np.ndarray
    w_down: np.ndarray  # [n_embd, n_ff]


@dataclass
class Model:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    rope_base: float
    rms_eps: float
    rope: str
    dtype: type
    tok_embd: np.ndarray  # [n_vocab, n_embd]
    output_norm: np.ndarray
    output: np.ndarray  # [n_vocab, n_embd] (tied: same array as tok_embd)
    layers: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _deq(t, dtype) -> np.ndarray:
    """Dequantize one GGUF tensor to a numpy array in numpy (row-major) shape.

    GGUF lists dims innermost-first (ne0 = row length); numpy shape is the
    reverse, so a weight comes out as [out_features, in_features]."""
    a = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    a = np.asarray(a).reshape(shape)
    return np.ascontiguousarray(a, dtype=dtype)


def load(path: str, dtype=np.float64, rope: str = "norm") -> Model:
    if rope not in ("norm", "neox"):
        raise ValueError("rope must be 'norm' (adjacent pairs) or 'neox' (split halves)")
    r = GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, only 'llama' is supported")
    p = "llama."
    n_embd = int(_field(r, p + "embedding_length"))
    n_head = int(_field(r, p + "attention.head_count"))
    n_head_kv = int(_field(r, p + "attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    rope_dim = int(_field(r, p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    if _field(r, p + "rope.scaling.type") not in (None, "none"):
        raise ValueError("rope scaling is not supported")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError("rope_freqs (llama3-style frequency factors) not supported")
    tok = _deq(tensors["token_embd.weight"], dtype)
    out = _deq(tensors["output.weight"], dtype) if "output.weight" in tensors else tok
    m = Model(
        n_layer=int(_field(r, p + "block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=int(_field(r, p + "feed_forward_length")),
        n_vocab=tok.shape[0],
        rope_base=float(_field(r, p + "rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope,
        dtype=dtype,
        tok_embd=tok,
        output_norm=_deq(tensors["output_norm.weight"], dtype),
        output=out,
        meta={"name": _field(r, "general.name"), "tied": "output.weight" not in tensors,
              "add_bos": _field(r, "tokenizer.ggml.add_bos_token"),
              "bos": _field(r, "tokenizer.ggml.bos_token_id"),
              "eos": _field(r, "tokenizer.ggml.eos_token_id"),
              "eot": _field(r, "tokenizer.ggml.eot_token_id")},
    )
    for i in range(m.n_layer):
        g = lambda n: _deq(tensors[f"blk.{i}.{n}.weight"], dtype)  # noqa: E731
        m.layers.append(Layer(
            attn_norm=g("attn_norm"), wq=g("attn_q"), wk=g("attn_k"), wv=g("attn_v"),
            wo=g("attn_output"), ffn_norm=g("ffn_norm"), w_gate=g("ffn_gate"),
            w_up=g("ffn_up"), w_down=g("ffn_down")))
    assert m.layers[0].wq.shape == (n_head * head_dim, n_embd), m.layers[0].wq.shape
    assert m.layers[0].wk.shape == (n_head_kv * head_dim, n_embd), m.layers[0].wk.shape
    return m


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w


def _rope_tables(m: Model, pos: np.ndarray):
    hd = m.head_dim
    # theta_i = base^(-2i/d), computed in float64 whatever m.dtype is.
    inv = m.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = pos.astype(np.float64)[:, None] * inv[None, :]  # [T, hd/2]
    return np.cos(ang).astype(m.dtype), np.sin(ang).astype(m.dtype)


def apply_rope(m: Model, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x: [T, n_heads, hd]; returns rotated copy."""
    cos, sin = _rope_tables(m, pos)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    y = np.empty_like(x)
    if m.rope == "norm":  # adjacent pairs (2i, 2i+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y[..., 0::2] = x0 * cos - x1 * sin
        y[..., 1::2] = x0 * sin + x1 * cos
    else:  # neox: pairs (i, i + hd/2)
        h = m.head_dim // 2
        x0, x1 = x[..., :h], x[..., h:]
        y[..., :h] = x0 * cos - x1 * sin
        y[..., h:] = x0 * sin + x1 * cos
    return y


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class KVCache:
    def __init__(self, m: Model):
        self.k = [np.zeros((0, m.n_head_kv, m.head_dim), m.dtype) for _ in range(m.n_layer)]
        self.v = [np.zeros((0, m.n_head_kv, m.head_dim), m.dtype) for _ in range(m.n_layer)]

    @property
    def n_past(self) -> int:
        return self.k[0].shape[0]


def _attention(m: Model, q, k, v, n_past: int):
    """q: [T, H, hd]; k, v: [S, Hkv, hd] with S = n_past + T. Causal, GQA."""
    T, S = q.shape[0], k.shape[0]
    group = m.n_head // m.n_head_kv
    kq = np.repeat(k, group, axis=1)  # [S, H, hd]; head h uses kv head h // group
    vq = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, kq) / np.sqrt(m.head_dim)  # [H, T, S]
    qpos = n_past + np.arange(T)[:, None]
    kpos = np.arange(S)[None, :]
    scores = np.where(kpos <= qpos, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vq)  # [T, H, hd]


def _eval(m: Model, token_ids, cache: KVCache | None, all_logits: bool = True):
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("token_ids must be a non-empty 1-D sequence")
    if ids.min() < 0 or ids.max() >= m.n_vocab:
        raise ValueError(f"token id out of range [0, {m.n_vocab})")
    T = ids.size
    n_past = cache.n_past if cache is not None else 0
    pos = np.arange(n_past, n_past + T)
    x = m.tok_embd[ids].astype(m.dtype)  # [T, n_embd]
    for li, L in enumerate(m.layers):
        h = rms_norm(x, L.attn_norm, m.rms_eps)
        q = (h @ L.wq.T).reshape(T, m.n_head, m.head_dim)
        k = (h @ L.wk.T).reshape(T, m.n_head_kv, m.head_dim)
        v = (h @ L.wv.T).reshape(T, m.n_head_kv, m.head_dim)
        q = apply_rope(m, q, pos)
        k = apply_rope(m, k, pos)
        if cache is not None:
            cache.k[li] = np.concatenate([cache.k[li], k], axis=0)
            cache.v[li] = np.concatenate([cache.v[li], v], axis=0)
            k, v = cache.k[li], cache.v[li]
        a = _attention(m, q, k, v, n_past).reshape(T, m.n_head * m.head_dim)
        x = x + a @ L.wo.T
        h = rms_norm(x, L.ffn_norm, m.rms_eps)
        f = silu(h @ L.w_gate.T) * (h @ L.w_up.T)
        x = x + f @ L.w_down.T
    if not all_logits:
        x = x[-1:]
    x = rms_norm(x, m.output_norm, m.rms_eps)
    return x @ m.output.T


def forward(m: Model, token_ids) -> np.ndarray:
    """Logits for every position: [n_tokens, n_vocab], in m.dtype."""
    return _eval(m, token_ids, None, all_logits=True)


def greedy(m: Model, token_ids, n: int, eos: int | None = None) -> list[int]:
    """Greedy (argmax) continuation of n tokens with a KV cache.

    Prompt is evaluated in one batch, then one token at a time. Stops early
    only if eos is given and produced (the eos id is included)."""
    cache = KVCache(m)
    logits = _eval(m, token_ids, cache, all_logits=False)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(logits[-1]))
        out.append(t)
        if eos is not None and t == eos:
            break
        if len(out) == n:
            break
        logits = _eval(m, [t], cache, all_logits=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("-n", type=int, default=0, help="greedy tokens to generate")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--rope", choices=["norm", "neox"], default="norm")
    ap.add_argument("--out", help="write logits as raw little-endian f32 [n_tokens, n_vocab]")
    a = ap.parse_args(argv)
    ids = [int(t) for t in a.tokens.split(",") if t.strip()]
    m = load(a.model, dtype=getattr(np, a.dtype), rope=a.rope)
    lg = forward(m, ids)
    if a.out:
        lg.astype("<f4").tofile(a.out)
    print("argmax per position:", ",".join(str(int(i)) for i in lg.argmax(axis=1)))
    if a.n:
        print(",".join(str(t) for t in greedy(m, ids, a.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
