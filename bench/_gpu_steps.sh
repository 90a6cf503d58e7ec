# Shared by the GPU check scripts (sourced): step/skip record each step's exit status
# and duration; summary prints them and sets FAILED.
T0=$(date +%s)
NAMES=()
CODES=()
SECS=()

# step NAME TIMEOUT_SECONDS LOGFILE CMD...: run CMD (output to the terminal and LOGFILE),
# killed after TIMEOUT_SECONDS (exit 124), and record its exit status and duration.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
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
