#!/usr/bin/env bash
# One device-machine session: build gate._C, run the GPU tests, the sanitizers and the benchmark.
# Usage (on the GPU machine, repository root): scripts/gpu_check.sh MODE, every mode but the probes
# builds first.
#   quick: GPU tests (no slow) + quick benchmark     tests: all GPU tests (slow stress tests included)
#   tune: GPU tests (no slow) + tile sweep           check: all GPU tests + memcheck, racecheck, synccheck
#   bench: the full benchmark                        final: all GPU tests + synccheck + the main demo
#   full: all GPU tests + the three sanitizers + the full benchmark
#   lora: the LoRA GPU tests (slow included), the LoRA rows of the benchmark, then the other GPU
#   tests (no slow), memcheck and synccheck (the whole workload, its one-launch part, the rest)
#   probes: the lora_cluster, x_multicast and route_cluster probes (benchmarks/probes; no build of
#   the package)
#   lora-all: lora's LoRA tests and rows, the rest of the GPU tests (no slow), Nsight Compute on
#   router_gemm(_lora) at M = 1, the lora_cluster probe, synccheck on the one-launch part, memcheck
#   (one call's worth)
#   lora-bench: the LoRA GPU tests (slow included) and rows, the gpt-oss rows of the router
#   benchmark at M = 1-256 (issue 23's table: cuBLAS, PDL off and on; routed rows), then the
#   other GPU tests (no slow) and memcheck: a stop's first call, what matters most first
#   tiles: what a change of the router's tile rule needs: GPU tests (no slow), the gpt-oss rows
#   with every tile configuration beside them and the LoRA rows, the fp32 and other models' rows,
#   memcheck and synccheck on the router kernels
#   racecheck: racecheck on its share of the sanitizer workload (no time limit)
#   ab: a kernel change against what it replaces, in one call: builds in place, the LoRA GPU tests
#   (slow included), the LoRA rows; then the files under ab_other/ (repository paths; an untracked
#   folder the caller fills, e.g. from git show) put in place, an incremental rebuild, the LoRA rows
#   again; every file restored at the end
#   ab-probe: a change of the decode kernel's one launch against what it replaces, on the lora_cluster
#   probe's clock (its --library rows, M = 1, ranks 16 and 64, checked against a host reference):
#   this tree's probe and one built from a copy with ab_other/'s files in place, compiled side by
#   side and timed in turn, twice; then the package build and the LoRA GPU tests (slow included)
#   on this tree. Minutes where ab takes ten
#   line: where the decode kernel hands E >= 128 over to the tensor-core kernel (M = 5-8): the
#   router rows of the E = 128 models with every tile configuration, and the LoRA rows, with
#   router_gemm_small_m_preferred as it is and then with every E >= 128 call above M = 4 moved to
#   the tensor-core kernel (an incremental rebuild; the fused shrink follows the router's kernel)
#   dispatch: a change of the decode / tensor-core line: the GPU tests (no slow), the routing rows,
#   the LoRA rows, then the E = 128 models' rows with every tile configuration at M = 4-8
#   lora-group: the lora_token_group probe (issue 22 at M = 8: one launch for a group of tokens),
#   then memcheck and synccheck on its --check-only run (no package build)
#   lora-split-k: the lora_split_k probe (issue 22 at M = 8-32: the whole delta inside the
#   tensor-core kernel's launch), then memcheck and synccheck on its --check-only run (no build)
#   lora-probe: the lora_cluster probe with the library's kernels on its clock, Nsight Compute on
#   the library's and the probe's M = 1 kernels, synccheck on the probe (no package build)
#   profile: Nsight Compute's view of one call per gpt-oss shape (benchmarks/probes/ncu_router.py)
#   route: the GPU tests (no slow) + the routing rows of the benchmark
#   route-final: route + the routing stress tests, the three sanitizers (90 s each at most), and
#   the GPU eager host time of the layers
#   stop: what a stop's closing run needs in about four minutes: GPU tests (no slow), the routing
#   and LoRA stress tests, the router's PDL-chain stress tests, the gpt-oss rows of the benchmark
#   (router, LoRA, routing) at M = 1-256,
#   the GPU eager host time, memcheck and synccheck (60 s each at most)
# Logs and results go to $OUT (or ./gpu_out), packed into $OUT/logs_MODE.tgz at the end (the device
# returns at most 8 files). Prints a short summary last.
set -uo pipefail
mode=${1:-quick}
final_out=${OUT:-gpu_out}
out=$(mktemp -d)
mkdir -p "$final_out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
summary=()
# Keeps the summary and the packed logs current after every step: a call cut off at the device's
# time limit still returns what ran.
record() {
  summary+=("$1")
  printf '%s\n' "${summary[@]}" >"$out/summary.txt"
  tar czf "$final_out/logs_$mode.tgz" -C "$out" .
}
start=$(date +%s)
# The probes are torch-free (no package build); line builds in place, twice.
if [ "$mode" != probes ] && [ "$mode" != lora-probe ] && [ "$mode" != lora-group ] &&
    [ "$mode" != lora-split-k ] && [ "$mode" != line ] &&
    [ "$mode" != ab ] && [ "$mode" != ab-probe ]; then
  python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
  status=$?
  build_s=$(( $(date +%s) - start ))
  record "build: exit $status in ${build_s}s"
  if [ $status -ne 0 ]; then
    tail -40 "$out/build.log"; exit 1
  fi
  python3 -c "import torch, gate; from gate import ops; print('gpu', torch.cuda.get_device_name(), 'torch', torch.__version__, 'backend', ops.backend_for(torch.device('cuda'), torch.bfloat16))" | tee "$out/env.txt"
