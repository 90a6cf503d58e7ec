# Shared by the GPU check scripts (sourced): step/skip/sanitize record each step's exit
# status and duration; the whole check stays inside BUDGET seconds (default 450): a step
# gets at most what is left, and is skipped ("budget") when under 10 s are left.
T0=$(date +%s)
BUDGET="${BUDGET:-450}"
NAMES=()
CODES=()
SECS=()

# step NAME TIMEOUT_SECONDS LOGFILE CMD...: run CMD (output to the terminal and LOGFILE),
# killed after TIMEOUT_SECONDS or what is left of BUDGET (exit 124), and record its
# exit status and duration.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < 10 )); then
        skip "$name" "budget (${BUDGET}s) spent"
        return
    fi
    (( limit > left )) && limit=$left
    echo
    echo "=== [$name] $* (limit ${limit}s, log $log)"
    local t
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    NAMES+=("$name")
    CODES+=("$rc")
    SECS+=("$(( $(date +%s) - t ))")
    echo "=== [$name] exit $rc"
}

# sanitize NAME TOOL TIMEOUT_SECONDS LOGFILE CMD...: step NAME running CMD under
# compute-sanitizer --tool TOOL (exit 9 on an error it finds), or skip it without one.
sanitize() {
    local name=$1 tool=$2 limit=$3 log=$4
    shift 4
    if command -v compute-sanitizer >/dev/null 2>&1; then
        step "$name" "$limit" "$log" compute-sanitizer --tool "$tool" --error-exitcode 9 "$@"
    else
        skip "$name" "compute-sanitizer not on PATH"
    fi
}

skip() {  # skip NAME WHY
    echo
    echo "=== [$1] skipped: $2"
    NAMES+=("$1")
    CODES+=("skip")
    SECS+=("0")
}

summary() {  # the table of steps; sets FAILED
    echo
    echo "=== summary: commit $COMMIT, $(( $(date +%s) - T0 )) s in all, logs in $OUT"
    printf '%-26s %6s %6s\n' step exit secs
    FAILED=0
    for i in "${!NAMES[@]}"; do
        printf '%-26s %6s %6s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"
        case "${CODES[$i]}" in 0|skip) ;; *) FAILED=1 ;; esac
    done
}
