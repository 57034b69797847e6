#!/usr/bin/env bash
# launch/torchrun.sh: run `python -m mpomoe_ds.cli.train` under torchrun (no ssh; one call per node).
#
# Usage: launch/torchrun.sh [flags] [--] [training args]
#   one node (all GPUs):  launch/torchrun.sh --config RUN.yaml --deepspeed_config ds_configs/zero1_bf16.json
#   CPU, 2 ranks:         launch/torchrun.sh --cpu --nproc 2 --deepspeed_config ds_configs/cpu_debug.json
#   many nodes:           launch/torchrun.sh --nnodes 2 --node_rank N --master_addr node1 --config RUN.yaml ...
#                         (run on every node; N = 0 on node1, the master)
#
# Flags (anywhere before a `--`; everything else goes to the trainer):
#   --cpu               CPU run: DS_ACCELERATOR=cpu, gloo (or MPOMOE_CPU=1)
#   --nproc N           ranks per node (default: the visible GPUs, CPU: 2)
#   --nnodes M          number of nodes (default 1)
#   --node_rank R       this node's rank, 0..M-1 (with --nnodes > 1)
#   --master_addr ADDR  node 0's address, reachable from every node (default: MASTER_ADDR)
#   --master_port PORT  rendezvous port on node 0 (default: MASTER_PORT, else 29500)
#   --launcher_arg ARG  one more argument for `torchrun` itself (repeatable)
#   --dry_run           check and print the command, start nothing (or MPOMOE_DRY_RUN=1)
#   --no_config_check   do not run --print_config to read moe.num_experts / moe.ep_size
#   --no_master_check   do not resolve or probe the master
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MP_SCRIPT=launch/torchrun.sh
MP_OPTIONS="nnodes node_rank master_addr"

mp_parse_args "$@"
mp_require_bin torchrun "activate the project's environment (. .venv/bin/activate) or pip install torch==2.13.0"
ranks=$(mp_ranks_per_node)
world=$((ranks * MP_NNODES))
mp_setup_device "$ranks"

if ((MP_NNODES == 1)); then
    [[ -z $MP_NODE_RANK || $MP_NODE_RANK == 0 ]] || mp_die "--node_rank $MP_NODE_RANK with one node: pass --nnodes too"
    mp_check_master single "${MP_MASTER_ADDR:-127.0.0.1}" "$MP_MASTER_PORT" MASTER_ADDR
    MP_CMD=(torchrun --nproc_per_node "$ranks" --master_addr 127.0.0.1 --master_port "$MP_MASTER_PORT")
else
    [[ -n $MP_NODE_RANK ]] || mp_die "--nnodes $MP_NNODES needs --node_rank: 0 on the master node, 1 to $((MP_NNODES - 1)) on the others"
    ((MP_NODE_RANK < MP_NNODES)) || mp_die "--node_rank $MP_NODE_RANK is not below --nnodes $MP_NNODES: use 0 to $((MP_NNODES - 1))"
    [[ -n $MP_MASTER_ADDR ]] || mp_die "--nnodes $MP_NNODES needs --master_addr (or MASTER_ADDR): node 0's address, reachable from every node"
    # Node 0 hosts the rendezvous (torchrun's static rendezvous); the others only need to reach it.
    if ((MP_NODE_RANK == 0)); then mode=host; else mode=peer; fi
    mp_check_master "$mode" "$MP_MASTER_ADDR" "$MP_MASTER_PORT" "master"
    MP_CMD=(torchrun --nnodes "$MP_NNODES" --node_rank "$MP_NODE_RANK" --nproc_per_node "$ranks"
        --master_addr "$MP_MASTER_ADDR" --master_port "$MP_MASTER_PORT")
fi

mp_check_world "$world"
MP_CMD+=("${MP_LAUNCHER_ARGS[@]}" -m mpomoe_ds.cli.train "${MP_TRAIN_ARGS[@]}")
mp_exec
