#!/usr/bin/env bash
# vllmd's smoke test on a real NVIDIA host: what the project's own (GPU-less) machines cannot
# check. It installs nothing. It starts `vllmd serve` with two small hub models on GPU 0 under a
# device budget that fits one reservation (plus a sleeper's residue) but never two, drives
# evictions, sleeps and wakes with ordinary requests, and prints one PASS/FAIL line per check
# with the measured figures and the expectation.
#
# Needs: vllmd (on PATH, or $VLLMD), the vLLM engine it starts ("vllm serve" by default),
# nvidia-smi, curl, python3 (JSON and /metrics parsing), network access to the HF hub (or the
# models in its cache). Takes ~5-10 minutes; GPU 0 should be otherwise idle.
#
# Exit status: 0 every check passed, 1 a check failed (or the host lacks something), 2 usage.

set -uo pipefail

PROG=${0##*/}

usage() {
    cat <<EOF
Usage: $PROG [--dry-run] [options]

Options (each also read from the environment variable shown):
  --dry-run               print the plan and the config, then exit (no GPU, vllmd or network)
  --model-a ID            first model (SMOKE_MODEL_A, default Qwen/Qwen2.5-0.5B-Instruct)
  --model-b ID            second model (SMOKE_MODEL_B, default HuggingFaceTB/SmolLM2-360M-Instruct)
  --reservation SIZE      memory per model, in MiB or GiB (SMOKE_RESERVATION, default 6GiB)
  --max-model-len N       (SMOKE_MAX_MODEL_LEN, default 2048)
  --engine "CMD ARGS"     the engine command (SMOKE_ENGINE, default "vllm serve")
  --port N                gateway port on 127.0.0.1 (SMOKE_PORT, default 18321)
  --workdir DIR           config, state and logs (SMOKE_WORKDIR, default a new temp dir)
  -h, --help              this text

Environment: VLLMD (the vllmd command, default "vllmd"), PYTHON (default python3),
SMOKE_IDLE_WAIT (seconds between phases, default 31: vllmd never evicts a model used in the
last 30 s), SMOKE_REQUEST_TIMEOUT (seconds, default 1800).
EOF
}

usage_error() {
    printf '%s: %s\n' "$PROG" "$1" >&2
    printf 'Try %s --help\n' "$PROG" >&2
    exit 2
}

MODEL_A=${SMOKE_MODEL_A:-Qwen/Qwen2.5-0.5B-Instruct}
MODEL_B=${SMOKE_MODEL_B:-HuggingFaceTB/SmolLM2-360M-Instruct}
RESERVATION=${SMOKE_RESERVATION:-6GiB}
MAX_MODEL_LEN=${SMOKE_MAX_MODEL_LEN:-2048}
ENGINE=${SMOKE_ENGINE:-vllm serve}
PORT=${SMOKE_PORT:-18321}
WORK=${SMOKE_WORKDIR:-}
IDLE_WAIT=${SMOKE_IDLE_WAIT:-31}
REQUEST_TIMEOUT=${SMOKE_REQUEST_TIMEOUT:-1800}
VLLMD=${VLLMD:-vllmd}
PYTHON=${PYTHON:-python3}
DRY_RUN=0

while (($#)); do
    if [[ $1 == --*=* ]]; then # --option=value
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
    fi
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        --model-a | --model-b | --reservation | --max-model-len | --engine | --port | --workdir)
            (($# >= 2)) || usage_error "$1 needs a value"
            case $1 in
                --model-a) MODEL_A=$2 ;;
                --model-b) MODEL_B=$2 ;;
                --reservation) RESERVATION=$2 ;;
                --max-model-len) MAX_MODEL_LEN=$2 ;;
                --engine) ENGINE=$2 ;;
                --port) PORT=$2 ;;
                --workdir) WORK=$2 ;;
            esac
            shift
            ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done

# --- the plan's figures (integer MiB) --------------------------------------------------------

if [[ $RESERVATION =~ ^([0-9]+)GiB$ ]]; then
    R_MIB=$((BASH_REMATCH[1] * 1024))
elif [[ $RESERVATION =~ ^([0-9]+)MiB$ ]]; then
    R_MIB=${BASH_REMATCH[1]}
