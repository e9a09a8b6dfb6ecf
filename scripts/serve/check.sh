#!/usr/bin/env bash
# The serve checks that need programs outside Rust, run by .ci/run after the tests:
#   - the official `openai` Python client against `routelm serve` (scripts/serve/check_openai.py);
#   - the chat page in headless Chromium over WebDriver, with an MoE model (the mixtral
#     fixture) and a Mixture-of-Depths model (trained here in seconds from
#     scripts/serve/mod-tiny.toml): streamed answer and routing view (scripts/serve/check_page.py);
#   - a one-minute soak (scripts/serve/soak.py, 32 clients, hang-ups, malformed, oversized
#     and slow clients) against the MoE server: it must stay up and answer every good request.
# Installs what it needs: Debian's chromium and chromium-driver (apt), and openai + selenium in a
# virtual environment under $WORK. Screenshots land in $WORK (default: target/serve-check).
#
#   scripts/serve/check.sh [path/to/routelm]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/routelm}
WORK=${WORK:-target/serve-check}
mkdir -p "$WORK"
export ROUTELM_NO_PROGRESS=1

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing Debian's chromium and chromium-driver"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
  }
fi
if [ ! -x "$WORK/venv/bin/python" ]; then
  python3 -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install -q --disable-pip-version-check openai selenium

"$BIN" train --config scripts/serve/mod-tiny.toml --out "$WORK/mod-tiny" >/dev/null

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { # MODEL LOG → sets ADDR (and adds the server to PIDS)
  "$BIN" serve --model "$1" --port 0 --header-timeout-s 5 --body-timeout-s 5 >"$2" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    ADDR=$(grep -o 'http://[0-9.:]*' "$2" | head -1 || true)
    [ -n "$ADDR" ] && return
    sleep 0.1
  done
  echo "the server did not start:" >&2; cat "$2" >&2; exit 1
}
start tests/fixtures/hf/mixtral "$WORK/serve-moe.log"
MOE=$ADDR
MOE_PID=${PIDS[0]}
start "$WORK/mod-tiny/checkpoint" "$WORK/serve-mod.log"
MOD=$ADDR

"$WORK/venv/bin/python" scripts/serve/check_openai.py "$MOE/v1"
"$WORK/venv/bin/python" scripts/serve/check_openai.py "$MOD/v1"
"$WORK/venv/bin/python" scripts/serve/check_page.py "$MOE" moe "$WORK/page-moe.png"
"$WORK/venv/bin/python" scripts/serve/check_page.py "$MOD" mod "$WORK/page-mod.png"
python3 scripts/serve/soak.py "$MOE" --pid "$MOE_PID" --minutes "${SOAK_MINUTES:-1}" --clients 32 --max-words 8
echo "serve checks passed"
