#!/usr/bin/env bash
# Crash-safety check: a training run killed with SIGKILL at random moments, and resumed
# each time, ends with exactly the losses of the same run left alone.
#
#   scripts/kill_resume.sh [ROUTELM_BINARY] [KILLS]      (defaults: target/release/routelm, 20)
#
# The run is a small MoE + MoD model (router state, aux-loss-free biases and MoD predictors
# all travel through the checkpoint) on the embedded corpus, checkpointing every 5 steps so
# that kills land before, during and after checkpoint writes. A kill that lands before the
# first checkpoint starts the run over. Prints each kill and the comparison; exits non-zero
# when any logged number differs.
set -euo pipefail
bin=${1:-target/release/routelm}
kills=${2:-20}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/run.toml" <<'TOML'
[model]
vocab_size = 256
d_model = 64
n_layers = 2
n_heads = 2
d_ff = 128
max_seq_len = 64

[model.moe]
n_experts = 4
top_k = 2
every = 1
bias_update_rate = 0.01

[model.depth]
capacity = 0.5
every = 2

[train]
steps = 1500
batch_size = 8
seq_len = 64
lr = 3e-3
warmup_steps = 50
log_every = 1
eval_every = 100
eval_batches = 2
checkpoint_every = 5
TOML
export ROUTELM_NO_PROGRESS=1
echo "reference run (no kills)"
"$bin" train --config "$work/run.toml" --out "$work/ref" > "$work/ref.log" 2>&1

run="$work/killed"
start() {
  if [ -f "$run/checkpoint/state.json" ]; then
    "$bin" train --resume "$run" > "$work/killed.log" 2>&1 &
  else
    rm -rf "$run"
    "$bin" train --config "$work/run.toml" --out "$run" > "$work/killed.log" 2>&1 &
  fi
  pid=$!
}
ref_s=$(python3 -c "import json;print(json.load(open('$work/ref/checkpoint/state.json')).get('elapsed_s', 3))" 2>/dev/null || echo 3)
for i in $(seq 1 "$kills"); do
  start
  # a random moment: each kill takes on average half of the run's length over the number of
  # kills, so all of them land while the run is still going
  delay=$(python3 -c "import random; print(round(random.uniform(0.1, max(0.2, $ref_s / $kills)), 3))")
  sleep "$delay"
  if kill -9 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null || true
    step=$(python3 -c "import json;print(json.load(open('$run/checkpoint/state.json'))['step'])" 2>/dev/null || echo none)
    echo "kill $i after ${delay}s: last checkpoint at step $step"
  else
    wait "$pid" || { echo "the run failed:"; cat "$work/killed.log"; exit 1; }
    echo "kill $i after ${delay}s: the run had already finished, so only $((i - 1)) of $kills kills landed"
    exit 1
  fi
done
echo "finishing the killed run"
start
wait "$pid" || { echo "the resumed run failed:"; cat "$work/killed.log"; exit 1; }
python3 - "$work/ref/metrics.jsonl" "$run/metrics.jsonl" <<'PY'
import json, sys
def read(p):
    keep = ("step", "train_loss", "val_loss", "grad_norm", "lr", "router")
    return [{k: m.get(k) for k in keep} for m in map(json.loads, open(p))]
ref, got = read(sys.argv[1]), read(sys.argv[2])
diff = [(a["step"], a, b) for a, b in zip(ref, got) if a != b]
print(f"reference: {len(ref)} logged steps; killed and resumed: {len(got)}")
print(f"final train loss {ref[-1]['train_loss']!r} vs {got[-1]['train_loss']!r}; "
      f"final val loss {ref[-1]['val_loss']!r} vs {got[-1]['val_loss']!r}")
if len(ref) != len(got) or diff:
    for step, a, b in diff[:5]:
        print(f"step {step} differs: {a} vs {b}")
    sys.exit("the losses differ")
print("identical: every logged loss, gradient norm, learning rate and router statistic")
PY