else
    usage_error "--reservation: \"$RESERVATION\" is not a size in MiB or GiB (e.g. 6GiB)"
fi
((R_MIB >= 1024)) || usage_error "--reservation: at least 1024MiB"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
    usage_error "--port: \"$PORT\" is not a port"
fi
[[ $MAX_MODEL_LEN =~ ^[1-9][0-9]*$ ]] || usage_error "--max-model-len: not a number"
[[ $IDLE_WAIT =~ ^[0-9]+$ ]] || usage_error "SMOKE_IDLE_WAIT: not a number of seconds"
[[ $REQUEST_TIMEOUT =~ ^[1-9][0-9]*$ ]] || usage_error "SMOKE_REQUEST_TIMEOUT: not a number"
[[ -n $MODEL_A && -n $MODEL_B ]] || usage_error "model ids must not be empty"
read -r -a ENGINE_ARGV <<<"$ENGINE"
((${#ENGINE_ARGV[@]})) || usage_error "--engine: empty"
read -r -a VLLMD_ARGV <<<"$VLLMD"
((${#VLLMD_ARGV[@]})) || usage_error "VLLMD: empty"

HEADROOM_MIB=1024
RESIDUE_MIB=$((R_MIB / 4))                        # what vllmd assumes until it measures one
BUDGET_MIB=$((HEADROOM_MIB + R_MIB + R_MIB / 2)) # one model + a sleeper, never two models
# R is the engine's whole footprint (its CUDA context included): over it by more than 64 MiB
# is over-reservation (docs/design.md "Memory accounting").
FOOTPRINT_LIMIT_MIB=$((R_MIB + 64))
# Both sleep levels free the same GPU memory (level 1 first copies the weights to host RAM):
# one limit for either residue.
RESIDUE_LIMIT_MIB=$((R_MIB * 25 / 100))
FREE_TOLERANCE_MIB=1024
STOP_WAIT=300

toml_string() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

toml_array() {
    local out="" word
    for word in "$@"; do
        out+="${out:+, }$(toml_string "$word")"
    done
    printf '[%s]' "$out"
}

model_table() { # NAME MODEL SLEEP_LEVEL COMMENT
    cat <<EOF

[models.$1]                     # $4
model = $(toml_string "$2")
devices = ["0"]
memory = "${R_MIB}MiB"
max_model_len = $MAX_MODEL_LEN
sleep_level = $3
EOF
}

config_text() {
    cat <<EOF
# Written by contrib/gpu-smoke.sh. Relative paths resolve against this file's directory.
[daemon]
state_dir = "state"
control_socket = "control.sock"
log_level = "info"

[gateway]
listen = "127.0.0.1:$PORT"
queue_timeout = "30m"

[engine]
command = $(toml_array "${ENGINE_ARGV[@]}")
startup_timeout = "20m"

[scheduler]
headroom = "${HEADROOM_MIB}MiB"
min_residency = "0s"
evict_to = "sleep"
sleep_residue = "${RESIDUE_MIB}MiB"

[devices."0"]                      # a budget on GPU 0: one reservation + a residue, not two
memory = "${BUDGET_MIB}MiB"
EOF
    model_table smoke-a0 "$MODEL_A" 0 "model A, never sleeps: its eviction stops it"
    model_table smoke-a "$MODEL_A" 1 "model A, sleeps at level 1"
    model_table smoke-b "$MODEL_B" 2 "model B, sleeps at level 2"
}

print_plan() {
    cat <<EOF
vllmd GPU smoke test on GPU 0
  model A: $MODEL_A
  model B: $MODEL_B
  reservation R = ${R_MIB} MiB per model; device "0" budget = headroom ${HEADROOM_MIB} + R + R/2 = ${BUDGET_MIB} MiB
  vllmd: ${VLLMD_ARGV[*]}; engine: ${ENGINE_ARGV[*]}; gateway 127.0.0.1:$PORT
Phases (${IDLE_WAIT} s idle between them: vllmd never evicts a model used in the last 30 s):
  0. baseline: GPU 0 free memory before vllmd starts; vllmd check-config; vllmd serve.
  1. cold start: a request to smoke-a0 (A) starts it.
     expect: footprint <= R + 64 MiB (${FOOTPRINT_LIMIT_MIB} MiB); the learned overhead is printed
  2. eviction by stop: a request to smoke-a (A) evicts smoke-a0 (sleep_level 0: stopped).
     expect: smoke-a0 stopped, none of its processes left, GPU free within ${FREE_TOLERANCE_MIB} MiB
     of the baseline once smoke-a's own use is counted; smoke-a footprint <= R + 64 MiB
  3. sleep level 1: a request to smoke-b (B) puts smoke-a to sleep.
     expect: smoke-a sleeping, residue <= 25 % of R (${RESIDUE_LIMIT_MIB} MiB); smoke-b footprint <= R + 64 MiB
  4. wake: a request to smoke-a wakes it; smoke-b sleeps at level 2.
     expect: wake <= 1/3 of smoke-a's cold start (phase 2); smoke-b residue <= 25 % of R (${RESIDUE_LIMIT_MIB} MiB)
  5. wake from level 2: a request to smoke-b is answered (smoke-a sleeps again).
  6. stop: SIGTERM to vllmd.
     expect: exit 0 within ${STOP_WAIT} s, no engine process left (on GPU 0 or anywhere),
     GPU free back within ${FREE_TOLERANCE_MIB} MiB of the baseline
Footprints and residues: the engine's processes in nvidia-smi --query-compute-apps (its process
group), else vllmd's own measurement. Times: vllmd_model_load_duration_seconds and
vllmd_model_wake_duration_seconds when /metrics has both, else the requests' own durations.
EOF
}

if ((DRY_RUN)); then
    print_plan
    echo
    echo "----- config (vllmd.toml) -----"
    config_text
    echo "----- end of config -----"
    exit 0
fi

# --- checks and measurements -------------------------------------------------------------------

PASSES=0
FAILS=0
pass() {
    printf 'PASS %s: %s\n' "$1" "$2"
    PASSES=$((PASSES + 1))
}
fail() {
    printf 'FAIL %s: %s\n' "$1" "$2"
    FAILS=$((FAILS + 1))
}
info() { printf 'INFO %s\n' "$*"; }

# check NAME CONDITION-STATUS MESSAGE: PASS when the preceding test succeeded
verdict() {
    if (($2 == 0)); then pass "$1" "$3"; else fail "$1" "$3"; fi
}

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f %%", 100 * a / b }'; }
bytes_to_mib() { awk -v b="$1" 'BEGIN { printf "%d", b / 1048576 }'; }
float_le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }

gpu_query() { nvidia-smi -i 0 --query-gpu="$1" --format=csv,noheader,nounits | tr -d ' '; }
gpu_free_mib() { gpu_query memory.free; }

# pid used_mib of every compute process on GPU 0, one per line
gpu_apps() {
    local uuid pid used
    nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits \
        2>/dev/null | while IFS=', ' read -r uuid pid used; do
        [[ $uuid == "$GPU_UUID" ]] && printf '%s %s\n' "$pid" "$used"
    done
}

# MiB that the processes of process group $1 (an engine's) use on GPU 0; empty when nvidia-smi
# does not say (per-process figures N/A, or pids from another pid namespace).
engine_gpu_mib() {
    local pgid=$1 total=0 found=0 pid used group
    while read -r pid used; do
        group=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
        [[ $group == "$pgid" ]] || continue
        [[ $used =~ ^[0-9]+$ ]] || return 0
        total=$((total + used))
        found=1
    done < <(gpu_apps)
    ((found)) && echo "$total"
    return 0
}

api() { curl -sS --max-time 10 "http://127.0.0.1:$PORT$1"; }

# model_field NAME PATH: a field of GET /v1/models/NAME's "vllmd" object ("a.b" for nested)
model_field() {
    api "/v1/models/$1" | "$PYTHON" -c '
import json, sys
value = json.load(sys.stdin)["vllmd"]
for key in sys.argv[1].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
' "$2" 2>/dev/null
}

# metric NAME MODEL: the sample NAME{model="MODEL",...} of vllmd's /metrics, empty if absent
metric() {
    api /metrics | "$PYTHON" -c '
import re, sys
name, label = sys.argv[1], "model=\"%s\"" % sys.argv[2]
for line in sys.stdin:
    m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\} (\S+)", line)
    if m and m.group(1) == name and label in m.group(2):
        print(float(m.group(3)))
        break
' "$1" "$2" 2>/dev/null
}

ENGINE_GROUPS=()
remember_engine() { # MODEL: note its engine's process group (= its pid: vllmd gives each a session)
    local pid
    pid=$(model_field "$1" pid)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    [[ " ${ENGINE_GROUPS[*]} " == *" $pid "* ]] || ENGINE_GROUPS+=("$pid")
    echo "$pid"
}

# request MODEL: one completion through the gateway; prints its seconds; fails unless 200
request() {
    local out code seconds
    out=$(curl -sS -o "$WORK/response-$1.json" -w '%{http_code} %{time_total}' \
        --max-time "$REQUEST_TIMEOUT" -H 'content-type: application/json' \
        -d "{\"model\": \"$1\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8}" \
        "http://127.0.0.1:$PORT/v1/completions") || return 1
    read -r code seconds <<<"$out"
    [[ $code == 200 ]] || return 1
    echo "$seconds"
}

# engine_use MODEL: "MIB SOURCE" of the model's engine now (nvidia-smi, else vllmd's figure)
engine_use() {
    local pid used measured
    pid=$(remember_engine "$1")
    if [[ -n $pid ]]; then
        used=$(engine_gpu_mib "$pid")
        [[ -n $used ]] && {
            echo "$used nvidia-smi"
            return
        }
    fi
    if [[ $(model_field "$1" state) == sleeping ]]; then
        measured=$(model_field "$1" reserved_bytes.0) # held while asleep = the measured residue
        [[ -n $measured ]] && echo "$(bytes_to_mib "$measured") vllmd-held-residue"
        return
    fi
    measured=$(metric vllmd_model_memory_used_bytes "$1")
    [[ -n $measured ]] && echo "$(bytes_to_mib "$measured") vllmd_model_memory_used_bytes"
}

# learned_overhead NAME: what NAME's last start allocated beyond vLLM's fraction (its CUDA
# context, NCCL): the `measured` event's overhead_bytes, from the control socket
learned_overhead() {
    curl -sS --max-time 10 --unix-socket "$WORK/control.sock" "http://vllmd/v1/events?limit=1000" |
        "$PYTHON" -c '
import json, sys
found = [e for e in json.load(sys.stdin)["events"]
         if e.get("kind") == "measured" and e.get("model") == sys.argv[1]]
print(found[-1].get("overhead_bytes", "unknown") if found else "unknown")
' "$1" 2>/dev/null
}

check_at_most() { # CHECK MODEL LIMIT_MIB WHAT
    local use mib source
    use=$(engine_use "$2")
    if [[ -z $use ]]; then
        fail "$1" "$2: no measurement of its $4 (neither nvidia-smi nor vllmd)"
        return
    fi
    read -r mib source <<<"$use"
    ((mib <= $3))
    verdict "$1" $? "$2 $4 $mib MiB = $(pct "$mib" "$R_MIB") of R ($source); expected <= $3 MiB"
}

check_state() { # CHECK MODEL STATE
    local state
    state=$(model_field "$2" state)
    [[ $state == "$3" ]]
    verdict "$1" $? "$2 is ${state:-unknown}; expected $3"
}

phase_request() { # CHECK MODEL: the request of a phase; aborts the run when it fails
    local seconds
    if seconds=$(request "$2"); then
        pass "$1" "$2 answered in $seconds s"
        echo "$seconds" >"$WORK/seconds-$1"
        remember_engine "$2" >/dev/null
        return 0
    fi
    fail "$1" "$2 did not answer 200 (see $WORK/response-$2.json and $WORK/vllmd.log)"
    return 1
}

idle() {
    info "waiting ${IDLE_WAIT} s so that the models just used may be evicted"
    sleep "$IDLE_WAIT"
}

# --- the run ---------------------------------------------------------------------------------

VLLMD_PID=""
STOP_STATUS=""
stop_vllmd() { # SIGTERM, wait up to $1 s; sets STOP_STATUS to the exit status (or "timeout").
    # Not in a $( ) subshell: only this shell can reap its child.
    local waited=0
    kill -TERM "$VLLMD_PID" 2>/dev/null
    while kill -0 "$VLLMD_PID" 2>/dev/null && ((waited < $1)); do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$VLLMD_PID" 2>/dev/null; then
        STOP_STATUS=timeout
        return
    fi
    wait "$VLLMD_PID"
    STOP_STATUS=$?
    VLLMD_PID=""
}

cleanup() {
    if [[ -n $VLLMD_PID ]] && kill -0 "$VLLMD_PID" 2>/dev/null; then
        info "stopping vllmd (pid $VLLMD_PID)"
        stop_vllmd 60
        if [[ $STOP_STATUS == timeout ]]; then
            kill -KILL "$VLLMD_PID" 2>/dev/null
            info "vllmd killed; engine process groups that may be left: ${ENGINE_GROUPS[*]:-none}"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

print_plan
echo

missing=()
for tool in nvidia-smi curl ps awk "$PYTHON" "${VLLMD_ARGV[0]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    fail preflight "not found: ${missing[*]} (this script installs nothing)"
    exit 1
fi
if ! GPU_UUID=$(gpu_query uuid) || [[ -z $GPU_UUID ]]; then
    fail preflight "nvidia-smi cannot read GPU 0"
    exit 1
fi
if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/vllmd-gpu-smoke.XXXXXX") || exit 1
fi
mkdir -p "$WORK" || exit 1
WORK=$(cd "$WORK" && pwd)
CONFIG=$WORK/vllmd.toml
config_text >"$CONFIG"
info "config, state and logs in $WORK"

BASE_FREE=$(gpu_free_mib)
GPU_TOTAL=$(gpu_query memory.total)
BASE_APPS=$(gpu_apps | awk '{ print $1 }' | sort)
info "GPU 0 $GPU_UUID: total $GPU_TOTAL MiB, free $BASE_FREE MiB before vllmd"
[[ -z $BASE_APPS ]] || info "GPU 0 already runs compute processes ($(echo "$BASE_APPS" | tr '\n' ' ')): figures may be off"
((BASE_FREE >= BUDGET_MIB))
verdict preflight $? "GPU 0 free $BASE_FREE MiB; the plan needs $BUDGET_MIB MiB"
((FAILS == 0)) || exit 1

if check_out=$("${VLLMD_ARGV[@]}" check-config "$CONFIG" 2>&1); then
    pass check-config "$check_out"
else
    fail check-config "$(echo "$check_out" | tr '\n' ' ')"
    exit 1
fi

"${VLLMD_ARGV[@]}" serve --config "$CONFIG" --log-format json >"$WORK/vllmd.log" 2>&1 &
VLLMD_PID=$!
for _ in $(seq 120); do
    api /health >/dev/null 2>&1 && break
    kill -0 "$VLLMD_PID" 2>/dev/null || break
    sleep 0.5
done
if api /health >/dev/null 2>&1; then
    pass serve "vllmd (pid $VLLMD_PID) answers /health"
else
    fail serve "vllmd did not answer /health within 60 s (see $WORK/vllmd.log)"
    exit 1
fi

run_phases() {
    # 1. cold start
    phase_request cold-start smoke-a0 || return
    check_at_most footprint-a0 smoke-a0 "$FOOTPRINT_LIMIT_MIB" footprint
    printf 'INFO overhead-a0: smoke-a0 allocated %s bytes per GPU beyond its fraction (learned)\n' \
        "$(learned_overhead smoke-a0)"
    local a0_group
    a0_group=$(remember_engine smoke-a0)
    idle

    # 2. eviction by stop
    phase_request evict-stop smoke-a || return
    check_state evicted-state smoke-a0 stopped
    local left=""
    [[ -n $a0_group ]] && left=$(ps -o pid= -g "$a0_group" 2>/dev/null | tr -s ' \n' ' ')
    [[ -n $a0_group && -z ${left// /} ]]
    verdict evicted-processes $? "smoke-a0's process group ${a0_group:-unknown}: ${left:-no process left}"
    local free use mib source unaccounted
    free=$(gpu_free_mib)
    use=$(engine_use smoke-a)
    if [[ -n $use ]]; then
        read -r mib source <<<"$use"
        unaccounted=$((BASE_FREE - free - mib))
        ((unaccounted <= FREE_TOLERANCE_MIB))
        verdict eviction-frees $? "GPU free $free MiB + smoke-a's $mib MiB ($source) = baseline $BASE_FREE MiB - $unaccounted MiB; expected within $FREE_TOLERANCE_MIB MiB"
    else
        fail eviction-frees "no measurement of smoke-a's use"
    fi
    check_at_most footprint-a smoke-a "$FOOTPRINT_LIMIT_MIB" footprint
    idle

    # 3. sleep level 1
    phase_request sleep-1 smoke-b || return
    check_state sleep-1-state smoke-a sleeping
    check_at_most residue-1 smoke-a "$RESIDUE_LIMIT_MIB" "level-1 residue"
    check_at_most footprint-b smoke-b "$FOOTPRINT_LIMIT_MIB" footprint
    idle

    # 4. wake from level 1; smoke-b to level 2
    phase_request wake-1 smoke-a || return
    check_state sleep-2-state smoke-b sleeping
    check_at_most residue-2 smoke-b "$RESIDUE_LIMIT_MIB" "level-2 residue"
    local cold wake how load_sum wake_sum
    load_sum=$(metric vllmd_model_load_duration_seconds_sum smoke-a)
    wake_sum=$(metric vllmd_model_wake_duration_seconds_sum smoke-a)
    if [[ -n $load_sum && -n $wake_sum ]]; then
        cold=$load_sum wake=$wake_sum how="vllmd's load/wake duration metrics"
    else
        cold=$(cat "$WORK/seconds-evict-stop") wake=$(cat "$WORK/seconds-wake-1")
        how="request durations (vllmd_model_wake_duration_seconds not exported)"
    fi
    float_le "$wake" "$(awk -v c="$cold" 'BEGIN { print c / 3 }')"
    verdict wake-time $? "smoke-a woke in $wake s vs a cold start of $cold s ($how); expected <= 1/3"
    idle

    # 5. wake from level 2
    phase_request wake-2 smoke-b || return
    info "smoke-b's level-2 wake took $(cat "$WORK/seconds-wake-2") s (cold start: $(cat "$WORK/seconds-sleep-1") s)"
    check_state sleep-1-again smoke-a sleeping
}

run_phases

# 6. stop
stop_vllmd "$STOP_WAIT"
[[ $STOP_STATUS == 0 ]]
verdict stop $? "vllmd exited with status $STOP_STATUS after SIGTERM; expected 0 within $STOP_WAIT s"
if [[ $STOP_STATUS == timeout ]]; then
    exit 1 # the EXIT trap stops it the hard way
fi
sleep 2 # let the driver release the last contexts
left=""
for group in "${ENGINE_GROUPS[@]}"; do
    pids=$(ps -o pid= -g "$group" 2>/dev/null | tr -s ' \n' ' ')
    [[ -z ${pids// /} ]] || left+=" group $group:$pids"
done
[[ -z $left ]]
verdict no-engine-left $? "engine process groups (${ENGINE_GROUPS[*]:-none}): ${left:-all gone}"
new_apps=$(comm -13 <(echo "$BASE_APPS") <(gpu_apps | awk '{ print $1 }' | sort) | tr '\n' ' ')
[[ -z ${new_apps// /} ]]
verdict gpu-clear $? "compute processes on GPU 0 that were not there before: ${new_apps:-none}"
free=$(gpu_free_mib)
((BASE_FREE - free <= FREE_TOLERANCE_MIB))
verdict memory-back $? "GPU free $free MiB vs $BASE_FREE MiB before; expected within $FREE_TOLERANCE_MIB MiB"

echo
printf '%d PASS, %d FAIL (logs: %s)\n' "$PASSES" "$FAILS" "$WORK"
((FAILS == 0))
