"""mpomoe_ds.parallel: where collectives send tensors, and that each returns the right values on the caller's device."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpomoe_ds import parallel

from conftest import ROOT, dist_env, free_port, run_two_ranks

WORKER = ROOT / "tests" / "dist" / "parallel_worker.py"


def accelerator() -> torch.device:
    return torch.device("cuda", 1)


@pytest.mark.parametrize("backend, expected", [("gloo", "cpu"), ("GLOO", "cpu"), ("mpi", "cpu"), ("ccl", "cpu"),
                                               ("nccl", "cuda:1"), ("hccl", "cuda:1"), ("xccl", "cuda:1")])
def test_backend_decides_the_communication_device(backend, expected):
    assert parallel.device_for_backend(backend, accelerator) == torch.device(expected)


def test_collectives_outside_torch_distributed_return_their_input():
    x = torch.arange(3.0)
    assert parallel.all_reduce(x) is x and parallel.all_gather(x) == [x]
    assert parallel.all_gather_object({"a": 1}) == [{"a": 1}] and parallel.all_to_all(None, x) is x
    parallel.barrier()


def test_unknown_reduction_names_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \['max', 'min', 'sum'\]"):
        parallel._reduce_op("mean")


def check_two_rank_results(results: list[dict], caller_device: str) -> None:
    base = [torch.arange(6.0).view(2, 3) + r for r in range(2)]
    for rank, out in enumerate(results):
        assert out["devices"] == [out["caller_device"]] and out["caller_device"].startswith(caller_device)
        assert out["comm_device"] == "cpu" and out["input_untouched"]
        assert torch.equal(torch.tensor(out["summed"]), (base[0] + base[1]).t())
        assert out["maxed"] == [1.0, 5.0]
        assert out["gathered0"] == base[0].t().tolist() and out["gathered1"] == base[1].t().tolist()
        assert out["flat"] == [0.0, 0.0, 1.0, 1.0]
        assert out["shard"] == [[0.0, 3.0], [6.0, 9.0]][rank]  # (1 + 2) * arange(4), split in rank order
        # a true reduce-scatter on gloo too (an all-to-all of the blocks): half of each rank's 16 bytes leave it
        assert out["shard_traffic"] == {"reduce_scatter": 8}
        assert out["objects"] == [{"rank": 0}, {"rank": 1}]
        assert out["routed"] == [[0.0 + rank], [10.0 + rank]]  # row r of every rank goes to rank r


@pytest.mark.distributed
def test_two_rank_collectives_give_their_definitions_on_the_caller_device(tmp_path):
    check_two_rank_results(run_two_ranks(WORKER, ["--device", "cpu"], tmp_path / "par"), "cpu")


@pytest.mark.gpu
def test_two_rank_gloo_collectives_take_and_return_cuda_tensors(tmp_path):
    """On a CUDA machine: caller tensors on the GPU, gloo sends from the CPU, results come back on the GPU."""
    check_two_rank_results(run_two_ranks(WORKER, ["--device", "cuda"], tmp_path / "par"), "cuda")


def test_shutdown_destroys_the_process_group_once_and_is_a_no_op_after(tmp_path):
    """In a fresh process (the suite's own group must stay): a gloo world of one is gone after shutdown()."""
    script = (
        "import torch.distributed as dist\n"
        "from mpomoe_ds import parallel\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "parallel.shutdown()\n"
        "assert not dist.is_initialized()\n"
        "parallel.shutdown()\n"
        "print('down')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=dist_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "down", proc.stderr[-3000:]
