# shellcheck shell=bash
# shellcheck disable=SC2034  # the MP_* globals set here are read by the scripts that source this file
# launch/common.sh: sourced by every launch script (deepspeed.sh, torchrun.sh,
# mpirun.sh, slurm.sbatch); never run on its own.
#
# Owns what the launchers share: the launcher flags (parsed anywhere before a
# `--`; every other argument goes to `python -m mpomoe_ds.cli.train`), CPU mode,
# the pre-flight checks, and printing then exec'ing the exact command line.
#
# Pre-flight checks, cheapest first; each failure is one line on stderr,
# "mpomoe-launch: <problem>: <fix>", and exit status 1:
#   - the launcher binary is on PATH (deepspeed, torchrun, mpirun, srun, pdsh);
#   - the hostfile exists and every host line reads "<host> slots=<n>";
#   - the master (MASTER_ADDR:MASTER_PORT) resolves; single-node launches and
#     the node that hosts the rendezvous refuse a master that is not an address
#     of this machine (decided from local addresses only: no packet is sent),
#     and check the port is free; a remote master is probed with one TCP
#     connect from bash (/dev/tcp, MPOMOE_PROBE_TIMEOUT seconds, default 5):
#     "connection refused" means the host answers, a timeout or "no route" that
#     it is unreachable;
#   - the world size fits the MoE layout: num_experts % ep_size == 0 and
#     world % ep_size == 0 (ep_size 0 = auto always fits). The values come from
#     moe.num_experts= / moe.ep_size= overrides on the command line, else from
#     `python -m mpomoe_ds.cli.train --print_config <your args>` (a few seconds;
#     it also rejects a bad run config before any rank starts).
#
# Naming: mp_* functions and MP_* globals belong to this file; the scripts
# set MP_SCRIPT, MP_OPTIONS (the script-specific flags they accept) and fill
# MP_CMD before calling mp_exec.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    printf 'mpomoe-launch: bash %s is too old: run with bash 4.4 or newer (macOS: brew install bash)\n' "$BASH_VERSION" >&2
    exit 1
fi

MP_DEFAULT_PORT=29500

# --------------------------------------------------------------------------- messages

mp_die() {  # mp_die "problem: fix" -- one line, exit 1
    printf 'mpomoe-launch: %s\n' "$*" >&2
    exit 1
}

mp_note() {
    printf 'mpomoe-launch: %s\n' "$*" >&2
}

mp_usage() {  # the leading comment block of the calling script, without '# '
    awk 'NR == 1 { next } !/^#/ { exit } /^# shellcheck / || /^#SBATCH/ { next } { sub(/^# ?/, ""); print }' "$0"
}

# --------------------------------------------------------------------------- arguments

# Flags every script takes; a script adds its own names to MP_OPTIONS.
MP_COMMON_OPTIONS="cpu nproc master_port launcher_arg dry_run no_config_check no_master_check help"

mp_parse_args() {  # mp_parse_args "$@": sets MP_* from flags, MP_TRAIN_ARGS from the rest
    MP_CPU=${MPOMOE_CPU:-0}
    MP_NPROC=""
    MP_HOSTFILE=""
    MP_NNODES=1
    MP_NODE_RANK=""
    MP_FLAVOUR=${MPOMOE_MPI_FLAVOUR:-}
    MP_MASTER_ADDR=${MASTER_ADDR:-}
    MP_MASTER_PORT=${MASTER_PORT:-$MP_DEFAULT_PORT}
    MP_DRY_RUN=${MPOMOE_DRY_RUN:-0}
    MP_CHECK_CONFIG=1
    MP_CHECK_MASTER=1
    MP_LAUNCHER_ARGS=()
    MP_TRAIN_ARGS=()
    local arg name value takes_value
    while (($#)); do
        arg=$1
        shift
        if [[ $arg == -- ]]; then
            MP_TRAIN_ARGS+=("$@")
            break
        fi
        [[ $arg == -h ]] && arg=--help
        if [[ $arg != --* ]]; then
            MP_TRAIN_ARGS+=("$arg")
            continue
        fi
        name=${arg#--}
        name=${name%%=*}
        if ! mp_is_option "$name"; then  # a training flag (--config, --deepspeed_config, ...)
            MP_TRAIN_ARGS+=("$arg")
            continue
        fi
        case $name in
            cpu | dry_run | no_config_check | no_master_check | help) takes_value=0 ;;
            *) takes_value=1 ;;
        esac
        if ((takes_value)); then
            if [[ $arg == *=* ]]; then
                value=${arg#*=}
            elif (($#)); then
                value=$1
                shift
            else
                mp_die "--$name needs a value: see $MP_SCRIPT --help"
            fi
        fi
        case $name in
            help) mp_usage; exit 0 ;;
            cpu) MP_CPU=1 ;;
            dry_run) MP_DRY_RUN=1 ;;
            no_config_check) MP_CHECK_CONFIG=0 ;;
            no_master_check) MP_CHECK_MASTER=0 ;;
            nproc) MP_NPROC=$(mp_positive_int "$value" --nproc) || exit 1 ;;
            nnodes) MP_NNODES=$(mp_positive_int "$value" --nnodes) || exit 1 ;;
            node_rank) MP_NODE_RANK=$(mp_nonnegative_int "$value" --node_rank) || exit 1 ;;
            master_port) MP_MASTER_PORT=$(mp_positive_int "$value" --master_port) || exit 1 ;;
            master_addr) MP_MASTER_ADDR=$value ;;
            hostfile) MP_HOSTFILE=$value ;;
            flavour) MP_FLAVOUR=$value ;;
            launcher_arg) MP_LAUNCHER_ARGS+=("$value") ;;
        esac
    done
    case ${MP_CPU,,} in 1 | true | yes | on) MP_CPU=1 ;; *) MP_CPU=0 ;; esac
    case ${MP_DRY_RUN,,} in 1 | true | yes | on) MP_DRY_RUN=1 ;; *) MP_DRY_RUN=0 ;; esac
}

