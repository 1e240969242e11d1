#!/usr/bin/env python3
"""Reference token ids for the kvcrunch tokenizer tests (tests/model/tokenizer_model_test.cc).

Independent implementation: HuggingFace `tokenizers` (Rust), built here from the GGUF's own
vocabulary and merges (read with the `gguf` package), configured exactly like SmolLM2's
tokenizer.json:
  normalizer     none
  pre_tokenizer  Sequence[Digits(individual_digits=True),
                          ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
  model          BPE(vocab, merges, no dropout, no unk, byte_fallback=False)
  decoder        ByteLevel
  added tokens   every token with token_type 3 (control) as special AddedToken.
(`transformers` AutoTokenizer(gguf_file=...) was tried first but its GGUF loader needs torch,
which is not installed here.) The chat-template reference is rendered with jinja2 from the
template string stored in the GGUF, with the same environment settings transformers uses
(trim_blocks, lstrip_blocks, ImmutableSandboxedEnvironment).

Usage: python3 tests/reference/make_tokenizer_fixtures.py [model.gguf]
Writes tests/reference/fixtures/tokenizer_smollm2.json.
Needs: pip install gguf tokenizers jinja2
"""
import json
import os
import sys

from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
OUT = os.path.join(ROOT, "tests", "reference", "fixtures", "tokenizer_smollm2.json")

STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "12345",
    "3.14159 and 2,718 and 1e-9",
    "Phone: +1 (555) 010-9999",
    "multiple   spaces    here",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "   ",
    "don't won't I'm you're we've they'll he'd it's",
    "DON'T SHOUT",
    "café naïve résumé über",
    "日本語のテキストです。中文测试。",
    "한국어 텍스트",
    "Emoji: 😀🎉👍🏽 and ❤️",
    "Ελληνικά и русский текст",
    "def foo(x):\n    return x * 2  # double\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body class=\"x\">Hi</body></html>",
    "snake_case_name camelCaseName CONSTANT_NAME",
    "a\u00a0non-breaking\u2009thin space",
    "The year 2024 had 366 days.",
    "!!!??? ... --- ***",
    "a\u180eb \u180e c\r\nd\u0085e\u3000f",
    "\u216b \u00bd \u00b2 \uff13 \u0663 \U0001d7d8 other digits",
    "e\u0301 combining, zero\u200bwidth, family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
]

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?"},
]


def field(reader, key):
    return reader.fields[key].contents()


def main():
    r = GGUFReader(MODEL)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    template = field(r, "tokenizer.chat_template")
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "smollm"

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    with open(WIKI, encoding="utf-8") as f:
        wiki = f.read()[:2000]

    cases = []
    for s in STRINGS + [wiki]:
        special = "<|" in s
        # split_special_tokens=True means "treat special token text as plain text".
        tok.encode_special_tokens = not special
        ids = tok.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "parse_special": special, "ids": ids})
    # The same ChatML string without parse_special: special text must be tokenized as text.
    tok.encode_special_tokens = True
    s = next(x for x in STRINGS if x.startswith("<|im_start|>user"))
    cases.append({"text": s, "parse_special": False,
                  "ids": tok.encode(s, add_special_tokens=False).ids})

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(template)
    chat = {
        "messages": CHAT,
        "with_generation_prompt": tmpl.render(messages=CHAT, add_generation_prompt=True),
        "without_generation_prompt": tmpl.render(messages=CHAT, add_generation_prompt=False),
        "with_system_messages": [{"role": "system", "content": "Be brief."}] + CHAT[:1],
        "with_system": tmpl.render(messages=[{"role": "system", "content": "Be brief."}] + CHAT[:1],
                                   add_generation_prompt=True),
    }
    out = {
        "model": os.path.basename(MODEL),
        "reference": "HF tokenizers %s built from GGUF vocab/merges with SmolLM2's pre-tokenizer"
                     % __import__("tokenizers").__version__,
        "n_vocab": len(tokens),
        "cases": cases,
        "chat": chat,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print("wrote", OUT, len(cases), "cases")


if __name__ == "__main__":
    main()
