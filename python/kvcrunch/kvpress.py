"""kvpress integration (needs kvpress, which pins transformers >= 4.56, < 5.3).

1. Any kvpress press compresses a :class:`kvcrunch.hf.Cache`: the press hook reads
   ``cache.layers[i].keys/values`` (decoded) and assigns the compressed tensors back; kvcrunch
   recognises the kept rows and keeps them *packed* (no re-quantization), freeing the evicted
   tokens' bytes::

       cache = kvcrunch.hf.Cache(model.config, k="q4_0", v="q4_0")
       pipe(context, question=q, press=KnormPress(0.5), cache=cache)

2. kvcrunch's eviction policies as presses: :class:`PolicyPress` runs the C++ policy
   (``src/kv/policies``) on each layer's keys, values and the last ``window_size`` queries::

       press = PolicyPress("snapkv", compression_ratio=0.5)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress.presses.base_press import BasePress
from kvpress.utils import get_prerope_query_states
from transformers.models.llama.modeling_llama import rotate_half

from .arrays import Policy

__all__ = ["PolicyPress"]


@dataclass
class PolicyPress(BasePress):
    """A kvcrunch eviction policy as a kvpress press (prefill compression).

    - ``policy``: policy name (``snapkv``, ``pyramid``, ``knorm``, ``tova``, ``h2o``, ``streaming``;
      ``kvcrunch.policies()``).
    - ``compression_ratio``: fraction of the context's KV pairs removed, in [0, 1) (kvpress's
      convention; passed as ``ratio=``). Ignored for ``streaming`` (give ``params``).
    - ``params``: extra spec parameters, e.g. ``"window=32,kernel=7"`` (the policy's own names).
    - ``window_size``: how many of the last tokens' queries (post-RoPE, from the layer's q_proj)
      the attention-scored policies see.

    Each batch row and layer is selected independently; head-adaptive policies (adakv), whose
    heads keep different counts, raise ValueError (a dense tensor cannot hold them).
    """

    policy: str = "snapkv"
    compression_ratio: float = 0.0
    params: str = ""
    window_size: int = 32

    def __post_init__(self):
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        Policy(self.spec)  # validate now: ValueError with the C++ message

    @property
    def spec(self) -> str:
        parts = [] if self.policy == "streaming" else [f"ratio={self.compression_ratio}"]
        if self.params:
            parts.append(self.params)
        return self.policy + (":" + ",".join(parts) if parts else "")

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0 and self.policy != "streaming":
            return keys, values
        pol = Policy(self.spec)
        w = min(self.window_size, hidden_states.shape[1])
        q = get_prerope_query_states(module, hidden_states[:, -w:])  # [B, n_head, w, head_dim]
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        n_layer = module.config.num_hidden_layers
        out_k, out_v = [], []
        for b in range(keys.shape[0]):
            kept = pol.select(keys[b], queries=q[b], values=values[b], layer=module.layer_idx, n_layer=n_layer)
            if isinstance(kept, list):
                raise ValueError(f"{self.spec}: heads keep different numbers of tokens; not a dense tensor")
            idx = torch.from_numpy(kept).to(keys.device).unsqueeze(-1)
            out_k.append(keys[b].gather(1, idx.expand(-1, -1, keys.shape[-1])))
            out_v.append(values[b].gather(1, idx.expand(-1, -1, values.shape[-1])))
        return torch.stack(out_k), torch.stack(out_v)
