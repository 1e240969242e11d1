"""kvcrunch from Python: packed KV codecs and eviction policies on arrays, the GGUF runtime, a client
for ``kvcrunch serve``, a transformers ``Cache`` (:mod:`kvcrunch.hf`) and kvpress presses
(:mod:`kvcrunch.kvpress`).

Arrays cross as C-contiguous float32 (numpy arrays, torch CPU tensors, anything with the buffer
protocol or ``__dlpack__``); an input that already is C-contiguous float32 on the CPU is not copied.
torch is needed only by :mod:`kvcrunch.hf` and :mod:`kvcrunch.kvpress`.
"""
from ._core import peak_rss_bytes, current_rss_bytes
from .arrays import Codec, Packed, Policy, codecs, codec_aliases, policies
from .runtime import Model, Client

__all__ = ["Codec", "Packed", "Policy", "Model", "Client", "codecs", "codec_aliases", "policies",
           "peak_rss_bytes", "current_rss_bytes"]
__version__ = "0.1.0"
