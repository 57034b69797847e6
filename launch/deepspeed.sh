#!/usr/bin/env bash
# launch/deepspeed.sh: run `python -m mpomoe_ds.cli.train` under DeepSpeed's launcher.
#
# Usage: launch/deepspeed.sh [flags] [--] [training args]
#   one node (all GPUs):  launch/deepspeed.sh --config RUN.yaml --deepspeed_config ds_configs/zero1_bf16.json
#   CPU, 2 ranks:         launch/deepspeed.sh --cpu --nproc 2 --deepspeed_config ds_configs/cpu_debug.json
#   many nodes (ssh):     launch/deepspeed.sh --hostfile launch/hostfile --master_addr node1 --config RUN.yaml ...
#   many nodes (no ssh):  launch/deepspeed.sh --hostfile launch/hostfile --node_rank N --master_addr node1 ...
#                         (run on every node, N = its line in the hostfile, from 0)
#
# Flags (anywhere before a `--`; everything else goes to the trainer):
#   --cpu               CPU run: DS_ACCELERATOR=cpu, gloo (or MPOMOE_CPU=1)
#   --nproc N           ranks on this node (one node only; default: the visible GPUs, CPU: 2)
#   --hostfile FILE     several nodes: "<host> slots=<ranks>" lines (launch/hostfile.example);
#                       without --node_rank the ranks start over ssh with pdsh
#   --node_rank R       with --hostfile: start only this node's ranks, no ssh
#   --master_addr ADDR  node 0's address (default: MASTER_ADDR, else the first hostfile host)
#   --master_port PORT  rendezvous port (default: MASTER_PORT, else 29500)
#   --launcher_arg ARG  one more argument for `deepspeed` itself (repeatable), e.g. --launcher_arg=--ssh_port=2222
#   --dry_run           check and print the command, start nothing (or MPOMOE_DRY_RUN=1)
#   --no_config_check   do not run --print_config to read moe.num_experts / moe.ep_size
#   --no_master_check   do not resolve or probe the master
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MP_SCRIPT=launch/deepspeed.sh
MP_OPTIONS="hostfile node_rank master_addr"

check_deepspeed_env() {  # what DeepSpeed's pdsh runner reads from .deepspeed_env (in ~ and the launch directory)
    local name=${DS_ENV_FILE:-.deepspeed_env} dir file line n has_accelerator=0
    for dir in "$HOME" "."; do
        if [[ $name == /* ]]; then file=$name; else file=$dir/$name; fi
        [[ -f $file ]] || continue
        n=0
        while IFS= read -r line || [[ -n $line ]]; do
            n=$((n + 1))
            [[ $line == *=* ]] ||
                mp_die "$file line $n ('$line') is not KEY=value: DeepSpeed's runner stops on it (no comments or blank lines allowed); remove the line"
            [[ $line == DS_ACCELERATOR=* ]] && has_accelerator=1
        done <"$file"
    done
    if ((MP_CPU && !has_accelerator)); then
        mp_die "DS_ACCELERATOR=cpu does not reach ranks started over ssh: add the line DS_ACCELERATOR=cpu to ./$name"
    fi
}

mp_parse_args "$@"
mp_require_bin deepspeed "activate the project's environment (. .venv/bin/activate) or pip install deepspeed==0.19.8"
MP_CMD=(deepspeed)

if [[ -z $MP_HOSTFILE ]]; then
    [[ -z $MP_NODE_RANK ]] || mp_die "--node_rank needs --hostfile: list the nodes in a hostfile (launch/hostfile.example)"
    ranks=$(mp_ranks_per_node)
    world=$ranks
    mp_setup_device "$ranks"
    mp_check_master single "${MP_MASTER_ADDR:-127.0.0.1}" "$MP_MASTER_PORT" MASTER_ADDR
    if ((!MP_CPU)) && [[ -z $MP_NPROC && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        : # no --num_gpus: DeepSpeed turns CUDA_VISIBLE_DEVICES into --include localhost:<ids> itself
    else
        MP_CMD+=(--num_gpus "$ranks")
    fi
    MP_CMD+=(--master_port "$MP_MASTER_PORT")
else
    [[ -z $MP_NPROC ]] || mp_die "--nproc does not apply with --hostfile: the ranks per node are the slots= in the hostfile"
    mp_read_hostfile "$MP_HOSTFILE"
    world=$(mp_hostfile_world)
    mp_setup_device "${MP_SLOTS[0]}"
    master=${MP_MASTER_ADDR:-${MP_HOSTS[0]}}
    MP_CMD+=(--hostfile "$MP_HOSTFILE")
    if [[ -n $MP_NODE_RANK ]]; then
        ((MP_NODE_RANK < ${#MP_HOSTS[@]})) ||
            mp_die "--node_rank $MP_NODE_RANK but the hostfile lists ${#MP_HOSTS[@]} nodes: use 0 to $((${#MP_HOSTS[@]} - 1))"
        # Rank 0 (on node 0) hosts the rendezvous; other nodes only need to reach it.
        if ((MP_NODE_RANK == 0)); then mode=host; else mode=peer; fi
        MP_CMD+=(--no_ssh --node_rank "$MP_NODE_RANK")
    else
        mp_require_bin pdsh "install it on this node (apt-get install pdsh), or start each node itself with --node_rank (no ssh)"
        check_deepspeed_env
        mode=any
    fi
    mp_check_master "$mode" "$master" "$MP_MASTER_PORT" "master"
    MP_CMD+=(--master_addr "$master" --master_port "$MP_MASTER_PORT")
fi

mp_check_world "$world"
MP_CMD+=("${MP_LAUNCHER_ARGS[@]}" --module mpomoe_ds.cli.train "${MP_TRAIN_ARGS[@]}")
mp_exec
