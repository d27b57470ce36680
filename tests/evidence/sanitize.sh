#!/usr/bin/env bash
# The decode kernel's and the quantisers' test shapes under compute-sanitizer memcheck, on a
# CUDA machine: one pytest run per selection, each writing under OUTDIR its sanitizer log
# (NAME.sanitizer.log), its pytest output (NAME.pytest.log), and one line in summary.txt:
#   NAME: ERROR SUMMARY: N errors (exit P, sanitizer exit S)   P: pytest's exit status
# which is also printed. A control selection first plants an out-of-bounds read in a Triton
# kernel: it must report errors, else the sanitizer sees nothing here (the run says so).
#
#   usage: tests/evidence/sanitize.sh OUTDIR [SELECTION ...]
#   SELECTION: a name below, or NAME=PYTEST_ARGS (e.g. 'mine=suites/sinks/test_x.py -k y');
#   default: every name but decode_long.
#   env: SANITIZE_EXAMPLES  hypothesis examples per property test (default 10)
#        SANITIZE_TIMEOUT   seconds per selection (default 1200)
#        COMPUTE_SANITIZER  the sanitizer binary (default: compute-sanitizer on PATH, or
#                           /usr/local/cuda/bin/compute-sanitizer)
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own cudaMalloc, so a read past a
# tensor is outside any allocation and memcheck reports it (inside the caching allocator's
# blocks it would not). Timed tests run once (--benchmark-disable) and the speed tests and
# the long GPU decode cases are left out of the default set: under memcheck every kernel,
# torch's reference ops too, runs 10-100x slower.
#
# Seen on the H200 (Firecracker; compute-sanitizer 2025.3.1): control, error_contract 17 s;
# decode_properties + quant_properties with SANITIZE_EXAMPLES=2: 63 s, 0 errors; persistent
# (2026-12-03): 55 tests, 74 s, 0 errors, the control caught. On a
# gVisor machine compute-sanitizer refuses the device: the control says so (exit 3).
set -u
cd "$(dirname "$0")/../.." || exit 2
out=${1:?usage: tests/evidence/sanitize.sh OUTDIR [SELECTION ...]}
shift
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

# name -> pytest arguments (shell words: quotes group)
declare -A SELECTIONS=(
  [decode_kernel]='suites/sinks/test_decode_kernel.py -k "not long"'
  [decode_long]='suites/sinks/test_decode_kernel.py -k long'
  [error_contract]='suites/sinks/test_error_contract.py'
  [paged_kv]='suites/sinks/test_paged_kv.py suites/sinks/test_reference.py'
  [decode_properties]='suites/sinks/test_decode_properties.py suites/sinks/test_model_properties.py'
  [paged_kv_properties]='suites/sinks/test_paged_kv_properties.py'
  [quant_properties]='suites/compression/test_quant_properties.py'
  [fp8_quant]='suites/compression/test_fp8_quant.py -k "not speed"'
  [mx_nvfp4_quant]='suites/compression/test_mxfp8_quant.py suites/compression/test_nvfp4_quant.py -k "not speed"'
  [compressed]='suites/compression/test_compressed_attention.py -k "not speed"'
  [persistent]='suites/decode_prefill/test_persistent_decode.py suites/decode_prefill/test_decode_tiers.py -k "not speed and not long and not spreads and not compile"'
)
ORDER=(decode_kernel error_contract paged_kv decode_properties paged_kv_properties
       quant_properties fp8_quant mx_nvfp4_quant compressed persistent)
[ $# -gt 0 ] && ORDER=("$@")

san=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$san" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER)" | tee "$out/summary.txt"
  exit 2
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
export KVPERF_HYPOTHESIS_EXAMPLES=${SANITIZE_EXAMPLES:-10}
limit=${SANITIZE_TIMEOUT:-1200}

# The checkout importable without installing anything (no network there).
plugin=()
if ! python3 -c 'import kvperf_kernels, pytest_kvperf' 2>/dev/null; then
  mkdir -p /tmp/kvperf_path && ln -sfn "$PWD/kernels" /tmp/kvperf_path/kvperf_kernels
  export PYTHONPATH="$PWD:/tmp/kvperf_path${PYTHONPATH:+:$PYTHONPATH}"
  plugin=(-p pytest_kvperf.plugin)
fi

sanitize() {  # name command...: runs it under memcheck, appends its summary line
  local name=$1; shift
  local log="$out/$name.sanitizer.log" rc errors program_rc
  timeout -s TERM "$limit" "$san" --tool memcheck --error-exitcode 99 --print-limit 50 \
    --report-api-errors no --target-processes all --log-file "$log" "$@" \
    >"$out/$name.pytest.log" 2>&1
  rc=$?
  # one ERROR SUMMARY per sanitized process: add them up
  errors=$(grep -ho 'ERROR SUMMARY: [0-9]*' "$log" 2>/dev/null | awk '{n += $3} END {print n + 0}')
  if ! grep -q 'ERROR SUMMARY' "$log" 2>/dev/null; then
    errors="no ERROR SUMMARY in $name.sanitizer.log (sanitizer failed to run?);"
  fi
  program_rc=$rc
  [ "$rc" -eq 99 ] && program_rc="?"  # the sanitizer's error exit hides the program's
  [ "$rc" -eq 124 ] && program_rc="timeout after ${limit}s"
  echo "$name: ERROR SUMMARY: $errors errors (exit $program_rc, sanitizer exit $rc)" \
    | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.pytest.log" | sed "s/^/  $name | /"
}

: >"$out/summary.txt"
cat >"$out/control.py" <<'EOF'
# A Triton kernel that reads 1 MiB past a 16-float tensor: memcheck must report it.
import torch
import triton
import triton.language as tl

@triton.jit
def _read_past(x_ptr, out_ptr):
    tl.store(out_ptr, tl.load(x_ptr + (1 << 18)))

x = torch.zeros(16, device="cuda")
out = torch.zeros(1, device="cuda")
_read_past[(1,)](x, out)
torch.cuda.synchronize()
EOF
sanitize control python3 "$out/control.py"
if ! grep -q '^control: ERROR SUMMARY: [1-9]' "$out/summary.txt"; then
  echo "the planted out-of-bounds read was not reported: memcheck does not work here" \
       "(on gVisor compute-sanitizer refuses the device); the selections would prove nothing" \
    | tee -a "$out/summary.txt"
  exit 3
fi

status=0
for spec in "${ORDER[@]}"; do
  case $spec in
    *=*) name=${spec%%=*}; args=${spec#*=} ;;
    *) name=$spec; args=${SELECTIONS[$spec]:-} ;;
  esac
  if [ -z "$args" ]; then
    echo "unknown selection $spec (known: ${!SELECTIONS[*]})" | tee -a "$out/summary.txt"
    status=2
    continue
  fi
  eval "argv=($args)"  # the caller's own words, quotes kept
  sanitize "$name" python3 -m pytest "${plugin[@]}" -q -rfE -p no:cacheprovider \
    --benchmark-disable "${argv[@]}"
  grep -q "^$name: ERROR SUMMARY: 0 errors (exit 0," "$out/summary.txt" || status=1
done
echo "summary: $out/summary.txt"
exit "$status"
