"""The kvcrunch runtime from Python: :class:`Model` (the CLI's generate / perplexity / eval, same
code paths and numbers) and :class:`Client` (plain HTTP to ``kvcrunch serve``'s OpenAI API)."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from . import _core


def _default_text() -> str:
    """WikiText-2 test text, found as the CLI finds it (``../shared/data`` beside the checkout)."""
    return _core.default_text_path()


class Model:
    """A GGUF Llama-family model run by kvcrunch's C++ runtime with a compressed KV cache.

    ``Model(path, threads=2)``: FileNotFoundError for a missing file, ValueError for a file kvcrunch
    cannot run (the C++ message). ``config`` is a dict (n_layer, n_head, n_head_kv, head_dim,
    n_vocab, n_ctx_train, ...).

    KV options shared by :meth:`generate` and :meth:`perplexity` (the CLI's flags): ``k``/``v``
    codec specs (``-ctk``/``-ctv``, default "f16"), ``evict`` policy spec (``--kv-evict``),
    ``sinks`` (``--kv-sinks``), ``sink_codec``, ``kt``/``vt`` transforms, ``pos`` position mode
    (``original`` | ``in-cache`` | ``rerotate``; "" = the policy's default).
    """

    def __init__(self, path: str, threads: int = 2):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"model file not found: {self.path}")
        self._m = _core.ModelCore(self.path, int(threads))
        self.config = dict(self._m.config())

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text`` (the CLI's ``generate -p``: add_bos False, special False)."""
        return list(self._m.tokenize(text, add_bos, special))

    def detokenize(self, ids) -> str:
        return self._m.detokenize([int(i) for i in ids])

    def generate(self, prompt=None, *, tokens=None, chat: bool = False, n_predict: int = 32,
                 temp: float = 0.0, top_p: float = 1.0, seed: int = 0, n_ctx: int = 0,
                 n_batch: int = 512, k: str = "f16", v: str = "f16", evict: str = "", sinks: int = 0,
                 sink_codec: str = "f16", kt: str = "", vt: str = "", pos: str = "") -> dict:
        """Generates up to ``n_predict`` tokens after ``prompt`` (text) or ``tokens`` (ids), exactly as
        ``kvcrunch generate`` (greedy at temp 0, the default here; the CLI's own default is
        ``--temp 0.8 --top-p 0.95 --seed 42``; same sampler and seed otherwise; stops at EOS).

        ``chat=True`` wraps the text in the model's chat template (``--chat``). ``n_ctx`` 0 means
        min(n_ctx_train, 4096). Returns a dict: ``tokens`` (list[int], EOS included when hit),
        ``text``, ``n_prompt``, ``prompt_tokens_per_second``, ``gen_tokens_per_second``,
        ``kv_bytes`` (allocated at the end), ``cache`` (codecs as built). ValueError on bad input."""
        if tokens is None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("empty prompt: give prompt=TEXT or tokens=[ids]")
            text = self._m.chat_prompt(prompt) if chat else prompt
            tokens = self._m.tokenize(text, False, chat)
            if not tokens:
                raise ValueError("the prompt tokenizes to nothing")
        return dict(self._m.generate([int(t) for t in tokens], int(n_predict), float(temp), float(top_p),
                                     int(seed), int(n_ctx), int(n_batch), k, v, evict, int(sinks),
                                     sink_codec, kt, vt, pos))

    def perplexity(self, text: str | None = None, *, text_file: str | None = None, n_ctx: int = 512,
                   n_batch: int = 512, chunks: int = -1, k: str = "f16", v: str = "f16",
                   evict: str = "", sinks: int = 0, sink_codec: str = "f16", kt: str = "", vt: str = "",
                   pos: str = "") -> dict:
        """Perplexity with llama.cpp's protocol (chunks of ``n_ctx`` tokens, the second half of each
        scored), as ``kvcrunch perplexity --json``: returns its dict (ppl, n_tokens, n_chunks,
        kv_bytes (allocated, max over chunks), k/v_bits_per_value, tokens_per_second,
        peak_rss_bytes, ...). Default text: WikiText-2 test, as the CLI."""
        text, _ = self._text(text, text_file)
        return json.loads(self._m.perplexity(text, int(n_ctx), int(n_batch), int(chunks), k, v, evict,
                                             int(sinks), sink_codec, kt, vt, pos))

    def eval(self, configs=(), text: str | None = None, *, text_file: str | None = None,
             n_ctx: int = 512, n_batch: int = 512, chunks: int = -1, decode_tokens: int = 32) -> dict:
        """``kvcrunch eval --json``: the same text through the f16 baseline and each configuration
        (strings in the CLI's ``--config`` syntax, e.g. ``"q8_0"``, ``"k=turbo3 v=q4_0"``,
        ``"k=q8_0 v=q8_0 evict=snapkv:ratio=0.5"``; empty = the default list). Returns the CLI's
        JSON as a dict: ``rows`` with method, ppl, dppl_pct, kld_mean, top1_pct, kv_bytes, ..."""
        text, path = self._text(text, text_file)
        if isinstance(configs, str):
            configs = [configs]
        return json.loads(self._m.eval(text, path, list(configs), int(n_ctx), int(n_batch), int(chunks),
                                       int(decode_tokens)))

    @staticmethod
    def _text(text, text_file):
        if text is not None and text_file is not None:
            raise ValueError("give text or text_file, not both")
        if text is None:
            text_file = text_file or _default_text()
            with open(text_file, "rb") as f:
                text = f.read().decode("utf-8")
            return text, text_file
        return text, "<text>"


class ServerError(RuntimeError):
    """An error response from ``kvcrunch serve``: ``status`` (HTTP code) and ``error`` (the
    OpenAI-shaped error object: message, type, param, code)."""

    def __init__(self, status: int, error: dict):
        super().__init__(f"HTTP {status}: {error.get('message', error)}")
        self.status = status
        self.error = error


class Client:
    """Plain-HTTP client of ``kvcrunch serve`` (docs/serving.md), no dependencies.

    ``Client(base_url="http://127.0.0.1:8080", api_key=None, timeout=600)``. Methods return the
    decoded JSON; an error response raises :class:`ServerError` with the server's error object.
    ``kv`` is the server's KV extension, e.g. ``{"k": "turbo3", "v": "q4_0", "evict": "snapkv:ratio=0.75"}``;
    responses carry the ``kv`` actually used (bytes_peak, cells, bits per value)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", api_key: str | None = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw).get("error", {"message": raw.decode(errors="replace")})
            except ValueError:
                err = {"message": raw.decode(errors="replace")}
            raise ServerError(e.code, err) from None
        return json.loads(raw) if "json" in ctype else raw.decode()

    def health(self) -> dict:
        return self._request("GET", "/health")

    def models(self) -> dict:
        return self._request("GET", "/v1/models")

    def metrics(self) -> str:
        """Prometheus text of ``GET /metrics``."""
        return self._request("GET", "/metrics")

    def completion(self, prompt, max_tokens: int = 16, temperature: float = 0.0, kv: dict | None = None,
                   **fields) -> dict:
        """``POST /v1/completions``; ``prompt`` is a string or a list of token ids."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **fields}
        if kv is not None:
            body["kv"] = kv
        return self._request("POST", "/v1/completions", body)

    def chat(self, messages, max_tokens: int = 16, temperature: float = 0.0, kv: dict | None = None,
             **fields) -> dict:
        """``POST /v1/chat/completions``; ``messages`` as OpenAI's [{"role", "content"}]."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, **fields}
        if kv is not None:
            body["kv"] = kv
        return self._request("POST", "/v1/chat/completions", body)
