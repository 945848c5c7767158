#!/usr/bin/env bash
# A whole GPU run in one command: the benchmark suite, then the kernel and fast-path tests run
# natively (no Triton interpreter), inside SESSION_S seconds in all (570: under ten minutes); time
# left after it can go to `python3 -m benchmarks tuning` alone (benchmarks/README.md).
#
#   OUT=/some/folder SIT_FAST_GIT_COMMIT=<sha> bash benchmarks/gpu_session.sh
#
# Writes $OUT/results.json, $OUT/results.md, $OUT/log (the suite's output) and $OUT/log_tests.
# Settings (environment; defaults for the GPU):
#   SESSION_S          seconds for the whole script (570)
#   BENCH_ARGS         the suite's arguments, the suites first ("all --device cuda --size full")
#   BENCH_DEADLINE_S   the suite's --deadline-s, seconds of measurements (370)
#   TEST_ARGS          pytest's arguments (quick ones that a timeout must not cut, $QUICK_TESTS: the
#                      CUDA graph tests of sampling, every attention kernel in half precision, and train.py
#                      on the GPU (bf16 resume, device-side skips); then the kernel, fast-path and
#                      upstream-parity test files, in that order), split as the shell
#                      splits words, quotes included: TEST_ARGS="tests/test_kernels.py -k 'layernorm and 72'"
#   TEST_MIN_S         seconds kept back for the tests whatever the suite took (140)
#   TEST_SHARDS        pytest processes run side by side, each on its share of the tests (conftest.py's
#                      SIT_FAST_TEST_SHARD; half the cores, at most 8; 1 runs them in one process). Not
#                      pytest-xdist, though the GPU machine's image has it: the shards deal the costly
#                      tests out first and share Inductor's compile workers out, both tested here.
#   PYTHON             the interpreter (python3), with the requirements and, for the tests, pytest and timm
# Exit status: the suite's, or else the tests'; 124 where a part ran out of time, 75 where the CUDA context
# was lost with no time left for the suites after it.
set -uo pipefail

: "${OUT:?set OUT to the folder for the results}"
SESSION_S=${SESSION_S:-570}
BENCH_ARGS=${BENCH_ARGS:-all --device cuda --size full}
BENCH_DEADLINE_S=${BENCH_DEADLINE_S:-370}
QUICK_TESTS="tests/test_sample.py::test_cuda_graph_forwards_match_eager \
tests/test_sample.py::test_cuda_graph_sde_sampling_matches_eager \
tests/test_transport.py::test_fixed_step_samplers_capture_in_a_cuda_graph \
tests/test_models.py::test_every_attention_backend_in_half_precision_is_attention \
tests/test_train.py::test_a_bf16_run_resumes_as_its_straight_run_on_the_gpu_too \
tests/test_train.py::test_skip_nonfinite_skips_on_the_device_where_the_run_trains"
TEST_ARGS=${TEST_ARGS:-$QUICK_TESTS tests/test_kernels.py tests/test_fast_path.py tests/test_upstream_parity.py}
TEST_MIN_S=${TEST_MIN_S:-140}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

# The suite stops measuring at its deadline; the timeout also covers start-up, the ceilings and one
# compilation that runs over its estimate, and leaves the tests their share.
bench_timeout=$((SESSION_S - TEST_MIN_S))
echo "gpu_session: suite (deadline ${BENCH_DEADLINE_S} s, killed at ${bench_timeout} s), then tests" | tee "$OUT/log"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
        --format=csv 2>&1 | tee -a "$OUT/log"