fi

run_tests() {  # $1: pytest marker expression, $2: label, then pytest's extra arguments; the tests
  # of $tests_path (default: all of tests/)
  timeout "${tests_timeout:-0}" python3 -m pytest -q -p no:cacheprovider -m "$1" "${tests_path:-tests}" --durations=8 \
    --continue-on-collection-errors \
    "${@:3}" >"$out/pytest_$2.log" 2>&1
  local rc=$?
  record "pytest [$1]: exit $rc: $(tail -1 "$out/pytest_$2.log")"
  [ $rc -ne 0 ] && grep -E "^(FAILED|ERROR)|Error|assert" "$out/pytest_$2.log" | head -20
}

sanitize() {  # $1: seconds per tool (0: none), then compute-sanitizer tools; a representative
  # workload, all of it or the parts in $sanitize_parts (scripts/sanitize_workload.py --help)
  local limit=$1 tool log
  for tool in "${@:2}"; do
    log="$out/sanitize_$tool${sanitize_parts:+_${sanitize_parts// /_}}.log"
    # shellcheck disable=SC2086  # the parts are words
    timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/sanitize_workload.py \
      ${sanitize_parts:-} >"$log" 2>&1
    record "compute-sanitizer $tool ${sanitize_parts:-}: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1))"
  done
}

# racecheck's share of the workload: router_tiles in place of router_kernels (each tile
# configuration once; the whole part did not finish in 120 s under racecheck)
racecheck_parts="router_tiles simple_kernel lora_expand lora_one_launch routing_kernel"
racecheck() {  # $1: seconds (0: none)
  sanitize_parts=$racecheck_parts sanitize "$1" racecheck
}

one_launch_tests() {  # $1: seconds; the one-launch LoRA tests (not slow), on their own clock: a
  # hang in the cluster exchange must not take the device time of the whole check
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lora_one_launch_gpu.py \
    >"$out/pytest_lora_one_launch.log" 2>&1
  record "pytest one-launch LoRA: exit $?: $(tail -1 "$out/pytest_lora_one_launch.log")"
}

lora_rows() {  # the benchmark's LoRA rows (issue 22's protocol), cold
  timeout 150 python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-route --caches cold \
    --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
  record "LoRA rows: exit ${PIPESTATUS[0]}"
}

lora_tests() {  # the LoRA GPU tests, slow included (the one launch bit for bit against the two)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_lora_one_launch_gpu.py \
    tests/test_lora_gpu.py >"$out/pytest_lora.log" 2>&1
  record "pytest LoRA (slow included): exit $?: $(tail -1 "$out/pytest_lora.log")"
}

wide_router_rows() {  # $1: a label, then router_gemm.py's arguments (M values, --lora-m or
  # --no-lora): the E = 128 models' router rows with every tile configuration beside the dispatch's
  timeout 240 python3 benchmarks/router_gemm.py --tune --no-chain --no-route --only '^gpt-oss-120b$|Qwen3|Llama' \
    --caches cold --out "$out/line-$1" "${@:2}" 2>"$out/bench_$1.err" \
    | grep -E "^best|gpt-oss|Qwen|Llama|lora" | tee "$out/line_$1.txt"
  record "rows ($1): exit ${PIPESTATUS[0]}"
}

