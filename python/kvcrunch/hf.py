"""A transformers ``Cache`` whose K/V live packed in kvcrunch (needs torch and transformers).

    import kvcrunch.hf
    cache = kvcrunch.hf.Cache(model.config, k="q8_0", v="q8_0")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
    print(cache.memory())   # bytes the packed cache holds (allocated, measured)

Supported transformers: >= 4.56 (kvpress pins < 5.3) and the 5.x line (both API generations:
``get_mask_sizes(cache_position | query_length)``, ``get_max_cache_shape`` / ``get_max_length``,
``crop(max_length | -n)``). Llama-family models with full attention on every layer.

How it works, per layer:
- ``update(key_states, value_states)`` takes transformers' post-RoPE ``[batch, n_head_kv, q_len,
  head_dim]`` tensors, appends them to kvcrunch's packed store (one ``KvCache`` per batch row),
  and returns the layer's cells decoded to dense ``[batch, n_head_kv, n_cells, head_dim]`` tensors
  in the model's dtype for this step's attention (a transient copy, as transformers'
  QuantizedCache makes). Window codecs (KIVI) quantize after that attention.
- Eviction (``evict=``, attention-free policies: ``streaming``, ``knorm``) runs after the last
  layer of a step, so the prompt attends to itself in full (as kvpress and kvcrunch's CLI do).
  Kept keys keep their RoPE positions (they are stored post-RoPE); ``get_seq_length`` stays the
  *logical* length, so new tokens get the right positions, and ``get_mask_sizes`` returns the
  physical length with ``kv_offset = logical - physical`` (as DynamicSlidingWindowLayer does).
  Attention-scored policies (snapkv, h2o, tova, pyramid) need the queries: use them through
  :mod:`kvcrunch.kvpress`.
- Batch > 1: works without eviction (left padding included: the padding tokens are cached like
  DynamicCache caches them and masked by transformers). With eviction it raises ValueError.
- kvpress: ``layer.keys`` / ``layer.values`` are properties. Reading decodes; assigning a subset of
  the current rows (a press's gather, the pipeline's answer removal) keeps those rows packed
  without re-quantizing; any other tensor is encoded afresh. After an assignment the layer's length
  is its physical length, as with DynamicCache (kvpress passes its own positions).
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers.cache_utils import Cache as _HfCache
from transformers.cache_utils import CacheLayerMixin

from . import _core

__all__ = ["Cache", "cache_bytes", "TRANSFORMERS_VERSION"]
TRANSFORMERS_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(device="cpu", dtype=torch.float32).contiguous()
    return t.numpy()


def _query_length(q) -> int:
    """transformers <= 5.3 passes cache_position (a tensor), >= 5.4 the query length (int)."""
    if isinstance(q, torch.Tensor):
        return int(q.shape[0])
    return int(q)


class KvcLayer(CacheLayerMixin):
    """One decoder layer of :class:`Cache`: a view on the shared packed store."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: "Cache", layer_idx: int):
        self._owner = owner
        self._idx = layer_idx
        self._logical = 0
        self.dtype = None
        self.device = None
        super().__init__()  # sets keys/values to None through the properties (ignored)
        self.is_initialized = False

    # -- transformers hooks ----------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states=None):
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self._owner._store
        q = int(key_states.shape[-2])
        store.write(self._idx, _np(key_states), _np(value_states))
        self._logical += q
        k, v = store.dense(self._idx)
        store.flush(self._idx)  # window codecs: attention first (this step uses k, v), then pack
        k = torch.from_numpy(k).to(device=self.device, dtype=self.dtype)
        v = torch.from_numpy(v).to(device=self.device, dtype=self.dtype)
        if self._idx == self._owner.n_layer - 1:
            self._owner._after_step(q)
        return k, v

    def get_seq_length(self) -> int:
        return self._logical

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        q = _query_length(query_length)
        n = self._owner._store.n_cells(self._idx) if self._owner._store.batch() else 0
        return n + q, self._logical - n

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.15
        return -1

    def reset(self) -> None:
        self._logical = 0
        self.is_initialized = False

    def crop(self, tokens) -> None:
        """``crop(-n)`` removes the last n tokens (transformers >= 5.15); ``crop(m)`` with m >= 0
        keeps the first m (older versions)."""
        remove = -int(tokens) if tokens < 0 else self._logical - int(tokens)
        if remove <= 0:
            return
        store = self._owner._store
        n = store.n_cells(self._idx)
        if remove > n:
            raise ValueError(f"crop: cannot remove {remove} tokens, layer {self._idx} holds {n}")
        keep = np.broadcast_to(np.arange(n - remove, dtype=np.int32),
                               (store.batch(), self._owner.n_head_kv, n - remove)).copy()
        store.keep(self._idx, keep)
        self._logical -= remove

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("kvcrunch.hf.Cache does not support beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvcrunch.hf.Cache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("kvcrunch.hf.Cache does not support batch_select_indices")

    def offload(self):
        pass

    def prefetch(self):
        pass

    # -- kvpress: keys / values as properties --------------------------------------------------
    def _dense(self):
        store = self._owner._store
        if not self.is_initialized or store.batch() == 0:
            return None, None
        k, v = store.dense(self._idx)
        return (torch.from_numpy(k).to(device=self.device, dtype=self.dtype),
                torch.from_numpy(v).to(device=self.device, dtype=self.dtype))

    @property
    def keys(self):
        return self._dense()[0]

    @keys.setter
    def keys(self, value):
        if value is None:
            return
        self._pending_keys = value
        self._maybe_assign()

    @property
    def values(self):
        return self._dense()[1]

    @values.setter
    def values(self, value):
        if value is None:
            return
        self._pending_values = value
        self._maybe_assign()

    def _maybe_assign(self):
        k = getattr(self, "_pending_keys", None)
        v = getattr(self, "_pending_values", None)
        if k is None or v is None:
            return
        self._pending_keys = self._pending_values = None
        self._assign(k, v)

    def _assign(self, new_k: torch.Tensor, new_v: torch.Tensor):
        """Rows of new_k/new_v [B, H, m, D] that are rows of the current cells keep their packed
        form (Keep); otherwise the layer is encoded afresh from the given tensors."""
        store = self._owner._store
        if not self.is_initialized:
            self.lazy_initialization(new_k)
        if store.batch() == 0:
            store.write(self._idx, _np(new_k), _np(new_v))
            self._logical = int(new_k.shape[-2])
            return
        cur_k, cur_v = self._dense()
        idx = _match_rows(cur_k, cur_v, new_k, new_v)
        if idx is not None:
            store.keep(self._idx, idx)
        else:
            store.replace(self._idx, _np(new_k), _np(new_v))
        self._logical = int(new_k.shape[-2])  # DynamicCache semantics after an assignment


def _match_rows(cur_k, cur_v, new_k, new_v):
    """Sorted int32 indices [B, H, m] such that new == cur[..., idx, :] up to a permutation of the
    rows of each (batch, head), or None."""
    if new_k.shape[:2] != cur_k.shape[:2] or new_k.shape[-1] != cur_k.shape[-1] or new_v.shape[-1] != cur_v.shape[-1]:
        return None
    m, n = int(new_k.shape[-2]), int(cur_k.shape[-2])
    if m > n:
        return None
    if torch.equal(new_k, cur_k[:, :, :m]) and torch.equal(new_v, cur_v[:, :, :m]):
        b, h = new_k.shape[:2]
        return np.broadcast_to(np.arange(m, dtype=np.int32), (b, h, m)).copy()
    g = torch.Generator().manual_seed(0)
    r = torch.randn(cur_k.shape[-1], generator=g, dtype=torch.float64)
    pc = cur_k.double().cpu() @ r  # [B, H, n]
    pn = new_k.double().cpu() @ r  # [B, H, m]
    order = torch.argsort(pc, dim=-1)
    sc = torch.gather(pc, -1, order)
    pos = torch.searchsorted(sc, pn).clamp(max=n - 1)
    idx = torch.gather(order, -1, pos)  # [B, H, m] candidate rows
    gk = torch.gather(cur_k.cpu(), 2, idx.unsqueeze(-1).expand(-1, -1, -1, cur_k.shape[-1]))
    gv = torch.gather(cur_v.cpu(), 2, idx.unsqueeze(-1).expand(-1, -1, -1, cur_v.shape[-1]))
    if not (torch.equal(gk, new_k.cpu()) and torch.equal(gv, new_v.cpu())):
        return None
    idx, _ = torch.sort(idx, dim=-1)
    if m > 1 and bool((idx[..., 1:] == idx[..., :-1]).any()):
        return None
    return idx.to(torch.int32).numpy().copy()


class Cache(_HfCache):
    """A transformers ``Cache`` storing every layer's K/V packed by kvcrunch.

    ``Cache(config, k="q8_0", v="q8_0", evict="", sinks=0, sink_codec="f16")``

    - ``config``: the model's config (``num_hidden_layers`` = n_layer, ``num_key_value_heads`` =
      n_head_kv, ``head_dim`` or hidden_size / num_attention_heads). Models with sliding-window or
      linear-attention layers are refused (ValueError).
    - ``k`` / ``v``: codec specs for keys and values (``kvcrunch.codecs()``): ``"f16"``, ``"q8_0"``,
      ``"q4_0"``, ``"kivi4"``, ``"kivi2"``, ``"turbo3"``, ``"turbo:bits=4"``, ... Bad specs raise
      ValueError with the C++ message.
    - ``evict``: an attention-free eviction policy, e.g. ``"streaming:sink=4,window=252"`` or
      ``"knorm:budget=256"`` ("" = none). Positions stay the original ones.
    - ``sinks`` tokens at the start kept in their own segment with ``sink_codec`` (default f16).

    ``memory()`` returns the bytes the packed store holds now, as allocated (kv_bytes = packed +
    fp16 tails, total_bytes adds bookkeeping), and ``cells`` (tokens held, summed over layers,
    heads and rows).
    """

    def __init__(self, config, k: str = "q8_0", v: str = "q8_0", evict: str = "", sinks: int = 0,
                 sink_codec: str = "f16"):
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError("kvcrunch.hf.Cache supports models whose layers all use full attention; "
                             f"this config has layer_types {sorted(set(layer_types))}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
                layer_types is None and getattr(cfg, "model_type", "") in ("mistral", "qwen2"):
            raise ValueError("kvcrunch.hf.Cache does not support sliding-window attention")
        self.n_layer = int(cfg.num_hidden_layers)
        n_head = int(cfg.num_attention_heads)
        self.n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        self.spec = {"k": k, "v": v, "evict": evict, "sinks": sinks, "sink_codec": sink_codec}
        self._store = _core.PackedKv(self.n_layer, self.n_head_kv, self.head_dim, self.head_dim,
                                     k, v, evict or "", int(sinks), sink_codec)
        self._prefilled = False
        super().__init__(layers=[KvcLayer(self, i) for i in range(self.n_layer)])

    # transformers <= 5.3: get_mask_sizes(cache_position, layer_idx); >= 5.4: (query_length, layer_idx)
    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return _query_length(query_length), 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def _after_step(self, q_len: int):
        if not self._store.policy_name():
            return
        if q_len > 1 or not self._prefilled:
            self._store.after_prefill(q_len)
            self._prefilled = True
        else:
            self._store.after_step()

    def reset(self):
        self._store.reset()
        self._prefilled = False
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens):
        for layer in self.layers:
            layer.crop(tokens)

    @property
    def is_compileable(self) -> bool:
        return False

    def describe(self) -> str:
        """Codecs as built, one line (e.g. 'K=q8_0 V=q8_0')."""
        d = self._store.describe()
        p = self._store.policy_name()
        return d + (f" evict={p}" if p else "")

    @property
    def bits_per_value(self) -> tuple[float, float]:
        """(K, V) bits per value of the body codecs, from their descriptors."""
        return self._store.k_bits(), self._store.v_bits()

    def memory(self) -> dict:
        """Bytes held now, as allocated by the C++ store: ``kv_bytes`` (packed + fp16 tails),
        ``packed_bytes``, ``tail_bytes``, ``total_bytes`` (with bookkeeping), ``cells`` (tokens
        held, summed over layers, KV heads and rows). For comparison, ``dense_bytes``: what dense
        K/V tensors of the same cells take in the model's dtype (cells · head_dim · 2 · dtype
        bytes: DynamicCache's storage for them), and ``saved_bytes`` = dense_bytes - kv_bytes."""
        m = dict(self._store.memory())
        dtype = next((l.dtype for l in self.layers if l.dtype is not None), torch.float32)
        m["dense_bytes"] = m["cells"] * self.head_dim * 2 * torch.finfo(dtype).bits // 8
        m["saved_bytes"] = m["dense_bytes"] - m["kv_bytes"]
        return m

    def kept(self, layer: int, head: int = 0, row: int = 0) -> np.ndarray:
        """Store sequence numbers of the cells a (row, layer, KV head) holds [n_cells] int64 (the
        token index in the stream written to that layer, for caches without assignments)."""
        return np.asarray(self._store.seqs(row, layer, head), dtype=np.int64)

    def __repr__(self):
        return f"kvcrunch.hf.Cache({self.describe()}, n_layer={self.n_layer})"


def cache_bytes(cache) -> int:
    """Bytes a cache holds now, measured from its storage (not from a formula):

    - :class:`Cache`: the C++ store's allocated kv_bytes (``memory()['kv_bytes']``);
    - transformers DynamicCache and friends: the storage bytes of every layer's keys/values tensors;
    - QuantizedCache (quanto/HQQ): the packed tensors' storage (data, scales, zero points) plus the
      fp residual.
    """
    if isinstance(cache, Cache):
        return int(cache.memory()["kv_bytes"])
    seen = set()
    total = 0

    def add(obj):
        nonlocal total
        if obj is None or isinstance(obj, (int, float, str, bool)):
            return
        if isinstance(obj, (tuple, list)):
            for x in obj:
                add(x)
            return
        if isinstance(obj, dict):
            for x in obj.values():
                add(x)
            return
        inner = getattr(obj, "_data", None)
        if isinstance(obj, torch.Tensor) and isinstance(inner, torch.Tensor):
            # quanto's QBitsTensor / PackedTensor wrap their storage: count the parts
            for name in ("_data", "_scale", "_shift"):
                add(getattr(obj, name, None))
            return
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen and st.nbytes() > 0:
                seen.add(key)
                total += st.nbytes()

    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            add(layer.__dict__.get(name, None))
    return total
