#!/usr/bin/env bash
# Run the fault and timing tests N times in a row (default 20) to show they do not flake on a loaded
# machine, then print how many runs passed and the slowest figures seen: the slowest tests (pytest's
# --durations) and the times the tests print (a bridge back after a relay restart, clients' errors
# after a SIGKILL). Extra arguments go to pytest. Each run's log is kept in a folder it names
# (REPEAT_LOGS, default a new one under /tmp).
#
#   bash scripts/repeat-tests.sh            # 20 runs
#   bash scripts/repeat-tests.sh 5 -x       # 5 runs, each stopping at its first failure
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shift || true
logs=${REPEAT_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/repeat-tests.XXXXXX")}
mkdir -p "$logs"
echo "logs in $logs"
tests=(
    tests/test_faults.py
    tests/test_tunnel.py::test_ollama_client_streams_chat_token_by_token
    tests/test_tunnel.py::test_openai_sdk_streams_through_the_relay
    tests/test_tunnel.py::test_ndjson_lines_arrive_as_the_upstream_writes_them
    tests/test_tunnel.py::test_sse_events_arrive_one_by_one
    tests/test_websocket.py::test_server_pushed_messages_arrive_at_once
    tests/test_hostile.py::test_slowloris_and_idle_connections_are_closed_and_others_are_served
    "tests/conformance/test_conformance.py::test_each_chunk_leaves_the_relay_as_it_arrives[python]"
    "tests/conformance/test_conformance.py::test_server_pushed_websocket_messages_arrive_at_once[python]"
    "tests/conformance/test_conformance.py::test_no_bridge_gets_503_with_retry_after_after_the_grace[python]"
    "tests/conformance/test_conformance.py::test_bridge_lost_mid_response_breaks_the_body[python]"
    tests/test_deployment.py::test_ollama_split_and_the_session_deadline
    tests/test_promises.py::test_drain_timeout_running_out_cuts_the_stream_and_the_bridge_exits
    tests/test_promises.py::test_a_second_signal_quits_the_draining_bridge_at_once
)
passed=0
failed=()
for i in $(seq 1 "$runs"); do
    log="$logs/run-$(printf %03d "$i").txt"
    start=$(date +%s)
    if .venv/bin/pytest -q -s -p no:cacheprovider -rfEs --durations=0 "${tests[@]}" "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        verdict=passed
    else
        failed+=("$i")
        verdict="FAILED (see $log)"
    fi
    echo "run $i/$runs: $verdict in $(($(date +%s) - start)) s  (load: $(cut -d' ' -f1-3 /proc/loadavg))"
done
echo
echo "== $passed of $runs runs passed${failed:+; failed: ${failed[*]}}"
echo "== the slowest test phases over all runs (seconds, phase, test):"
grep -hE '^[0-9]+\.[0-9]+s (call|setup|teardown) ' "$logs"/run-*.txt | sort -rn | head -15
echo "== the slowest figures the tests printed:"
for what in "the bridge was back" "every client had its error within"; do
    grep -hoE "$what [0-9.]+ s" "$logs"/run-*.txt | awk -v w="$what" '
        { v = $(NF - 1) + 0; n++; s += v; if (v > m) m = v }
        END { if (n) printf "  %s: max %.2f s, mean %.2f s over %d runs\n", w, m, s / n, n }'
done
[ "$passed" -eq "$runs" ]