mp_is_option() {
    local option
    for option in $MP_COMMON_OPTIONS $MP_OPTIONS; do
        [[ $1 == "$option" ]] && return 0
    done
    return 1
}

mp_positive_int() {  # mp_positive_int VALUE FLAG -> VALUE, or dies
    if ! [[ $1 =~ ^[0-9]+$ ]] || ((10#$1 == 0)); then
        mp_die "$2 must be a positive integer, got '$1'"
    fi
    printf '%s\n' "$((10#$1))"
}

mp_nonnegative_int() {
    [[ $1 =~ ^[0-9]+$ ]] || mp_die "$2 must be an integer >= 0, got '$1'"
    printf '%s\n' "$((10#$1))"
}

mp_train_override() {  # mp_train_override moe.ep_size -> the last value given on the command line
    local arg value=""
    for arg in "${MP_TRAIN_ARGS[@]}"; do
        [[ $arg == "$1="* ]] && value=${arg#*=}
    done
    printf '%s\n' "$value"
}

# --------------------------------------------------------------------------- environment

MP_ENV_SET=()  # NAME=value pairs this script exported: printed in front of the command

mp_export() {  # mp_export NAME VALUE
    export "$1=$2"
    MP_ENV_SET+=("$1=$2")
}

mp_setup_device() {  # CPU mode: DeepSpeed's CPU accelerator (gloo), one OpenMP thread per core share
    ((MP_CPU)) || return 0
    mp_export DS_ACCELERATOR cpu
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        local cores ranks=${1:-1} threads
        cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
        threads=$((cores / ranks))
        mp_export OMP_NUM_THREADS "$((threads > 0 ? threads : 1))"
    fi
}

mp_python() {  # the Python that runs the trainer: MPOMOE_PYTHON, else python3, else python
    if [[ -n ${MPOMOE_PYTHON:-} ]]; then
        printf '%s\n' "$MPOMOE_PYTHON"
    elif command -v python3 >/dev/null 2>&1; then
        printf 'python3\n'
    else
        printf 'python\n'
    fi
}

mp_require_bin() {  # mp_require_bin NAME "how to get it"
    command -v "$1" >/dev/null 2>&1 || mp_die "$1 not found on PATH: $2"
}

mp_gpu_count() {  # GPUs this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        local ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        if [[ ${#ids[@]} -eq 0 || ${ids[0]} == -1 ]]; then echo 0; else echo "${#ids[@]}"; fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

mp_ranks_per_node() {  # --nproc, else (GPU) the visible GPU count, else (CPU) 2
    if [[ -n $MP_NPROC ]]; then
        echo "$MP_NPROC"
    elif ((MP_CPU)); then
        echo 2
    else
        local gpus
        gpus=$(mp_gpu_count)
        ((gpus > 0)) || mp_die "no GPU found (CUDA_VISIBLE_DEVICES / nvidia-smi): pass --cpu (or MPOMOE_CPU=1) for a CPU run, or --nproc N"
        echo "$gpus"
    fi
}

# --------------------------------------------------------------------------- hostfile

MP_HOSTS=()   # host names in hostfile order
MP_SLOTS=()   # ranks on each

mp_read_hostfile() {  # mp_read_hostfile FILE: fills MP_HOSTS / MP_SLOTS, dies on a bad file
    local file=$1 line host rest slots n=0
    [[ -f $file ]] || mp_die "hostfile '$file' not found: copy launch/hostfile.example to launch/hostfile, list your nodes as '<host> slots=<ranks>', and pass --hostfile launch/hostfile"
    [[ -r $file ]] || mp_die "hostfile '$file' is not readable: fix its permissions"
    MP_HOSTS=()
    MP_SLOTS=()
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%%#*}
        read -r host rest <<<"$line"
        [[ -z $host ]] && continue
        slots=0
        [[ $rest =~ ^slots=([0-9]+)[[:space:]]*$ ]] && slots=$((10#${BASH_REMATCH[1]}))
        if ((slots == 0)); then
            mp_die "hostfile '$file' line $n reads '$line': write '<host> slots=<ranks>' (see launch/hostfile.example)"
        fi
        MP_HOSTS+=("$host")
        MP_SLOTS+=("$slots")
    done <"$file"
    ((${#MP_HOSTS[@]})) || mp_die "hostfile '$file' lists no host: add '<host> slots=<ranks>' lines (see launch/hostfile.example)"
}

mp_hostfile_world() {
    local s total=0
    for s in "${MP_SLOTS[@]}"; do total=$((total + s)); done
    echo "$total"
}

# --------------------------------------------------------------------------- master address

mp_local_addresses() {  # every address of this machine, one per line (no packets sent)
    printf '127.0.0.1\n::1\n0.0.0.0\n'
    { hostname -I 2>/dev/null || true; } | tr ' ' '\n'
    if command -v ip >/dev/null 2>&1; then
        { ip -o addr show 2>/dev/null || true; } | awk '{sub(/\/.*/, "", $4); print $4}'
    elif command -v ifconfig >/dev/null 2>&1; then
        { ifconfig 2>/dev/null || true; } | awk '$1 == "inet" || $1 == "inet6" {sub(/%.*/, "", $2); print $2}'
    fi
}

mp_resolve() {  # mp_resolve HOST -> its addresses, one per line; status 1 when it does not resolve
    local host=$1
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then
        printf '%s\n' "$host"
    elif command -v getent >/dev/null 2>&1; then
        timeout 10 getent ahosts "$host" 2>/dev/null | awk '{print $1}' | sort -u | grep .
    else
        "$(mp_python)" -c 'import socket, sys
print("\n".join(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], None)})))' "$host" 2>/dev/null | grep .
    fi
}

mp_is_local() {  # mp_is_local ADDRESS...: status 0 when any is 127/8, ::1 or one of ours
    local locals addr
    locals=$(mp_local_addresses)
    for addr in "$@"; do
        [[ $addr == 127.* ]] && return 0
        grep -qxF -- "$addr" <<<"$locals" && return 0
    done
    return 1
}

mp_port_in_use() {  # mp_port_in_use PORT: status 0 when this machine listens on it
    if command -v ss >/dev/null 2>&1; then
        [[ -n $(ss -Htln "sport = :$1" 2>/dev/null) ]]
    else
        # shellcheck disable=SC2016  # $1 expands in the child bash
        timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
    fi
}

mp_check_master() {  # mp_check_master MODE ADDR PORT WHAT
    # MODE single: a one-machine launch; the master must be this machine.
    #      host:   this node hosts the rendezvous; the master must be this machine, the port free.
    #      any:    resolvable; if local the port must be free, else the host must answer.
    #      peer:   like any, but a local master's port may already be taken (by node 0 on this machine).
    local mode=$1 addr=$2 port=$3 what=$4 addresses
    ((MP_CHECK_MASTER)) || return 0
    addresses=$(mp_resolve "$addr") ||
        mp_die "cannot resolve $what '$addr': use node 0's IP address or a name in DNS or /etc/hosts (check with: getent hosts $addr)"
    # shellcheck disable=SC2086  # one address per word
    if mp_is_local $addresses; then
        if [[ $mode != peer ]] && mp_port_in_use "$port"; then
            mp_die "MASTER_PORT $port is already in use on this machine: pass --master_port with a free port (or set MASTER_PORT)"
        fi
        return 0
    fi
    case $mode in
        single) mp_die "$what '$addr' is not an address of this machine, but this is a single-node launch: unset MASTER_ADDR (one node uses 127.0.0.1), or launch on several nodes (--hostfile / --nnodes)" ;;
        host) mp_die "$what '$addr' is not an address of this machine, but this node (node_rank 0) hosts the rendezvous: pass --master_addr with this node's address, or start node_rank 0 on '$addr'" ;;
    esac
    mp_probe "$(head -n 1 <<<"$addresses")" "$port" "$what '$addr'"
}

mp_probe() {  # mp_probe IP PORT WHAT: dies when IP does not answer a TCP connect
    local ip=$1 port=$2 what=$3 secs=${MPOMOE_PROBE_TIMEOUT:-5} out rc
    command -v timeout >/dev/null 2>&1 || { mp_note "no 'timeout' command: not probing $what"; return 0; }
    # shellcheck disable=SC2016  # $1 and $2 expand in the child bash
    out=$(timeout "$secs" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$ip" "$port" 2>&1) && return 0
    rc=$?
    [[ $out == *"refused"* ]] && return 0  # the host answered; nothing listens there yet
    if ((rc == 124)); then
        mp_die "$what ($ip:$port) does not answer within ${secs}s: check the address, routing and firewall between the nodes (or pass --no_master_check)"
    fi
    mp_die "$what ($ip:$port) is unreachable (${out##*: }): check the address, routing and firewall between the nodes (or pass --no_master_check)"
}

# --------------------------------------------------------------------------- MoE layout

mp_check_world() {  # mp_check_world WORLD: num_experts % ep_size == 0 and WORLD % ep_size == 0
    local world=$1 num_experts ep_size values default_experts default_ep
    num_experts=$(mp_train_override moe.num_experts)
    ep_size=$(mp_train_override moe.ep_size)
    if [[ -z $num_experts || -z $ep_size ]] && ((MP_CHECK_CONFIG)); then
        values=$(mp_config_moe) || exit 1
        read -r default_experts default_ep <<<"$values"
        num_experts=${num_experts:-$default_experts}
        ep_size=${ep_size:-$default_ep}
    fi
    if [[ -z $num_experts || -z $ep_size ]]; then
        mp_note "world size $world (ep_size check skipped: pass moe.ep_size= and moe.num_experts= or drop --no_config_check)"
        return 0
    fi
    [[ $num_experts =~ ^[0-9]+$ && $ep_size =~ ^[0-9]+$ ]] ||
        mp_die "moe.num_experts=$num_experts / moe.ep_size=$ep_size must be integers"
    if ((ep_size == 0)); then  # the trainer's rule: the largest divisor of both
        local auto
        auto=$(mp_common_divisors "$world" "$num_experts")
        mp_note "world size $world, num_experts $num_experts, ep_size 0 (auto: ${auto##* })"
        return 0
    fi
    ((num_experts % ep_size == 0)) ||
        mp_die "num_experts=$num_experts is not divisible by ep_size=$ep_size: choose ep_size among $(mp_divisors "$num_experts") (or moe.ep_size=0 for auto)"
    ((world % ep_size == 0)) ||
        mp_die "world size $world is not divisible by ep_size=$ep_size: launch a multiple of $ep_size ranks, or pass moe.ep_size= among $(mp_common_divisors "$world" "$num_experts") (0 = auto)"
    mp_note "world size $world, num_experts $num_experts, ep_size $ep_size"
}

mp_config_moe() {  # "<num_experts> <ep_size>" of the resolved run config (the trainer's --print_config)
    local py out errors status=0
    py=$(mp_python)
    command -v "$py" >/dev/null 2>&1 || mp_die "$py not found on PATH: activate the project's environment, or set MPOMOE_PYTHON"
    errors=$(mktemp)
    out=$("$py" -m mpomoe_ds.cli.train --print_config "${MP_TRAIN_ARGS[@]}" 2>"$errors") || status=$?
    if ((status)); then
        local last
        last=$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1)
        rm -f "$errors"
        mp_die "the trainer rejected the arguments (${last:-exit status $status}): fix them; check with: $py -m mpomoe_ds.cli.train --print_config ARGS"
    fi
    rm -f "$errors"
    # The JSON starts at the first line that is exactly "{" (anything printed before it is a log line).
    "$py" -c '
import json, sys
lines = sys.stdin.read().splitlines()
moe = json.loads("\n".join(lines[lines.index("{"):]))["moe"]
print(moe["num_experts"], moe["ep_size"])' <<<"$out" 2>/dev/null ||
        mp_die "could not read moe.num_experts / moe.ep_size from --print_config: pass moe.num_experts= and moe.ep_size=, or --no_config_check"
}

mp_divisors() {
    local d out=()
    for ((d = 1; d <= $1; d++)); do ((($1 % d) == 0)) && out+=("$d"); done
    echo "${out[*]}"
}

mp_common_divisors() {
    local d out=()
    for ((d = 1; d <= $1 && d <= $2; d++)); do ((($1 % d) == 0 && ($2 % d) == 0)) && out+=("$d"); done
    echo "${out[*]}"
}

# --------------------------------------------------------------------------- run

MP_CMD=()

mp_quote() {  # a word as the shell reads it back: bare when safe, else printf %q
    if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}

mp_exec() {  # print the exact command line (with the variables this script set), then exec it
    local line="" pair word
    for pair in "${MP_ENV_SET[@]}"; do
        line+="${pair%%=*}=$(mp_quote "${pair#*=}") "
    done
    for word in "${MP_CMD[@]}"; do
        line+="$(mp_quote "$word") "
    done
    printf 'mpomoe-launch: running: %s\n' "${line% }" >&2
    ((MP_DRY_RUN)) && exit 0
    exec "${MP_CMD[@]}"
}
