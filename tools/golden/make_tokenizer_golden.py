#!/usr/bin/env python3
"""Produce tests/golden/tokenizer.json: reference tokenizations of ~60 varied texts
for the SmolLM2-135M-Instruct GGUF tokenizer.

For every case it stores
  ids            transformers' GGUF-converted tokenizer: encode(text, add_special_tokens=False)
  tokens         the corresponding vocabulary strings (byte-level, e.g. 'Ġ' = space)
  decoded        transformers decode(ids, skip_special_tokens=False)
  llama_cpp_ids  llama.cpp's tokenizer (llama-cpp-python, vocab_only, add_bos=False,
                 special=True), when llama-cpp-python is installed
  ids_match      ids == llama_cpp_ids
  llama_cpp_tokens  vocabulary strings of llama_cpp_ids (only where they differ)

transformers builds its tokenizer from the GGUF metadata with a plain GPT-2 byte-level
pre-tokenizer, whereas the original SmolLM2 tokenizer (and llama.cpp's 'smollm'
pre-tokenizer) first splits every number character (\\p{N}) on its own.  Since the
vocabulary has no multi-digit tokens and no 'space+digit' tokens the two agree on most
text, but they differ where whitespace precedes a number: a run of 2+ whitespace chars
before an ASCII digit ("x =  42", "\\n\\n1.", "    123") or a single space before a
non-ASCII number ("b ²").  llama_cpp_ids follows the original model; the script checks
that they equal transformers' ids with the original pre-tokenizer
(Digits(individual_digits=True) then ByteLevel) restored.

How to run (from the repository root):

    pip install -r tools/golden/requirements.txt
    python3 tools/golden/make_tokenizer_golden.py            # model via tools/fetch-model
    python3 tools/golden/make_tokenizer_golden.py --model PATH.gguf --out tests/golden/tokenizer.json

Takes well under a minute (no model weights are loaded).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jsonfmt  # noqa: E402
from make_golden import locate_model, sha256_file  # noqa: E402
from prose import generate_prose  # noqa: E402

PY_CODE = '''def fib(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    print(fib(10))
'''

C_CODE = "int main(void) {\n\tint x = 1;\n\tif (x > 0) {\n\t\treturn x;\n\t}\n\treturn 0;\n}\n"

CASES: list[tuple[str, str]] = [
    ("empty", ""),
    ("hello", "Hello, world!"),
    ("pangram", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " leading space"),
    ("trailing_space", "trailing space "),
    ("two_leading_spaces", "  two leading spaces"),
    ("space_runs", "multiple     spaces   between words"),
    ("newlines", "line one\nline two\n\nline four"),
    ("only_newlines", "\n\n\n"),
    ("whitespace_mix", "   \n  \t \n"),
    ("trailing_newline", "trailing newline\n"),
    ("crlf", "\r\nWindows line endings\r\n"),
    ("tabs", "\t\ttabs\tand\ttext"),
    ("python_code", PY_CODE),
    ("c_code_tabs", C_CODE),
    ("digits", "12345"),
    ("space_year", " 2024"),
    ("numbers_sentence", "In 2024, the price rose by 3.75% to $1,299.99."),
    ("two_spaces_before_digit", "x =  42"),
    ("indent_before_digit", "    123"),
    ("newlines_before_digit", "Items:\n\n1. First item\n2. Second item"),
    ("tabs_before_digit", "\t\t7"),
    ("digit_space_runs", "1  2   3"),
    ("newline_space_digit", "a\n 1"),
    ("newlines_run_before_digits", "x=\n\n\n42"),
    ("unicode_numbers", "½ and ² and ٣ and ௫"),
    ("special_spaces_digit", "  <|im_start|>  1"),
    ("version", "version 1.2.3-rc4"),
    ("phone", "phone: +1 (555) 010-9999"),
    ("pi", "3.14159265358979"),
    ("big_numbers", "1000000 1,000,000 1_000_000"),
    ("letters_digits", "abc123def 4x4 mp3 H2O"),
    ("accents_fr", "Café naïve résumé façade"),
    ("accents_mixed", "Ünïcödé Ñandú São Paulo Zürich"),
    ("japanese", "日本語のテキストです。"),
    ("chinese", "中文文本测试，你好世界！"),
    ("korean", "한국어 문장입니다"),
    ("russian", "Привет, мир!"),
    ("greek", "Γειά σου Κόσμε"),
    ("arabic", "مرحبا بالعالم"),
    ("emoji", "I love pizza 🍕🍕 and 🎉!"),
    ("emoji_zwj", "👩‍👩‍👧‍👦 family emoji"),
    ("nbsp_zwsp", "a\u00a0b\u200bc"),
    ("math_symbols", "a² + b² = c²; ∑ᵢ xᵢ → ∞"),
    ("chat_markup", "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ("endoftext", "text<|endoftext|>more text"),
    ("adjacent_specials", "<|im_start|><|im_end|>"),
    ("special_inside_word", "abc<|im_end|>def"),
    ("special_with_spaces", " <|endoftext|> "),
    ("not_special", "not special: <|im_start |> and <im_start>"),
    ("contractions", "I'm sure they'll say it's what we've done, didn't they?"),
    ("shouting", "DON'T SHOUT"),
    ("identifiers", "snake_case_identifier and camelCaseIdentifier and SCREAMING_CASE"),
    ("url", "https://example.com/path?query=1&x=y#frag"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("long_words", "supercalifragilisticexpialidocious antidisestablishmentarianism"),
    ("prose", generate_prose(7, 60)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF path (default: output of tools/fetch-model)")
    ap.add_argument("--out", default=str(REPO / "tests" / "golden" / "tokenizer.json"))
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama_cpp_ids")
    args = ap.parse_args()

    import transformers
    from transformers import AutoTokenizer

    model_path = locate_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)

    # The original SmolLM2 tokenizer.json pre-tokenizer, rebuilt for comparison.
    from tokenizers import pre_tokenizers

    digit_tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    digit_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])

    llm = None
    if not args.no_llama_cpp:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python not installed: llama_cpp_ids omitted", file=sys.stderr)
        else:
            llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)

    cases = []
    n_diff = 0
    n_digit_split_diff = 0
    for name, text in CASES:
        ids = tok.encode(text, add_special_tokens=False)
        case = {
            "name": name,
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids, skip_special_tokens=False),
        }
        if llm is not None:
            lids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            case["llama_cpp_ids"] = lids
            case["ids_match"] = lids == ids
            if digit_tok.encode(text, add_special_tokens=False) != lids:
                n_digit_split_diff += 1
                print(f"[{name}] llama.cpp differs from HF + Digits(individual_digits) too", file=sys.stderr)
            if lids != ids:
                n_diff += 1
                case["llama_cpp_tokens"] = tok.convert_ids_to_tokens(lids)
                print(f"[{name}] differs:\n  transformers {case['tokens']}\n  llama.cpp    {case['llama_cpp_tokens']}",
                      file=sys.stderr)
        if case["decoded"] != text:
            print(f"[{name}] decode does not round-trip: {case['decoded']!r}", file=sys.stderr)
        cases.append(case)

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    doc = {
        "description": "SmolLM2-135M-Instruct GGUF tokenizer reference; generated by tools/golden/make_tokenizer_golden.py. "
                       "ids: transformers GGUF-converted tokenizer (GPT-2 byte-level pre-tokenizer, no individual-digit split). "
                       "llama_cpp_ids: llama.cpp 'smollm' pre-tokenizer (individual digits, like the original HF tokenizer). "
                       "They differ only where whitespace precedes a number character: a run of 2+ whitespace chars before "
                       "an ASCII digit, or a single space before a non-ASCII number such as '²' or '٣'.",
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": version("tokenizers"),
            "gguf": version("gguf"),
            "llama_cpp_python": version("llama_cpp_python") if llm is not None else None,
        },
        "add_special_tokens": False,
        "n_cases": len(cases),
        "n_llama_cpp_differences": n_diff if llm is not None else None,
        # Cases where llama_cpp_ids differ from transformers' tokenizer with the original
        # SmolLM2 pre-tokenizer (Digits(individual_digits=True) then ByteLevel) restored.
        "n_llama_cpp_vs_hf_digit_split_differences": n_digit_split_diff if llm is not None else None,
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(jsonfmt.dumps(doc) + "\n")
    print(f"wrote {out}: {len(cases)} cases, {n_diff} differ from llama.cpp", file=sys.stderr)


if __name__ == "__main__":
    main()