build_in_place() {  # $1: a label; an incremental in-place build (no pip), recorded; fails loudly
  MOEGATE_BUILD_CUDA=1 python3 setup.py build_ext --inplace >"$out/build_$1.log" 2>&1
  local status=$?
  record "build ($1): exit $status in $(( $(date +%s) - start ))s"
  [ $status -eq 0 ] || tail -40 "$out/build_$1.log"
  return $status
}

lora_then_rest() {  # $1: seconds for the rest; the LoRA GPU tests (slow included), the LoRA rows,
  # then the other GPU tests (no slow): what a LoRA change needs comes back first
  lora_tests
  lora_rows
  tests_timeout=$1 run_tests "(gpu or kernel) and not slow" gpu --ignore=tests/test_lora_one_launch_gpu.py \
    --ignore=tests/test_lora_gpu.py
}

compile_probe() {  # $1: a probe of benchmarks/probes (x_multicast links the tensor-core kernel,
  # lora_cluster the decode kernel's plain and one-launch LoRA forms, lora_token_group the decode
  # kernel and the expand, lora_split_k both kernels and the expand)
  local extra=""
  [ "$1" = x_multicast ] && extra=csrc/kernels/router_gemm_sm90.cu
  [ "$1" = lora_cluster ] && extra="csrc/kernels/router_gemm_small_m.cu csrc/kernels/router_gemm_small_m_lora.cu"
  [ "$1" = lora_token_group ] && extra="csrc/kernels/router_gemm_small_m.cu csrc/kernels/lora_expand.cu
    csrc/kernels/route_logits.cu"
  [ "$1" = lora_split_k ] && extra="csrc/kernels/router_gemm_sm90.cu csrc/kernels/router_gemm_small_m.cu
    csrc/kernels/lora_expand.cu csrc/kernels/route_logits.cu"
  # shellcheck disable=SC2086  # no extra source is an empty word list
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o "$out/$1" \
    "benchmarks/probes/$1.cu" $extra >"$out/probe_$1.txt" 2>&1
}

probe_and_sanitize() {  # $1: a probe that takes --check-only, $2: seconds for its timed run; then
  # memcheck and synccheck on its --check-only run
  compile_probe "$1"
  record "compile $1: exit $?"
  timeout "$2" "$out/$1" >"$out/probe_$1.txt" 2>&1
  record "probe $1: exit $?"
  local tool
  for tool in memcheck synccheck; do
    timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 "$out/$1" --check-only \
      >"$out/${tool}_$1.txt" 2>&1
    record "$tool $1 --check-only: exit $? ($(grep 'ERROR SUMMARY' "$out/${tool}_$1.txt" | tail -1))"
  done
  rm -f "$out/$1"
  cat "$out/probe_$1.txt"
}

