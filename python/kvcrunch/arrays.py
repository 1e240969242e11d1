"""Codecs and eviction policies on arrays (numpy, torch CPU tensors, DLPack/buffer-protocol objects)."""
from __future__ import annotations

import numpy as np

from . import _core

Packed = _core.Packed
Packed.__doc__ = """Tokens packed by a codec: full blocks of ``block_tokens`` tokens through the codec, the last
``n_tail`` (< block_tokens) tokens in fp16, as kvcrunch's cache streams hold them.

Attributes: ``nbytes`` (int, bytes held: packed blocks + fp16 tail), ``bits_per_value`` (float,
8·nbytes / (n_tokens·dim), every scale, zero point and norm included), ``n_tokens``, ``dim``,
``n_blocks``, ``n_tail``, ``codec`` (canonical spec). Methods: ``decode() -> [n_tokens, dim] float32``;
``score(q [n_q, dim] float32) -> [n_q, n_tokens] float32`` = q · decode()ᵀ computed on the packed
form (fused for codecs that score without decoding: q8_0, QJL, TurboQuant); ``tobytes()``."""


def as_f32(x, name: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array on the CPU (no copy when it already is one).

    Accepts numpy arrays, torch tensors (any dtype/device: moved to CPU float32), and objects with
    ``__dlpack__`` or the buffer protocol. TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x, dtype=np.float32)
    mod = type(x).__module__
    if mod.startswith("torch"):
        t = x.detach()
        if t.device.type != "cpu" or t.dtype != _torch_f32() or not t.is_contiguous():
            t = t.to(device="cpu", dtype=_torch_f32()).contiguous()
        return t.numpy()
    if hasattr(x, "__dlpack__"):
        return np.ascontiguousarray(np.from_dlpack(x), dtype=np.float32)
    try:
        return np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected an array (numpy, torch, DLPack, buffer), got {type(x).__name__}") from e


def _torch_f32():
    import torch
    return torch.float32


class Codec:
    """A kvcrunch KV codec (``src/kv/codecs/``) applied to arrays.

    ``Codec(spec, dim=64, kind="key", layer=0, n_layer=1, head=0, n_head_kv=1, seed=0)``

    - ``spec``: codec spec string or alias, e.g. ``"q8_0"``, ``"q4_0"``, ``"kivi4"``,
      ``"turbo:bits=3"``, ``"qjl"`` (``kvcrunch.codecs()`` lists them, ``kvcrunch.codec_aliases()``
      the aliases). A bad spec, or one the codec cannot serve at ``dim`` (e.g. dim % 32 != 0),
      raises ValueError with the C++ message.
    - ``dim``: values per token (head_dim) used to validate the spec; :meth:`encode` builds an
      instance for whatever dim its input has.
    - ``kind`` ``"key"`` | ``"value"``, ``layer``/``n_layer``, ``head``/``n_head_kv`` and ``seed``
      form the codec's context (per-head rotation seeds, key-only codecs such as QJL).

    Attributes: ``name`` (canonical spec), ``bits_per_value`` (float, from the descriptor at
    ``dim``: scales, zero points and norms included), ``block_tokens`` (tokens per encoded block).
    """

    def __init__(self, spec: str, dim: int = 64, kind: str = "key", layer: int = 0, n_layer: int = 1,
                 head: int = 0, n_head_kv: int = 1, seed: int = 0):
        if not isinstance(spec, str):
            raise TypeError(f"spec must be a str, got {type(spec).__name__}")
        self.spec = spec
        self.dim = int(dim)
        self._c = _core.CodecCore(spec, self.dim, kind, layer, n_layer, head, n_head_kv, seed)

    @property
    def name(self) -> str:
        return self._c.name(self.dim)

    @property
    def bits_per_value(self) -> float:
        return self._c.bits_per_value(self.dim)

    @property
    def block_tokens(self) -> int:
        return self._c.block_tokens(self.dim)

    def encode(self, x) -> Packed:
        """Packs ``x`` [n_tokens, dim] float32 (converted if needed; finite values only, else
        ValueError). Returns a :class:`Packed` with ``nbytes``, ``bits_per_value``, ``decode()``
        and ``score(q)``."""
        return self._c.encode(as_f32(x))

    def roundtrip(self, x) -> np.ndarray:
        """``decode(encode(x))``: [n_tokens, dim] float32."""
        return self.encode(x).decode()

    def __repr__(self):
        return f"Codec({self.name!r}, {self.bits_per_value:.3f} bits/value at dim {self.dim})"


class Policy:
    """A kvcrunch eviction policy (``src/kv/policies/``) selecting the tokens to keep.

    ``Policy(spec)``: e.g. ``"snapkv:ratio=0.75"`` (ratio = fraction *removed*, kvpress's
    compression_ratio), ``"snapkv:budget=256"`` (tokens kept per head), ``"knorm:ratio=0.5"``,
    ``"streaming:sink=4,window=252"``, ``"h2o:budget=128"``, ``"tova:ratio=0.5"``,
    ``"pyramid:ratio=0.5"``. Bad specs raise ValueError with the C++ message.
    """

    def __init__(self, spec: str):
        if not isinstance(spec, str):
            raise TypeError(f"spec must be a str, got {type(spec).__name__}")
        self.spec = spec
        self._c = _core.PolicyCore(spec)
        self.name = self._c.name

    def select(self, keys, queries=None, values=None, layer: int = 0, n_layer: int = 1):
        """Indices of the tokens to keep, per KV head.

        - ``keys`` [n_head_kv, n_tokens, head_dim] float32 (post-RoPE, as attention uses them).
        - ``queries`` [n_head, n_q, head_dim] float32: the queries of the *last* n_q tokens
          (n_head a multiple of n_head_kv, GQA). Required by attention-scored policies (snapkv,
          pyramid, h2o, tova, adakv; ValueError without them); ignored by knorm and streaming.
        - ``values`` [n_head_kv, n_tokens, head_dim_v] float32 (optional; zeros otherwise).
        - ``layer`` / ``n_layer``: for per-layer budgets (pyramid).

        Returns an int64 array [n_head_kv, n_kept] of token indices sorted ascending, or a list of
        n_head_kv 1-D arrays when heads keep different counts (head-adaptive policies)."""
        k = as_f32(keys, "keys")
        q = None if queries is None else as_f32(queries, "queries")
        v = None if values is None else as_f32(values, "values")
        kept = self._c.select(k, v, q, int(layer), int(n_layer))
        arrs = [np.asarray(x, dtype=np.int64) for x in kept]
        if len({a.shape[0] for a in arrs}) == 1:
            return np.stack(arrs)
        return arrs

    def __repr__(self):
        return f"Policy({self.name!r})"


def codecs():
    """Registered codecs: list of (name, one-line summary)."""
    return list(_core.codecs())


def codec_aliases():
    """Codec aliases: dict alias -> full spec (e.g. 'kivi2' -> 'kivi:bits=2,...')."""
    return dict(_core.codec_aliases())


def policies():
    """Registered eviction policies: list of (name, one-line summary)."""
    return list(_core.policies())
