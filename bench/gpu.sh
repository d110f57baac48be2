#!/usr/bin/env bash
# Train and evaluate on DRIVE on one GPU, without DVC and without a package index, inside one
# time budget, and print a table that says what ran and how fast (bench/gpu_summary.py).
#
#   bash bench/gpu_prepare.sh                   # first, here: builds .gpu/ (git-ignored)
#   bash bench/gpu.sh [section.key=value ...]   # then, on the GPU machine, from the repository
#   bash bench/gpu.sh train.epochs=60 train.compile=true evaluate.threshold=auto
#
# In order, each stage under `timeout` and within BUDGET seconds for the whole command:
#   0. .gpu/stamp.json against this working tree (bench/gpu_stamp.py): a stale or half-carried
#      .gpu is refused in one line before anything runs; `nvidia-smi -L`;
#   1. the smoke run (bench/gpu_smoke.py, at most SMOKE_MAX s): the versions, printed before
#      medseg is imported; device crops equal host crops and a finite bf16 step; then the real
#      train stage for one short epoch with validation and checkpoints, and the evaluate stage
#      on two test images. A failure stops here, with one line saying why, leaving the device
#      time for a second call. From its measures, train.epochs is capped to what fits the
#      train stage's time (said in the log), so that the run is not cut off with no model;
#   2. the train stage (with --checkpoints: their cost is reported apart), nvidia-smi sampling
#      the GPU every 200 ms meanwhile;
#   3. the evaluate stage;
#   4. baselines while time is left, 3 epochs each: torch.compile switched (on, unless the run
#      compiled; its row gives the compile's time to the first step), train.cache=ram with 0
#      and 8 DataLoader workers, a 4x larger batch;
#   5. the table, from whatever finished, and one last line: what the call did, or why not.
# The wheels in .gpu/whl (the exact segmentation-models-pytorch and timm tested here) are
# unpacked ahead of the machine's own packages. With $OUT set (the device tool), the log is
# written there as it runs, and at the end: summary.md, params.yaml, epochs.jsonl (the
# trainer's per-epoch clock), smi.csv (the samples), train-metrics.json, evaluate-metrics.json,
# smoke.json (8 files with gpu.log: the device tool's limit).
#
# Environment: PYTHON (default python3), GPU_DIR (default .gpu), BUDGET (seconds, default 300:
# the first call and the machine's start leave time in a 15-minute lease for a second call),
# SMOKE_MAX (default 90), TRAIN_MAX (default 150), COMPILE_S (default 90: the seconds the
# epochs' cap keeps for torch.compile when train.compile is on), BASELINES (default
# "compile ram-w0 batch-x4 ram-w8", in this order; empty: none), KEEP=1 keeps the work folder.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TZ=UTC HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
GPU=$(realpath "${GPU_DIR:-.gpu}")
BUDGET=${BUDGET:-300}
SMOKE_MAX=${SMOKE_MAX:-90}
TRAIN_MAX=${TRAIN_MAX:-150}
COMPILE_S=${COMPILE_S:-90}
BASELINES=${BASELINES-compile ram-w0 batch-x4 ram-w8}
T0=$(date +%s)
for need in params.yaml processed.tar.gz whl stamp.json; do
    [[ -e "$GPU/$need" ]] || { echo "gpu.sh: $GPU/$need is missing; run bench/gpu_prepare.sh" >&2; exit 2; }
done
"$PY" bench/gpu_stamp.py check --gpu "$GPU" || exit 2
WORK=$(mktemp -d -t medseg-gpu.XXXXXX)
LOG=${OUT:+$OUT/gpu.log}
LOG=${LOG:-$WORK/gpu.log}
SMI=""  # the nvidia-smi sampler's pid (never `kill 0`: that is the whole process group)

