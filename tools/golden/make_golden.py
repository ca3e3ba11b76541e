#!/usr/bin/env python3
"""Produce tests/golden/smollm2.json: reference token ids, greedy continuations
and last-position top-5 logits for SmolLM2-135M-Instruct (Q4_1 GGUF), computed
with Hugging Face transformers + torch on CPU in float32.

transformers dequantizes the GGUF weights to float32 on load, so these logits are
those of the dequantized model evaluated in full float32 precision; an engine that
keeps weights quantized (and e.g. quantizes activations for dot products) will
match closely but not bit-exactly.

How to run (from the repository root):

    pip install -r tools/golden/requirements.txt    # torch, transformers, gguf, ...
    python3 tools/golden/make_golden.py              # model located via tools/fetch-model
    python3 tools/golden/make_golden.py --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/golden/smollm2.json --tokenizer-config /tmp/golden_tokenizer_config.json

Takes a couple of minutes on 2 CPU cores (most of it is the GGUF dequantization).

Output fields per prompt: name, text (exact text fed to the tokenizer), messages
(chat prompt only), prompt_ids, greedy_ids (32 new tokens, greedy argmax, generation
continues through EOS; eos_positions lists the indices in greedy_ids where the EOS
token appears), greedy_text, greedy_margins (top1 - top2 logit at every greedy step,
to tell near-ties apart from real mismatches), top5 (last prompt position: the five
largest logits as [token_id, logit]).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jsonfmt  # noqa: E402
from prose import generate_prose  # noqa: E402

N_NEW = 32
LONG_SEED = 2
LONG_TOKENS = (1000, 1500)

CHAT_MESSAGES = [
    {"role": "user", "content": "What are three tips for staying productive when working from home?"},
]
SHORT_TEXT = "In computer science, a linked list is"
# The prompts above (and LONG_SEED) were picked among a few candidates for having no
# EOS in the 32 greedy tokens and comparatively large top1-top2 logit margins, so
# that an engine with slightly different numerics still follows the same path.


def locate_model(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    out = subprocess.run([str(REPO / "tools" / "fetch-model")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1]).resolve()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def tokenizer_config_without_vocab(tok) -> dict:
    cfg = json.loads(tok.backend_tokenizer.to_str())
    model = cfg.get("model", {})
    for key in ("vocab", "merges"):
        if key in model:
            model[key] = f"<{len(model[key])} entries omitted>"
    return cfg


def long_prose_text(tok) -> str:
    """Procedural prose whose token count lies inside LONG_TOKENS (trim whole paragraphs)."""
    lo, hi = LONG_TOKENS
    text = generate_prose(LONG_SEED, 1400)
    paragraphs = text.split("\n\n")
    while True:
        candidate = "\n\n".join(paragraphs)
        n = len(tok(candidate, add_special_tokens=False)["input_ids"])
        if n <= hi - 100 or len(paragraphs) == 1:
            break
        paragraphs.pop()
    if not (lo <= n <= hi):
        raise SystemExit(f"long prompt has {n} tokens, outside {LONG_TOKENS}; adjust the word count")
    return candidate


def run_prompt(torch, model, tok, name: str, text: str, prompt_ids: list[int], messages=None) -> dict:
    eos = tok.eos_token_id
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = out.logits[0, -1].float()
        top = torch.topk(logits, 5)
        top5 = [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())]

        # Greedy decoding by hand: argmax at every step, never stopping at EOS.
        past = out.past_key_values
        greedy: list[int] = []
        margins: list[float] = []
        step_logits = logits
        for _ in range(N_NEW):
            t2 = torch.topk(step_logits, 2)
            nxt = int(t2.indices[0])
            greedy.append(nxt)
            margins.append(float(t2.values[0] - t2.values[1]))
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits = out.logits[0, -1].float()

        # Cross-check with transformers' own greedy generate() (it stops at EOS, so
        # compare only up to the first EOS).
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_NEW,
            do_sample=False,
            num_beams=1,
            pad_token_id=eos,
        )[0, len(prompt_ids):].tolist()
    first_eos = greedy.index(eos) + 1 if eos in greedy else len(greedy)
    if gen[:first_eos] != greedy[:first_eos]:
        print(f"WARNING [{name}]: generate() {gen} differs from manual greedy {greedy}", file=sys.stderr)

    entry = {"name": name, "text": text}
    if messages is not None:
        entry["messages"] = messages
    entry.update(
        {
            "n_prompt_tokens": len(prompt_ids),
            "prompt_ids": prompt_ids,
            "greedy_ids": greedy,
            "eos_positions": [i for i, t in enumerate(greedy) if t == eos],
            "greedy_text": tok.decode(greedy, skip_special_tokens=False),
            "greedy_margins": margins,
            "top5": top5,
        }
    )
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF path (default: output of tools/fetch-model)")
    ap.add_argument("--out", default=str(REPO / "tests" / "golden" / "smollm2.json"))
    ap.add_argument("--tokenizer-config", default="/tmp/golden_tokenizer_config.json",
                    help="where to write the transformers tokenizer config (vocab/merges omitted); '' to skip")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model_path = locate_model(args.model)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.eval()
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)

    tok_cfg = tokenizer_config_without_vocab(tok)
    if args.tokenizer_config:
        Path(args.tokenizer_config).write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    def encode(text: str) -> list[int]:
        # The GGUF declares add_bos_token = false, and so does the original SmolLM2
        # tokenizer; fail loudly if transformers would add anything.
        with_special = tok(text, add_special_tokens=True)["input_ids"]
        plain = tok(text, add_special_tokens=False)["input_ids"]
        if with_special != plain:
            raise SystemExit(f"tokenizer adds special tokens: {with_special[:4]} vs {plain[:4]}")
        return plain

    prompts = []
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts.append(("chat", chat_text, CHAT_MESSAGES))
    prompts.append(("short", SHORT_TEXT, None))
    prompts.append(("long_prose", long_prose_text(tok), None))

    # Cross-check prompt ids against llama.cpp's tokenizer when it is installed (the two
    # disagree only on whitespace before number characters; see make_tokenizer_golden.py).
    try:
        from llama_cpp import Llama

        vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    except ImportError:
        vocab = None

    entries = []
    for name, text, messages in prompts:
        t1 = time.time()
        entries.append(run_prompt(torch, model, tok, name, text, encode(text), messages))
        e = entries[-1]
        if vocab is not None:
            e["prompt_ids_match_llama_cpp"] = vocab.tokenize(text.encode(), add_bos=False, special=True) == e["prompt_ids"]
        print(f"[{name}] {e['n_prompt_tokens']} prompt tokens, {time.time() - t1:.1f}s: {e['greedy_text']!r}",
              file=sys.stderr)

    doc = {
        "description": "SmolLM2-135M-Instruct Q4_1 reference outputs from transformers (GGUF dequantized to float32, CPU); "
                       "generated by tools/golden/make_golden.py",
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": version("gguf"),
            "tokenizers": version("tokenizers"),
        },
        "dtype": "float32",
        "add_bos": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "n_new_tokens": N_NEW,
        "long_prose_seed": LONG_SEED,
        "tokenizer": {
            "normalizer": tok_cfg.get("normalizer"),
            "pre_tokenizer": tok_cfg.get("pre_tokenizer"),
            "post_processor": tok_cfg.get("post_processor"),
            "decoder": tok_cfg.get("decoder"),
        },
        "prompts": entries,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(jsonfmt.dumps(doc) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes) in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