fi
# A lost CUDA context (an illegal memory access, say) ends the suite with exit 75 and the suites left
# named in $OUT/suites_left: a new process measures them, adding to the same results, in the time left.
bench_args=$BENCH_ARGS
continued=()
deadline_left=$BENCH_DEADLINE_S
deadline_whole=${BENCH_DEADLINE_S%%.*}  # shell arithmetic takes whole seconds
bench_left=$bench_timeout
lost=0
while true; do
    # shellcheck disable=SC2086  # bench_args is a list of words
    timeout -k 10 "$bench_left" "$PYTHON" -m benchmarks $bench_args --deadline-s "$deadline_left" --out "$OUT" \
        "${continued[@]}" 2>&1 | tee -a "$OUT/log"
    bench_status=$?
    if [ "$bench_status" -ne 75 ] || [ ! -s "$OUT/suites_left" ]; then break; fi
    lost=1
    read -r left <"$OUT/suites_left"
    elapsed=$((SECONDS - start))
    deadline_left=$((deadline_whole - elapsed))
    bench_left=$((bench_timeout - elapsed))
    if [ "$deadline_left" -le 0 ] || [ "$bench_left" -le 0 ]; then
        echo "gpu_session: the CUDA context was lost and no time is left for the suites left ($left)" \
            | tee -a "$OUT/log"
        break
    fi
    # shellcheck disable=SC2086
    set -- $BENCH_ARGS
    shift  # the suites: the first word
    bench_args="$left $*"
    continued=(--continue)
    echo "gpu_session: the CUDA context was lost; the suites left ($left) in a new process," \
        "${deadline_left} s of measurements" | tee -a "$OUT/log"
done
# The suite that lost the device recorded errors: the run as a whole failed, though the others measured.
if [ "$lost" -eq 1 ] && [ "$bench_status" -eq 0 ]; then bench_status=1; fi

test_timeout=$((SESSION_S - (SECONDS - start)))
eval "test_args=($TEST_ARGS)"  # quotes group words, as on a command line (-k 'a and b')
# Side-by-side processes compile the kernels' Triton variants in parallel: most of the tests' time.
shards=${TEST_SHARDS:-$(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))}
if [ "$shards" -lt 1 ]; then shards=1; fi
if [ "$shards" -eq 1 ]; then
    echo "gpu_session: tests (killed at ${test_timeout} s): pytest $TEST_ARGS" | tee "$OUT/log_tests"
    # -v: a line per test as it ends, so a run the timeout stops still says which tests passed and failed
    timeout -k 10 "$test_timeout" "$PYTHON" -m pytest -v -rfE "${test_args[@]}" 2>&1 \
        | tee -a "$OUT/log_tests"
    test_status=$?
else
    echo "gpu_session: tests (killed at ${test_timeout} s) in ${shards} shards side by side" \
        "(SIT_FAST_TEST_SHARD, conftest.py): pytest $TEST_ARGS" | tee "$OUT/log_tests"
    pids=()
    threads=$(( $(nproc) / shards > 1 ? $(nproc) / shards : 1 ))  # Inductor's compile workers: the cores shared out
    for ((i = 0; i < shards; i++)); do
        SIT_FAST_TEST_SHARD="$i/$shards" TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$threads} \
            timeout -k 10 "$test_timeout" "$PYTHON" -m pytest -v -rfE "${test_args[@]}" \
            >"$OUT/log_tests.$i" 2>&1 &
        pids+=($!)
    done
    test_status=0
    for ((i = 0; i < shards; i++)); do
        wait "${pids[$i]}"
        status=$?
        if [ "$status" -eq 5 ]; then status=0; fi  # pytest's "no tests collected": a shard left empty
        # A timeout (124) outranks a failure: it says the results are incomplete.
        if [ "$status" -ne 0 ] && { [ "$test_status" -eq 0 ] || [ "$status" -eq 124 ]; }; then
            test_status=$status
        fi
        echo "gpu_session: shard $i/$shards exit $status: $(tail -n 1 "$OUT/log_tests.$i")" | tee -a "$OUT/log_tests"
    done
    grep -h -E "^(FAILED|ERROR) " "$OUT"/log_tests.* | tee -a "$OUT/log_tests"
    totals=$(for ((i = 0; i < shards; i++)); do tail -n 1 "$OUT/log_tests.$i"; done \
        | grep -oE "[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)" \
        | awk '{n[$2] += $1} END {for (k in n) printf "%s%d %s", (c++ ? ", " : ""), n[k], k}')
    echo "gpu_session: the shards' tests together: ${totals:-none counted}" | tee -a "$OUT/log_tests"
    for ((i = 0; i < shards; i++)); do
        { echo "=== shard $i/$shards"; cat "$OUT/log_tests.$i"; } >>"$OUT/log_tests" && rm -f "$OUT/log_tests.$i"
    done
fi

echo "gpu_session: suite exit ${bench_status}, tests exit ${test_status}, $((SECONDS - start)) s in all" \
    | tee -a "$OUT/log_tests"
if [ "$bench_status" -ne 0 ]; then exit "$bench_status"; fi
exit "$test_status"
