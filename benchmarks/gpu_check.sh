#!/usr/bin/env bash
# The GPU check: everything tiedmoe claims, measured on one GPU by one command, into one folder.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR: $OUT when set, else benchmarks/results/gpu_check;
#                                                      a dry run's: $TMPDIR/gpu_check_dry_run)
#
# Sized for <= 8 minutes on one H200. Steps (each time-limited; a failed step is recorded and the
# rest still run, so a partial result always comes back):
#   1. default_run: the default config (`./run.sh` with EP 1: one GPU is one rank) for its 300 steps;
#      the corpus when data/default is there (carry it), else random tokens
#   2. parity: `trainer.parity --cells gpu1` (ZeRO 0 and 3, EP 1, tied and untied, fp32 and bf16) on
#      the GPU against the plain-PyTorch reference (which runs on the CPU)
#   3. throughput: `benchmarks/equal_memory.py` bf16, untied vs tied g=2 and g=4, an OLMoE-shaped model
#      (64 experts, top-8, 16 layers, vocab 50304) cut to d_model 768 / expert FFN 384 (about 1B
#      parameters untied) so three engines fit one GPU and build quickly: tokens/s, MFU, peak
#      max_memory_allocated at equal micro-batch and at equal memory (budget: untied's peak)
#   4. activations: `benchmarks/activation_memory.py`, the memory planner's activation estimate against
#      max_memory_allocated (the plain model, bf16, OLMoE-shaped, 4 layers, seq 2048, micro-batch 2 and
#      4, with and without activation checkpointing)
#   5. report: gpu_check.json + summary.md (benchmarks/gpu_check_report.py)
# Writes at most 8 files (the device tool brings back 8): gpu_check.log, default_run.json, parity.json,
# throughput.json, activations.json, gpu_check.json, summary.md, and throughput.png where matplotlib is
# installed (the device has none: `python benchmarks/equal_memory.py --plot throughput.json` draws it here).
#
# The device image has no DeepSpeed: when `import deepspeed` fails, the wheels in .whl/ (made by
# benchmarks/fetch_gpu_wheels.sh, carried with the run) are installed into /tmp/site first.
# --dry-run: the same steps on CPU at tiny size in about a minute (CI runs it: tests/test_gpu_check.py).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
usage="usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]"
dry=0
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$usage" >&2; echo "gpu_check.sh: error: unknown option $arg (expected --dry-run or an output folder)" >&2
        exit 2 ;;
    *) [ -z "$out" ] || { echo "$usage" >&2; echo "gpu_check.sh: error: one output folder expected, got '$out' and '$arg'" >&2
                          exit 2; }
       out="$arg" ;;
  esac
done
if [ "$dry" = 1 ]; then default_out="${TMPDIR:-/tmp}/gpu_check_dry_run"; else default_out="$repo/benchmarks/results/gpu_check"; fi
out="${out:-${OUT:-$default_out}}"  # a dry run never lands where the GPU's results are committed
if ! mkdir -p -- "$out" 2>/dev/null || ! [ -w "$out" ]; then
  echo "gpu_check.sh: error: output folder $out: cannot be created or written" >&2
  exit 2
fi
out="$(cd -- "$out" && pwd)"
py="${PYTHON:-python3}"
if [ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && [ "$dry" = 1 ]; then py="$repo/.venv/bin/python"; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
log="$out/gpu_check.log"
: > "$log"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::FutureWarning"

if ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: error: deepspeed is not importable and .whl/ holds no wheels (run benchmarks/fetch_gpu_wheels.sh and carry .whl)" | tee -a "$log" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$log" 2>&1 \
    || { echo "gpu_check.sh: error: installing .whl/ failed (see $log)" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "$dry" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TIEDMOE_CPU_RANKS=1
  gpu=()
  default_args=(run.steps=3 run.eval_batches=1 run.log_every=1 data.seq_len=32 data.source=random)
  parity_args=(--steps 2)
  tp_args=(--variants untied,g2,g4 --micro-batch 2 --max-micro-batch 3 --steps 1 --repeats 1
           model.preset=olmoe_tiny data.seq_len=32 run.precision=bf16 run.peak_flops=1e11)
  act_args=(--device cpu --micro-batch 2 model.preset=olmoe_tiny data.seq_len=32 run.precision=bf16)
  limits=(120 120 180 60)
else
  gpu=(--gpu)
  default_args=()
  [ -f data/default/manifest.json ] || default_args=(data.source=random)
  parity_args=(--steps 8)
  tp_args=(--variants untied,g2,g4 --micro-batch 4 --max-micro-batch 8 --steps 3 --repeats 3
           model.preset=olmoe model.n_layers=16 model.d_model=768 model.n_heads=12 model.expert_ffn_dim=384
           data.seq_len=2048 run.precision=bf16 parallel.ds_config=ds_configs/zero3_gpu.json)
  act_args=(--device cuda --micro-batch 2,4 model.preset=olmoe model.n_layers=4 model.d_model=768 model.n_heads=12
            model.expert_ffn_dim=384 data.seq_len=2048 run.precision=bf16)
  limits=(100 110 230 40)  # default run, parity, throughput, activations: 8 minutes if every step ran to its limit
fi
steps_file="$work/steps.jsonl"

step() {  # step NAME SECONDS CMD...: run with a time limit, log its output, record rc and seconds
  local name="$1" seconds="$2"; shift 2
  local start; start=$(date +%s)
  echo "== $name: $*" | tee -a "$log"
  timeout "$seconds" "$@" >>"$log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >>"$steps_file"
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$log"
}

step default_run "${limits[0]}" "$py" run.sh run.name=gpu_check_default "run.out_dir=$work/runs" run.resume=never \
  parallel.expert_parallel_size=1 "${default_args[@]}"
cp "$work/runs/gpu_check_default/summary.json" "$out/default_run.json" 2>/dev/null
grep '"tokens_per_s"' "$work/runs/gpu_check_default/metrics.jsonl" 2>/dev/null | tail -n 1 >"$work/default_metrics.json"
step parity "${limits[1]}" "$py" -m trainer.parity --cells gpu1 --world 1 "${gpu[@]}" "${parity_args[@]}" --json "$out/parity.json"
step throughput "${limits[2]}" "$py" benchmarks/equal_memory.py --world 1 "${gpu[@]}" --json "$out/throughput.json" \
  "${tp_args[@]}" parallel.expert_parallel_size=1
step activations "${limits[3]}" "$py" benchmarks/activation_memory.py --json "$out/activations.json" "${act_args[@]}"
"$py" benchmarks/gpu_check_report.py "$out" --steps "$steps_file" --default-metrics "$work/default_metrics.json" \
  --dry-run "$dry" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
rm -rf "$work"
exit "$rc"