left() { echo $((BUDGET - ($(date +%s) - T0))); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

# run_stage NAME LIMIT LOGFILE CMD...: CMD under `timeout`, its output also in LOGFILE; the
# start, end and exit code go to times.tsv (a start alone: the command was cut off).
run_stage() {
    local name=$1 limit=$2 logfile=$3 start rc
    shift 3
    start=$(date +%s.%N)
    printf '%s\t%s\n' "$name" "$start" >>"$WORK/times.tsv"
    echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    timeout -k 20 "$limit" "$@" 2>&1 | tee "$logfile"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$(date +%s.%N)" "$rc" >>"$WORK/times.tsv"
    echo "== $name: exit $rc"
    return "$rc"
}

collect() {  # copy the small results to $OUT (at most 8 files, with gpu.log)
    [[ -n "${OUT:-}" ]] || return 0
    cp -f "$WORK/params.yaml" "$OUT/params.yaml" 2>/dev/null
    cp -f "$WORK/summary.md" "$OUT/summary.md" 2>/dev/null
    cp -f "$WORK/smi.csv" "$OUT/smi.csv" 2>/dev/null
    cp -f "$WORK/train/metrics.json" "$OUT/train-metrics.json" 2>/dev/null
    cp -f "$WORK/evaluate/metrics.json" "$OUT/evaluate-metrics.json" 2>/dev/null
    cp -f "$WORK/smoke/smoke.json" "$OUT/smoke.json" 2>/dev/null
    grep -ho 'epoch clock .*' "$WORK/train.log" 2>/dev/null | cut -c13- >"$OUT/epochs.jsonl"
    return 0
}

finish() {
    [[ -z "$SMI" ]] || kill "$SMI" 2>/dev/null
    collect
    [[ "${KEEP:-0}" == 1 ]] && echo "kept: $WORK" || rm -rf "$WORK"
}
trap finish EXIT
trap 'exit 143' TERM INT

main() {
    # 0. what runs: the unpacked wheels first on the path, so they win over the machine's
    local site="$WORK/site"
    mkdir -p "$site"
    for wheel in "$GPU"/whl/*.whl; do
        [[ -e "$wheel" ]] && "$PY" -m zipfile -e "$wheel" "$site"
    done
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "== medseg $(git rev-parse --short HEAD 2>/dev/null || echo '?') budget ${BUDGET} s"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
    else
        echo "nvidia-smi: not found (no GPU load figures)"
    fi

    # params, with the command line's overrides; data.*, convert.* and preprocess.* are fixed
    # by bench/gpu_prepare.sh, which made the data
    tar -C "$WORK" -xzf "$GPU/processed.tar.gz" || return 2
    "$PY" - "$GPU/params.yaml" "$WORK/params.yaml" "$@" <<'PY' || return 2
import sys, yaml
src, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
p = yaml.safe_load(open(src))
for item in overrides:
    key, _, value = item.partition("=")
    section, _, name = key.partition(".")
    if name not in p.get(section, {}):
        sys.exit(f"gpu.sh: unknown params key {key!r}")
    new = yaml.safe_load(value)
    if section in ("data", "convert", "preprocess") and new != p[section][name]:
        sys.exit(f"gpu.sh: {key} is fixed by the data in .gpu (now {p[section][name]!r}); "
                 f"rebuild them with: bash bench/gpu_prepare.sh DRIVE {item}")
    p[section][name] = new
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
print("train:", {k: p["train"][k] for k in ("device", "arch", "encoder", "batch_size",
      "patch_size", "patches_per_epoch", "epochs", "lr", "cache", "compile", "amp")})
print("preprocess.contrast:", p["preprocess"]["contrast"], " evaluate:", p["evaluate"])
PY
    local P=$WORK/params.yaml D=$WORK/processed

    # 1. the smoke run; then the run's epochs capped to its train stage's time
    local limit train_limit
    limit=$(min "$SMOKE_MAX" "$(left)")
    run_stage smoke "$limit" "$WORK/smoke.log" \
        "$PY" bench/gpu_smoke.py run --params "$P" --data "$D" --work "$WORK/smoke" \
        --limit $((limit - 5)) || return 1
    train_limit=$(min "$TRAIN_MAX" $(($(left) - 70)))
    ((train_limit >= 20)) || { echo "gpu.sh: no time left to train (BUDGET ${BUDGET})"; return 1; }
    "$PY" bench/gpu_smoke.py fit "$WORK/smoke/smoke.json" "$P" "$train_limit" \
        --compile-s "$COMPILE_S" || return 1

    # 2-3. train, evaluate
    run_stage train "$train_limit" "$WORK/train.log" \
        "$PY" stages/train.py --params "$P" --data "$D" --models "$WORK/models" \
        --logs "$WORK/train" --checkpoints "$WORK/checkpoints"
    collect
    if [[ -f "$WORK/models/model.safetensors" ]]; then
        run_stage evaluate "$(min 60 $(($(left) - 15)))" "$WORK/evaluate.log" \
            "$PY" stages/evaluate.py --params "$P" --data "$D" --model "$WORK/models" \
            --out "$WORK/evaluate"
    fi
    collect

    # 4. baselines: the usual host loader, and headroom, 3 epochs each, while time is left
    local name
    for name in $BASELINES; do
        (($(left) > 45)) || { echo "== baseline $name: skipped, no time left"; continue; }
        "$PY" - "$P" "$WORK/$name.yaml" "$name" <<'PY' || continue
import sys, yaml
src, out, name = sys.argv[1:]
p = yaml.safe_load(open(src))
t = p["train"]
changes = {
    "ram-w0": {"cache": "ram", "workers": 0},
    "ram-w8": {"cache": "ram", "workers": 8},
    "batch-x4": {"batch_size": 4 * t["batch_size"]},
    "compile": {"compile": not t["compile"]},  # torch.compile, or not when the run compiled
}
if name not in changes:
    sys.exit(f"gpu.sh: unknown baseline {name!r} (known: {', '.join(changes)})")
t.update(changes[name], epochs=3, val_every=1000)  # validated once, after the last epoch
print(f"baseline {name}: 3 epochs,", changes[name])
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
PY
        run_stage "baseline-$name" "$(min 90 $(($(left) - 15)))" "$WORK/baseline-$name.log" \
            "$PY" stages/train.py --params "$WORK/$name.yaml" --data "$D" \
            --models "$WORK/$name/models" --logs "$WORK/$name/train"
    done
    return 0
}

if command -v nvidia-smi >/dev/null; then  # sampled from here to the table, every 200 ms
    nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,clocks.sm,memory.used \
        --format=csv,noheader,nounits -lms 200 >"$WORK/smi.csv" 2>&1 &
    SMI=$!
fi
main "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[[ -z "$SMI" ]] || kill "$SMI" 2>/dev/null
"$PY" bench/gpu_summary.py "$WORK" --out "$WORK/summary.md" 2>&1 | tee -a "$LOG"
used=$(($(date +%s) - T0))
failed=$(grep -h '^SMOKE FAILED: ' "$WORK/smoke.log" 2>/dev/null | tail -1)
if [[ -n "$failed" ]]; then
    verdict="the smoke run failed, nothing else ran: ${failed#SMOKE FAILED: }"
elif [[ -f "$WORK/smoke.log" ]] && ! grep -q '^smoke run passed' "$WORK/smoke.log"; then
    verdict="the smoke run did not finish within SMOKE_MAX (${SMOKE_MAX} s), nothing else ran"
elif ((status != 0)); then
    verdict="stopped (exit $status) before training: see the log above"
elif [[ -f "$WORK/evaluate/metrics.json" ]]; then
    verdict="trained and evaluated"
else
    verdict="trained, but no test metrics (see the train and evaluate rows)"
fi
echo "gpu.sh: $verdict; ${used} s of the ${BUDGET} s budget" | tee -a "$LOG"
exit "$status"