case "$mode" in
  quick)
    run_tests "(gpu or kernel) and not slow" gpu
    python3 benchmarks/router_gemm.py --quick --no-chain --no-lora --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
    ;;
  tests)
    run_tests "gpu or kernel" gpu_all
    ;;
  tune)
    run_tests "(gpu or kernel) and not slow" gpu
    python3 benchmarks/router_gemm.py --tune --no-chain --no-lora --only '^gpt-oss-1?[02]+b$' --caches cold \
      --m 1,2,4,8,16,32,64,128,256 --out "$out/tune" 2>"$out/bench.err" | grep -E "^best|gpt-oss" | tee "$out/tune.txt"
    ;;
  check)
    run_tests "gpu or kernel" gpu_all
    sanitize 0 memcheck synccheck
    racecheck 0
    ;;
  bench)
    python3 benchmarks/router_gemm.py --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
    ;;
  final)  # all GPU tests, synccheck, the main demo on the GPU (the benchmark is its own call: `bench`)
    run_tests "gpu or kernel" gpu_all
    sanitize 0 synccheck
    python3 examples/serve_router_adapters.py --device cuda >"$out/demo.log" 2>&1
    record "demo on cuda: exit $?"
    tail -30 "$out/demo.log"
    ;;
  full)
    run_tests "gpu or kernel" gpu_all
    sanitize 0 memcheck synccheck
    racecheck 0
    python3 benchmarks/router_gemm.py --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
    ;;
  route)
    run_tests "(gpu or kernel) and not slow" gpu
    python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-lora --caches cold --out "$out" \
      2>"$out/bench.err" | tee "$out/bench.txt"
    ;;
  route-final)
    run_tests "(gpu or kernel) and not slow" gpu
    python3 -m pytest -q -p no:cacheprovider -m slow tests/test_route_gpu.py >"$out/pytest_route_slow.log" 2>&1
    record "pytest routing stress: exit $?: $(tail -1 "$out/pytest_route_slow.log")"
    sanitize 90 memcheck synccheck
    racecheck 90
    python3 benchmarks/probes/host_overhead.py --device cuda --calls 5000 >"$out/host_cuda.txt" 2>&1
    record "host time, cuda: $(tail -3 "$out/host_cuda.txt" | tr '\n' ' ')"
    python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-lora --caches cold --out "$out" \
      2>"$out/bench.err" | tee "$out/bench.txt"
    ;;
  stop)
    one_launch_tests 120
    tests_timeout=300 run_tests "(gpu or kernel) and not slow" gpu --ignore=tests/test_lora_one_launch_gpu.py
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m slow tests/test_route_gpu.py tests/test_lora_gpu.py \
      tests/test_lora_one_launch_gpu.py >"$out/pytest_slow.log" 2>&1
    record "pytest routing and LoRA stress: exit $?: $(tail -1 "$out/pytest_slow.log")"
    # the router's PDL chains (the 100k-call stress test is check's)
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m slow -k pdl_chain tests/test_router_gemm_stress_gpu.py \
      >"$out/pytest_pdl_chain.log" 2>&1
    record "pytest router PDL chains: exit $?: $(tail -1 "$out/pytest_pdl_chain.log")"
    timeout 180 python3 benchmarks/router_gemm.py --only '^gpt-oss-1?[02]+b$' --caches cold \
      --m 1,8,16,32,64,128,256 --no-chain --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
    record "gpt-oss rows: exit ${PIPESTATUS[0]}"
    timeout 60 python3 benchmarks/probes/host_overhead.py --device cuda --calls 5000 >"$out/host_cuda.txt" 2>&1
    record "host time, cuda: see host_cuda.txt"
    sanitize 60 memcheck synccheck
    ;;
  lora)  # the LoRA kernels first, then the rest of the suite and the sanitizers (stop's order when
    # device time is short: what a LoRA change needs comes back even if the call is cut off)
    lora_then_rest 240
    sanitize 60 memcheck synccheck
    # synccheck stopped the whole workload in its one-launch part (illegal address, 0 hazards):
    # that part alone, then the rest without it
    sanitize_parts=lora_one_launch sanitize 60 synccheck
    sanitize_parts="router_kernels simple_kernel lora_expand routing_kernel" sanitize 60 synccheck
    ;;
  dispatch)  # by priority (a call cut off keeps what ran): whether to keep it, then its rows
    # the router tests (the route cases the change moves) on their own clock, then the rest
    tests_path=tests/test_router_gemm_gpu.py tests_timeout=120 run_tests "(gpu or kernel) and not slow" router
    tests_timeout=150 run_tests "(gpu or kernel) and not slow" gpu --ignore=tests/test_router_gemm_gpu.py
    timeout 90 python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-lora --caches cold \
      --out "$out/route" 2>"$out/bench_route.err" | tee "$out/route.txt"
    record "routing rows: exit ${PIPESTATUS[0]}"
    lora_rows
    wide_router_rows dispatch --m 4,5,6,8 --no-lora
    ;;
  lora-bench)
    lora_tests
    lora_rows
    timeout 180 python3 benchmarks/router_gemm.py --only '^gpt-oss-1?[02]+b$' --caches cold \
      --m 1,8,16,32,64,128,256 --no-chain --no-lora --out "$out/router" \
      2>"$out/bench_router.err" | tee "$out/bench_router.txt"
    record "router rows: exit ${PIPESTATUS[0]}"
    tests_timeout=150 run_tests "(gpu or kernel) and not slow" gpu --ignore=tests/test_lora_one_launch_gpu.py \
      --ignore=tests/test_lora_gpu.py
    sanitize 60 memcheck
    ;;
  tiles)
    tests_timeout=150 run_tests "(gpu or kernel) and not slow" gpu
    timeout 150 python3 benchmarks/router_gemm.py --only '^gpt-oss-1?[02]+b$' --caches cold --tune \
      --m 1,8,16,32,64,128,256 --no-chain --no-route --out "$out" 2>"$out/bench.err" | tee "$out/bench.txt"
    record "gpt-oss rows, tile sweep, LoRA rows: see bench.txt"
    timeout 120 python3 benchmarks/router_gemm.py --only 'fp32|Qwen3|Llama|Mixtral|MiniMax' --caches cold \
      --no-chain --no-route --no-lora --out "$out/others" 2>"$out/bench_others.err" | tee "$out/bench_others.txt"
    record "fp32 and other models' rows: see bench_others.txt"
    sanitize_parts=router_kernels sanitize 60 memcheck synccheck
    ;;
  lora-all)  # lora and the one launch against the probe in one call, by priority (a call cut off
    # at the device's limit keeps what ran): correctness of the LoRA kernels, their rows, the rest
    # of the suite, then why the one launch is slower than the probe, then the sanitizers
    lora_then_rest 200
    for lora in 0 16; do
      timeout 60 python3 benchmarks/probes/ncu_router.py --e 128 --m 1 --lora "$lora" --out "$out/ncu" \
        >>"$out/ncu.txt" 2>&1
      record "ncu router_gemm(_lora) M=1 rank $lora: exit $?"
    done
    # the probe's design on the same GPU: the bar the one launch's rows are read against
    compile_probe lora_cluster && timeout 60 "$out/lora_cluster" >>"$out/probe_lora_cluster.txt" 2>&1
    record "probe lora_cluster: exit $?"
    rm -f "$out/lora_cluster"
    sanitize_parts=lora_one_launch sanitize 60 synccheck
    sanitize 60 memcheck
    cat "$out/ncu.txt" "$out/probe_lora_cluster.txt"
    ;;
  probes)  # the torch-free probes that decide the next LoRA, tensor-core and routing steps
    for probe in lora_cluster x_multicast route_cluster; do
      compile_probe "$probe" && timeout 120 "$out/$probe" >>"$out/probe_$probe.txt" 2>&1
      record "probe $probe: exit $?"
      rm -f "$out/$probe"
      tail -25 "$out/probe_$probe.txt"
    done
    ;;
  lora-group)
    probe_and_sanitize lora_token_group 120
    ;;
  lora-split-k)
    probe_and_sanitize lora_split_k 180
    ;;
  lora-probe)  # the one launch against the probe's design in one process, no package build, by
    # priority (a call cut off keeps what ran): the lora_cluster probe's rows (its last ones the
    # library's kernels), Nsight Compute on the third launch of the library's and the probe's
    # M = 1, rank-16 kernels (warm code, cold weights; reports kept for the per-instruction
    # counts), then synccheck on the probe's and the library's clusters of 16
    compile_probe lora_cluster
    record "compile lora_cluster: exit $?"
    timeout 90 "$out/lora_cluster" >"$out/probe_lora_cluster.txt" 2>&1
    record "probe lora_cluster: exit $?"
    # (demangled: "router_gemm_small_m_kernel<(int)256, (int)1, (int)1, __nv_bfloat16, (...Fusion)3,
    # (int)1>", "gate_kernel<(int)16, (int)1, (...Slot)1>")
    for kernel in 'router_gemm_small_m_kernel<[^,]*256, [^,]*1, [^,]*1, __nv_bfloat16, [^,]*3, [^>]*1>' \
        'gate_kernel<[^,]*16, [^,]*1, [^,]*Slot.1>'; do
      name=$(echo "$kernel" | tr -c 'a-z0-9\n' '_' | cut -c1-40)
      timeout 90 ncu --set full --clock-control none --cache-control none --kernel-name-base demangled \
        -k "regex:$kernel" --launch-skip 2 --launch-count 1 -o "$out/ncu_$name" -f "$out/lora_cluster" \
        >"$out/ncu_$name.txt" 2>&1
      record "ncu $kernel: exit $?"
      ncu --import "$out/ncu_$name.ncu-rep" --page details --print-units base 2>/dev/null |
        grep -E 'Duration|Elapsed Cycles|SM Active Cycles|Executed Instructions |Registers Per' >>"$out/ncu_summary.txt"
      # per instruction (also readable here from the report: benchmarks/probes/ncu_source_counters.py)
      ncu --import "$out/ncu_$name.ncu-rep" --page source --csv --print-source sass \
        >"$out/ncu_${name}_sass.csv" 2>&1
    done
    timeout 60 compute-sanitizer --tool synccheck --error-exitcode 9 "$out/lora_cluster" --check-only \
      >"$out/synccheck_probe.txt" 2>&1
    record "synccheck lora_cluster --check-only: exit $? ($(grep 'ERROR SUMMARY' "$out/synccheck_probe.txt" | tail -1))"
    rm -f "$out/lora_cluster"
    cat "$out/probe_lora_cluster.txt" "$out/ncu_summary.txt"
    ;;
  racecheck)
    racecheck 0
    ;;
  ab)
    [ -d ab_other ] || { record "ab: no ab_other/ folder"; exit 1; }
    mapfile -t other < <(cd ab_other && find . -type f | sed 's|^\./||')
    for side in this other; do
      if [ "$side" = other ]; then
        for file in "${other[@]}"; do
          mkdir -p "$out/ab_this/$(dirname "$file")" && cp "$file" "$out/ab_this/$file" && cp "ab_other/$file" "$file"
        done
      fi
      build_in_place "$side" || break
      [ "$side" = this ] && lora_tests
      timeout 150 python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-route --caches cold \
        --out "$out/ab-$side" 2>"$out/bench_$side.err" | tee "$out/ab_$side.txt"
      record "LoRA rows ($side): exit ${PIPESTATUS[0]}"
    done
    for file in "${other[@]}"; do
      [ -f "$out/ab_this/$file" ] && cp "$out/ab_this/$file" "$file"
    done
    ;;
  ab-probe)
    [ -d ab_other ] || { record "ab-probe: no ab_other/ folder"; exit 1; }
    other_tree=$(mktemp -d)
    cp -r csrc benchmarks "$other_tree"/ && cp -r ab_other/. "$other_tree"/
    mkdir -p "$out/other"
    compile_probe lora_cluster &
    (cd "$other_tree" && out="$out/other" compile_probe lora_cluster) &
    wait
    rm -rf "$other_tree"
    for side in this other; do
      [ -x "$out/${side/this/.}/lora_cluster" ] || { record "ab-probe: the $side probe did not compile"; exit 1; }
    done
    for turn in 1 2; do
      for side in this other; do
        timeout 60 "$out/${side/this/.}/lora_cluster" --library >"$out/ab_probe_${side}_$turn.txt" 2>&1
        record "probe $side, turn $turn: exit $?: $(grep -E 'library' "$out/ab_probe_${side}_$turn.txt" |
          cut -d'|' -f4,5,7 | tr '\n' ';')"
      done
    done
    rm -f "$out/lora_cluster" "$out/other/lora_cluster"
    build_in_place this && lora_tests
    ;;
  line)
    preferred=csrc/kernels/router_gemm_small_m.cu
    cp "$preferred" "$out/preferred.orig"
    for line in as-is moved; do
      if [ "$line" = moved ]; then
        sed -i 's/return logits <= 1024 \&\& (a.K <= 5120 || a.E < 128);/return logits <= 1024 \&\& a.E < 128;/' "$preferred"
        grep -q 'return logits <= 1024 && a.E < 128;' "$preferred" || { record "line: the rule to move is not there"; break; }
      fi
      build_in_place "$line" || break
      python3 -c "import torch; from gate import tuning; x = torch.zeros(8, 2880, device='cuda', dtype=torch.bfloat16); print('$line: M = 8, E = 128 goes to', tuning.router_gemm_route(x, torch.zeros(128, 2880, device='cuda', dtype=torch.bfloat16)))" | tee -a "$out/routes.txt"
      if [ "$line" = as-is ]; then
        wide_router_rows "$line" --m 5,6,8 --lora-m 5,6,8
      else
        timeout 120 python3 benchmarks/router_gemm.py --only '^$' --no-chain --no-route --caches cold \
          --lora-m 5,6,8 --out "$out/line-$line" 2>"$out/bench_$line.err" | tee "$out/line_$line.txt"
        record "rows ($line): exit ${PIPESTATUS[0]}"
      fi
    done
    cp "$out/preferred.orig" "$preferred"
    ;;
  profile)
    for shape in "32 1" "32 32" "32 128" "128 1" "128 8" "128 32" "128 128"; do
      read -r experts tokens <<<"$shape"
      python3 benchmarks/probes/ncu_router.py --e "$experts" --m "$tokens" --out "$out/ncu" 2>&1 | tee -a "$out/ncu.txt"
      record "ncu E=$experts M=$tokens: exit ${PIPESTATUS[0]}"
    done
    ;;
esac
echo "== summary ($(( $(date +%s) - start ))s)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
tar czf "$final_out/logs_$mode.tgz" -C "$out" .
