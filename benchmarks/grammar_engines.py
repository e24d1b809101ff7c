"""Which grammar engine neoxko's structured outputs use: llguidance, xgrammar and outlines-core on this CPU.

Each engine gets the Polyglot-Ko tokenizer (the shared 2022 tokenizer, else ko-small's, same vocabulary) and
three constraints: a JSON schema whose answer holds Korean strings, a regex (a Korean phone number) and a choice.
For each it prints the time to compile the constraint, and the time per token to compute the allowed-token
bitmask and advance over a fixed valid answer tokenized by the model's own tokenizer (the work the server does
for every constrained row at every step), the first token apart (it builds the grammar's first state). Engines
that are not installed are skipped.

    pip install llguidance xgrammar outlines-core  # (xgrammar: --no-deps plus apache-tvm-ffi avoids triton)
    python benchmarks/grammar_engines.py
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "reference" / "polyglot-ko" / "eleutherai-polyglot-mbbpe-2022-07"
VOCAB = 30080  # the embedding's rows

SCHEMA = {"type": "object", "properties": {
    "이름": {"type": "string"}, "나이": {"type": "integer", "minimum": 0}, "도시": {"type": "string"},
    "취미": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "회원": {"type": "boolean"}}, "required": ["이름", "나이", "도시", "취미", "회원"], "additionalProperties": False}
ANSWER = json.dumps({"이름": "김도윤", "나이": 31, "도시": "서울특별시 강남구",
                     "취미": ["등산", "독서", "한국 요리 배우기"], "회원": True}, ensure_ascii=False)
REGEX, REGEX_ANSWER = r"01[016789]-\d{3,4}-\d{4}", "010-9876-5432"
CHOICES, CHOICE_ANSWER = ["긍정", "부정", "중립"], "부정"


def tokenizer_folder() -> Path:
    return SHARED if (SHARED / "tokenizer.json").is_file() else ROOT / "neoxko" / "builtin" / "ko-small"


def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_folder()
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")


LONG_SCHEMA = {"type": "object", "properties": {"답변": {"type": "string"}}, "required": ["답변"]}
SENTENCE = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
LONG_ANSWER = json.dumps({"답변": SENTENCE * 4}, ensure_ascii=False)


def constraints():
    import re
    return [("json schema", SCHEMA, ANSWER), ("json, long", LONG_SCHEMA, LONG_ANSWER), ("regex", REGEX, REGEX_ANSWER),
            ("choice", "(" + "|".join(re.escape(c) for c in CHOICES) + ")", CHOICE_ANSWER)]


def run_llguidance(tok, kind, spec, answer, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
    t_tok = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(spec) if kind.startswith("json") else \
        llguidance.LLMatcher.grammar_from_regex(spec)
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, grammar)
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    compile_s = time.perf_counter() - t0
    mask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask)
        allowed = bool(mask[0, token // 32] >> (token % 32) & 1)
        matcher.consume_token(token)
        times.append(time.perf_counter() - t0)
        if not allowed or matcher.is_error():
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")
    return t_tok, compile_s, times


def run_xgrammar(tok, kind, spec, answer, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(spec)) if kind.startswith("json") else \
        compiler.compile_regex(spec)
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        allowed = bool(mask[0, token // 32] >> (token % 32) & 1)
        ok = matcher.accept_token(token)
        times.append(time.perf_counter() - t0)
        if not allowed or not ok:
            raise RuntimeError(f"xgrammar refused token {token}")
    return t_tok, compile_s, times


def run_outlines(tok, kind, spec, answer, ids):
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    vocab = outlines_vocabulary(tok)
    t_tok = time.perf_counter() - t0
    regex = build_regex_from_schema(json.dumps(spec)) if kind.startswith("json") else spec
    t0 = time.perf_counter()
    index = outlines_core.Index(regex, vocab)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - t0
    import torch
    mask = torch.zeros((VOCAB + 31) // 32, dtype=torch.int32)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        allowed = bool(mask[token // 32] >> (token % 32) & 1)
        if token != vocab.get_eos_token_id():  # (a finished guide allows the end of text but takes no step on it)
            guide.advance(token)
        times.append(time.perf_counter() - t0)
        if not allowed:
            raise RuntimeError(f"outlines-core refused token {token}")
    return t_tok, compile_s, times


def outlines_vocabulary(tok):
    import outlines_core
    from tokenizers import decoders

    byte_decoder = decoders.ByteLevel()
    tokens: dict = {}
    for piece, i in tok.get_vocab().items():
        if i == tok.eos_token_id or piece.startswith("<|"):
            continue
        tokens.setdefault(byte_decoder.decode([piece]).encode("utf-8", "surrogateescape"), []).append(i)
    return outlines_core.Vocabulary(tok.eos_token_id, tokens)


ENGINES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def main() -> None:
    import importlib.metadata as md

    print(describe())
    tok = hf_tokenizer()
    print(f"tokenizer: {tokenizer_folder()} ({len(tok)} tokens, {VOCAB} logits)\n")
    print(f"{'engine':<14} {'version':<8} {'constraint':<12} {'tokenizer s':>11} {'compile ms':>10} "
          f"{'tokens':>6} {'first us':>9} {'us/token p50':>12} {'mean':>8} {'max':>8}")
    for name, run in ENGINES.items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            print(f"{name:<14} not installed")
            continue
        for kind, spec, answer in constraints():
            ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
            try:
                t_tok, compile_s, times = run(tok, kind, spec, answer, ids)
            except Exception as e:  # an engine that cannot run a constraint is a finding, not a crash
                print(f"{name:<14} {version:<8} {kind:<12} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            us = [t * 1e6 for t in times]
            print(f"{name:<14} {version:<8} {kind:<12} {t_tok:>11.2f} {compile_s * 1e3:>10.1f} {len(ids):>6} "
                  f"{us[0]:>9.1f} {statistics.median(us[1:]):>12.1f} {statistics.fmean(us):>8.1f} {max(us):>8.1f}")


if __name__ == "__main__":
    main()
