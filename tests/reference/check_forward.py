#!/usr/bin/env python3
"""Compare kvcrunch's forward pass with the independent numpy reference.

For each of a few fixed token-id prompts (SmolLM2 tokenizer; no Python-side
tokenization needed):
  1. logits of every position, with S = max|ref logits| of the prompt (the
     logit scale, 27-37 here):
       max |ours - ref| <= TOL     = TOL_REL * S      (0.08 S, ~2.2-2.9)
       rms (ours - ref) <= TOL_RMS = TOL_RMS_REL * S  (0.025 S, ~0.7-0.9)
  2. top-1 (argmax) agreement at every position; a position may differ only
     where it is a near-tie in the reference: ref[ref_top1] - ref[our_top1]
     <= TIE = TIE_REL * S (0.02 S, ~0.5-0.7); such positions are reported.
  3. greedy (temperature 0) continuation of N_GEN=32 tokens (fewer only if it
     ends with the GGUF's eos/eot id: a runtime may stop there). The reference is
     run teacher-forced on prompt + our continuation (one batched forward), and
     every token we generated must be the reference's argmax given our own
     prefix -- which, up to the first difference, is exactly "our continuation
     equals the reference's greedy continuation" -- except near-ties as in 2
     (after an accepted near-tie the two continuations legitimately part).
     --strict-greedy demands exact equality with the reference's greedy path.
The reference (tests/reference/numpy_llama.py) computes in float32 by default
(--ref-dtype float64 for the slow, exact one), activations unquantized.

Why these numbers (measured, see bench/compare/README.md):
  * numpy float32 vs float64: max |diff| <= 5e-6 on these prompts, so float32
    is as good a reference as float64 at this tolerance, and 2x cheaper.
  * llama.cpp (llama-cpp-python 0.3.36, CPU, activations quantized to q8_1/q8_0
    for the Q4_1/Q8_0 matmuls, f16 KV) vs numpy f64, prompts capital/chat/wiki:
    max |diff| 1.36 / 1.44 / 1.20 (3.6-5.0 % of S = 27.4 / 36.7 / 33.1),
    rms 0.36 / 0.26 / 0.21 (0.6-1.3 % of S), top-1 equal at 68/68 positions.
    So a correct int8-activation runtime is ~4 % of S off at worst: TOL_REL
    0.08 gives 2x headroom, TOL_RMS_REL 0.025 ~2x over the worst rms.
  * the same reference with the other RoPE pairing (neox, i.e. a real bug) is
    off by max 6.2 / 30.0 / 21.5 with 28 of 68 top-1 wrong: caught by all checks.
  * greedy paths of these prompts go through reference near-ties (top-2
    margins 0.03-0.09), well inside llama.cpp's own error, so exact equality of
    32 tokens with the reference is not something even llama.cpp achieves;
    hence rule 3.

Peers: --bin PATH runs our CLI:
  PATH logits   -m MODEL --tokens 1,2,3 --out FILE   (raw little-endian f32 [n_tokens, n_vocab])
  PATH generate -m MODEL --tokens 1,2,3 -n 32 --temp 0 --print-ids
      (generated ids, comma-separated, on the last line of stdout)
--llamacpp runs the same checks against llama.cpp through llama-cpp-python
instead (cross-checks the reference itself).

Exit status: 0 all checks pass, 1 a check failed, 2 usage/setup error
(missing binary or model), 77 skipped (--skip-missing and the model is absent;
ctest: SKIP_RETURN_CODE 77).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TOL_REL = 0.08
TOL_RMS_REL = 0.025
TIE_REL = 0.02
N_GEN = 32

# SmolLM2 token ids (tokenizer of SmolLM2-135M-Instruct.Q4_1.gguf, no BOS since
# the vocab says add_bos_token = False). Texts given for reading only.
PROMPTS = {
    # "The capital of France is"
    "capital": [504, 3575, 282, 4649, 314],
    # "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n"
    # "<|im_start|>assistant\n"   (special tokens parsed)
    "chat": [1, 4093, 198, 1780, 314, 260, 16891, 1225, 282, 913, 418, 3426, 1106, 47, 2,
             198, 1, 520, 9531, 198],
    # "Robert Boulter is an English film, television and theatre actor. He had a
    #  guest-starring role on the television series The Bill in 2000. This was
    #  followed by a"   (wikitext-2 test, 40 tokens)
    "wiki": [25268, 389, 9226, 352, 314, 354, 2321, 4771, 28, 8552, 284, 16984, 17523, 30,
             909, 761, 253, 16204, 29, 302, 17081, 1791, 335, 260, 8552, 3086, 378, 8593,
             281, 216, 34, 32, 32, 32, 30, 669, 436, 3922, 411, 253],
}


def fail(msg: str):
    print(f"FAIL: {msg}", file=sys.stderr)


class OurBinary:
    name = "kvcrunch"

    def __init__(self, path: str, model: str, threads: int | None, timeout: float):
        self.path, self.model, self.threads, self.timeout = path, model, threads, timeout

    def _run(self, args):
        cmd = [self.path, *args]
        if self.threads:
            cmd += ["-t", str(self.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n"
                               f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}")
        return p.stdout

    def logits(self, ids, n_vocab):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "logits.f32")
            self._run(["logits", "-m", self.model, "--tokens", ",".join(map(str, ids)),
                       "--out", out])
            a = np.fromfile(out, dtype="<f4")
        if a.size != len(ids) * n_vocab:
            raise RuntimeError(f"logits file has {a.size} floats, expected "
                               f"{len(ids)} x {n_vocab} = {len(ids) * n_vocab}")
        return a.reshape(len(ids), n_vocab)

    def generate(self, ids, n):
        out = self._run(["generate", "-m", self.model, "--tokens", ",".join(map(str, ids)),
                         "-n", str(n), "--temp", "0", "--print-ids"])
        lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
        if not lines:
            raise RuntimeError("generate printed nothing")
        try:
            got = [int(t) for t in lines[-1].replace(" ", "").split(",") if t]
        except ValueError:
            raise RuntimeError(f"last stdout line is not comma-separated ids: {lines[-1]!r}")
        if len(got) == len(ids) + n and got[:len(ids)] == list(ids):
            got = got[len(ids):]  # tolerate echoing the prompt
        return got


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, model: str, threads: int | None):
        # Same set-up as the bench scripts (no AMX buffers: they crash on our machines).
        sys.path.insert(0, os.path.join(HERE, "..", "..", "bench", "compare"))
        from llamacpp_perplexity import make_llama
        self.llm = make_llama(model, 512, threads or 2, "f16", "f16", flash_attn=False,
                              logits_all=True)

    def logits(self, ids, n_vocab):
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def generate(self, ids, n):
        self.llm.reset()
        self.llm.eval(list(ids))
        out = []
        for _ in range(n):
            t = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(t)
            if len(out) < n:
                self.llm.eval([t])
        return out


class NumpyPeer:
    """numpy at another precision / RoPE layout, for --self-test."""

    def __init__(self, model: str, dtype, rope: str):
        import numpy_llama as nl
        self.nl = nl
        self.m = nl.load(model, dtype=dtype, rope=rope)
        self.name = f"numpy-{np.dtype(dtype).name}-{rope}"

    def logits(self, ids, n_vocab):
        return self.nl.forward(self.m, ids)

    def generate(self, ids, n):
        return self.nl.greedy(self.m, ids, n)


def top2_margin(row: np.ndarray) -> float:
    p = np.partition(row, -2)[-2:]
    return float(p[1] - p[0])


def check_prompt(name, ids, ref_model, peer, n_gen, tol_rel, strict_greedy=False, verbose=True):
    import numpy_llama as nl
    ok = True
    ids = list(ids)
    ref = nl.forward(ref_model, ids).astype(np.float64)
    t0 = time.perf_counter()
    got = peer.logits(ids, ref_model.n_vocab).astype(np.float64)
    t_logits = time.perf_counter() - t0
    if got.shape != ref.shape:
        fail(f"[{name}] logits shape {got.shape} != reference {ref.shape}")
        return False, {}
    if not np.all(np.isfinite(got)):
        fail(f"[{name}] {peer.name} logits contain NaN/Inf")
        return False, {}
    scale = float(np.abs(ref).max())
    tol, tol_rms, tie = tol_rel * scale, TOL_RMS_REL / TOL_REL * tol_rel * scale, TIE_REL * scale
    diff = np.abs(got - ref)
    maxdiff = float(diff.max())
    rms = float(np.sqrt((diff ** 2).mean()))
    pos, tok = np.unravel_index(int(diff.argmax()), diff.shape)
    stats = {"max_abs_diff": maxdiff, "rms_diff": rms, "tol": tol, "tol_rms": tol_rms,
             "scale": scale}
    if maxdiff > tol:
        ok = False
        fail(f"[{name}] max |logit diff| {maxdiff:.4g} > TOL {tol:.4g} "
             f"(at position {pos}, token {tok}: {peer.name} {got[pos, tok]:.4f}, "
             f"reference {ref[pos, tok]:.4f}; per-position max: "
             f"{', '.join(f'{x:.3g}' for x in diff.max(axis=1))})")
    if rms > tol_rms:
        ok = False
        fail(f"[{name}] rms logit diff {rms:.4g} > TOL_RMS {tol_rms:.4g}")
    ra, ga = ref.argmax(axis=1), got.argmax(axis=1)
    for p in np.nonzero(ra != ga)[0]:
        m = float(ref[p, ra[p]] - ref[p, ga[p]])
        if m <= tie:
            print(f"note: [{name}] position {p}: top-1 {ga[p]} vs reference {ra[p]}, "
                  f"a near-tie in the reference (margin {m:.3g} <= {tie:.3g}); accepted")
        else:
            ok = False
            fail(f"[{name}] top-1 differs at position {p}: {peer.name} {ga[p]}, reference "
                 f"{ra[p]} (reference margin {m:.3g} > {tie:.3g})")

    # Greedy: teacher-force the reference on our continuation.
    t0 = time.perf_counter()
    got_gen = [int(t) for t in peer.generate(ids, n_gen)]
    t_gen = time.perf_counter() - t0
    exact = 0
    stops = {int(t) for t in (ref_model.meta.get("eos"), ref_model.meta.get("eot"))
             if t is not None}
    if not got_gen or len(got_gen) > n_gen or (
            len(got_gen) < n_gen and got_gen[-1] not in stops):
        ok = False
        fail(f"[{name}] {peer.name} generated {len(got_gen)} tokens, expected {n_gen} "
             f"(fewer only when ending with an end-of-generation id {sorted(stops)}): {got_gen}")
    elif any(t < 0 or t >= ref_model.n_vocab for t in got_gen):
        ok = False
        fail(f"[{name}] {peer.name} generated out-of-vocab ids: {got_gen}")
    else:
        tf = nl.forward(ref_model, ids + got_gen[:-1]).astype(np.float64)[len(ids) - 1:]
        parted = None
        for k, t in enumerate(got_gen):
            best = int(tf[k].argmax())
            if t == best:
                if parted is None:
                    exact = k + 1
                continue
            m = float(tf[k, best] - tf[k, t])
            if m <= tie and not strict_greedy:
                if parted is None:
                    parted = k
                    print(f"note: [{name}] greedy step {k}: {peer.name} {t} vs reference {best}, "
                          f"a near-tie in the reference (margin {m:.3g} <= {tie:.3g}); accepted, "
                          f"the continuations may differ from here")
                continue
            ok = False
            ref_gen = nl.greedy(ref_model, ids, n_gen)
            fail(f"[{name}] greedy step {k}: {peer.name} chose {t}, reference argmax {best} "
                 f"(margin {m:.3g}{'' if strict_greedy else f' > {tie:.3g}'}) given the same "
                 f"prefix\n  {peer.name}: {got_gen}\n  reference greedy: {ref_gen}")
            break
    stats["greedy_exact"] = exact
    if verbose:
        print(f"[{name}] n={len(ids)} max|diff|={maxdiff:.3g} (tol {tol:.3g}) "
              f"rms={rms:.3g} (tol {tol_rms:.3g}) logit scale {scale:.1f}; "
              f"top1 {int((ra == ga).sum())}/{len(ids)}; greedy equal to the reference for "
              f"{exact}/{len(got_gen)} tokens [{peer.name}: logits {t_logits:.1f}s, "
              f"generate {t_gen:.1f}s]")
    return ok, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="check kvcrunch logits/greedy against numpy")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--bin", help="path to the kvcrunch binary")
    g.add_argument("--llamacpp", action="store_true",
                   help="check llama.cpp (llama-cpp-python) instead of our binary")
    g.add_argument("--self-test", choices=["float64", "neox"],
                   help="check numpy float64 (must pass), or the numpy model with the wrong "
                        "(neox) RoPE pairing (must FAIL), against the reference")
    ap.add_argument("--model", "-m", default=os.path.join(HERE, "..", "..", "models",
                                                          "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prompts", default=",".join(PROMPTS),
                    help=f"comma-separated subset of {','.join(PROMPTS)}")
    ap.add_argument("--n-gen", type=int, default=N_GEN)
    ap.add_argument("--tol-rel", type=float, default=TOL_REL)
    ap.add_argument("--ref-dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--strict-greedy", action="store_true",
                    help="require the greedy continuation to equal the reference's exactly")
    ap.add_argument("--threads", "-t", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per binary call")
    ap.add_argument("--skip-missing", action="store_true",
                    help="exit 77 (skip) if the model file is missing")
    a = ap.parse_args(argv)

    if not os.path.isfile(a.model):
        msg = f"model {a.model} not found (scripts/fetch_model.sh fetches it)"
        print(("SKIP: " if a.skip_missing else "ERROR: ") + msg, file=sys.stderr)
        return 77 if a.skip_missing else 2
    try:
        import numpy_llama as nl
    except SystemExit as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2

    if a.bin:
        if not (os.path.isfile(a.bin) and os.access(a.bin, os.X_OK)):
            print(f"ERROR: {a.bin} is not an executable file", file=sys.stderr)
            return 2
        peer = OurBinary(a.bin, a.model, a.threads, a.timeout)
    elif a.llamacpp:
        peer = LlamaCpp(a.model, a.threads)
    else:
        peer = (NumpyPeer(a.model, np.float64, "norm") if a.self_test == "float64"
                else NumpyPeer(a.model, np.float64, "neox"))

    t0 = time.perf_counter()
    ref_model = nl.load(a.model, dtype=getattr(np, a.ref_dtype))
    print(f"reference: numpy {a.ref_dtype}, loaded in {time.perf_counter() - t0:.1f}s; peer: {peer.name}")
    names = [n for n in a.prompts.split(",") if n]
    unknown = [n for n in names if n not in PROMPTS]
    if unknown:
        print(f"ERROR: unknown prompts {unknown}", file=sys.stderr)
        return 2
    n_ok = n_fail = 0
    worst = 0.0
    for n in names:
        try:
            ok, st = check_prompt(n, PROMPTS[n], ref_model, peer, a.n_gen, a.tol_rel,
                                 a.strict_greedy)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            fail(f"[{n}] {peer.name} failed: {e}")
            ok, st = False, {}
        worst = max(worst, st.get("max_abs_diff", 0.0))
        n_ok += ok
        n_fail += not ok
    print(f"worst max|logit diff| = {worst:.4g}")
    print(f"{n_ok} passed, {n_fail} failed")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
