"""Shared benchmark plumbing: machine record, launching ranks, timing, memory, communication.

Owns what every benchmark needs and none computes: the machine description
stored with each result, re-launching a benchmark on N ranks with torchrun,
one training step through a DeepSpeed engine and the MoE step protocol
(``train_step``), the interleaved round-robin timing of variants
(``timed_rounds``), a live-tensor memory tracker, a byte counter for
collectives, and the allocator setting every run uses.

Memory (``LiveTensorTracker``): a TorchDispatchMode that sees every tensor an
op allocates (forward, backward, optimizer, DeepSpeed's flat buffers) and drops
it when its storage is freed. It measures tensor bytes, independent of the
allocator; tensors created before it starts are not counted, so a variant is
built inside it.

Communication (``CommCounter``): wraps the ``torch.distributed`` collectives
DeepSpeed and mpomoe_ds call, and adds up the bytes of the buffers each rank
hands to them, by kind.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

# glibc serves large blocks with fresh mmap()s by default, so every large
# tensor costs page faults on first touch (a 75 MB copy took 58 ms instead of
# 8 ms here). Keeping freed memory in the heap (like jemalloc or tcmalloc, the
# allocators PyTorch's CPU tuning guide recommends) removes that for every
# variant alike. --no-malloc-tuning turns it off.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
              "MALLOC_TOP_PAD_": str(1 << 28)}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import deepspeed
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "malloc_tuning": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
        "load_average_at_start": os.getloadavg(),
    }


def machine_line(info: dict[str, Any]) -> str:
    isa = "/".join(info.get("isa", []))
    return (f"{info['cpu']}, {info['cores']} cores ({isa}), {info.get('memory_gib')} GiB; "
            f"torch {info['torch']}, deepspeed {info['deepspeed']}, python {info['python']}")


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, ranks: int, args: list[str], malloc_tuning: bool = True, threads: Optional[int] = None,
           timeout: Optional[float] = None, device: str = "cpu") -> None:
    """Run ``script --worker ARGS`` on ``ranks`` processes (torchrun): CPU accelerator and gloo, or CUDA.

    Threads per rank default to cores // ranks, so ranks never oversubscribe.
    ``device="cuda"`` leaves DeepSpeed to pick the CUDA accelerator (NCCL).
    """
    env = dict(os.environ)
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if malloc_tuning:
        env.update(MALLOC_ENV)
    else:
        for key in MALLOC_ENV:
            env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(script), "--worker", *args]
    print(f"[bench] {' '.join(cmd[2:])}  (OMP_NUM_THREADS={threads})", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=timeout)


def add_worker_args(parser: Any) -> None:
    """The hidden flags a rank started by :func:`launch` gets (``--worker``; torchrun's ``--local_rank``)."""
    import argparse

    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def dispatch(args: Any, worker: Callable[[Any], None], driver: Callable[[Any], None]) -> None:
    """A benchmark's entry point: ``worker(args)`` in a rank :func:`launch` started (``--worker``),
    else ``driver(args)``, which launches the ranks and writes the results."""
    if not args.worker:
        driver(args)
        return
    from mpomoe_ds import parallel

    worker(args)
    parallel.shutdown()  # else a rank can abort at exit after writing its results (see parallel.shutdown)


def init_worker(threads: Optional[int] = None):
    """Initialise torch.distributed (gloo) under torchrun; returns (rank, world)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    deepspeed.init_distributed(dist_backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def log(rank: int, *parts: Any) -> None:
    if rank == 0:
        print("[bench]", *parts, flush=True)


# --------------------------------------------------------------------------- timing


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def slowest_rank(seconds: float) -> float:
    """The largest value over ranks (a step is as slow as its slowest rank)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class Stopwatch:
    """Accumulates wall time per phase name (forward / backward / optimizer) within one step."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


def train_step(engine, batches: list, moe_step, per_step: bool, stopwatch: Optional[Stopwatch] = None) -> None:
    """All micro-batches of one optimizer step through a DeepSpeed engine (``step()`` after every micro-batch).

    ``moe_step`` (``mpomoe_ds.moe.step.MoEStep`` over the engine's module; it
    finds no layers in DeepSpeed's MoE or a dense model) is told the step.
    With ``per_step`` it is also told each micro-batch's position, so MPO
    experts rebuild once per optimizer step; without, they rebuild in every
    micro-batch. The loss is whatever the engine's module returns.
    """
    sw = stopwatch or Stopwatch()
    accum = engine.gradient_accumulation_steps()
    step = engine.global_steps
    moe_step.begin_step(step)
    for index, batch in enumerate(batches):
        if per_step:
            moe_step.begin_micro_batch(index, is_last=index == accum - 1)
        with sw.phase("forward"):
            loss = engine(batch)
        with sw.phase("backward"):
            engine.backward(loss)
        with sw.phase("optimizer"):
            engine.step()
    moe_step.end_step(step)


def synchronize() -> None:
    """Wait for the accelerator's queued work (a no-op on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def timed_rounds(rank: int, run_steps: dict[str, Callable[[Stopwatch], None]], warmup: int,
                 steps: int) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Time every variant's ``run_steps[kind](stopwatch)`` interleaved, ``warmup + steps`` rounds.

    Each round runs every kind once, in an order rotated by one per round, so
    load on the machine hits the variants alike; each step starts after a
    barrier and counts as long as its slowest rank. Returns, per kind, the
    measured rounds' step seconds and their stopwatch phases (warm-up rounds
    dropped); rank 0 logs every round.
    """
    kinds = list(run_steps)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for r in range(warmup + steps):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        this_round = {}
        for k in order:
            barrier()
            sw = Stopwatch()
            start = time.perf_counter()
            run_steps[k](sw)
            synchronize()  # GPU kernels run asynchronously: the step ends when they do
            this_round[k] = slowest_rank(time.perf_counter() - start)
            if r >= warmup:
                times[k].append(this_round[k])
                phases[k].append(sw.phases)
        log(rank, f"  round {r + 1}/{warmup + steps}{' (warm-up)' if r < warmup else ''}: "
            + ", ".join(f"{k} {this_round[k]:.2f}s" for k in kinds))
    return times, phases


# --------------------------------------------------------------------------- memory


def _storages(obj: Any) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj.untyped_storage()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _storages(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _storages(item)


class LiveTensorTracker:
    """Bytes of live tensor storages allocated while active, with a resettable peak.

    Use as a context manager around building and running one variant; read
    ``live`` (bytes now), ``peak`` (largest since :meth:`reset_peak`).
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for storage in _storages(out):
                    tracker._track(storage)
                return out

        self._mode = _Mode()
        self._seen: dict[int, Any] = {}
        self.live = 0
        self.peak = 0

    def _track(self, storage: Any) -> None:
        key = storage._cdata
        if key in self._seen or storage.device.type == "meta":
            return
        nbytes = storage.nbytes()
        self._seen[key] = weakref.ref(storage, functools.partial(self._release, key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, nbytes: int, _ref: Any) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self) -> "LiveTensorTracker":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


# --------------------------------------------------------------------------- communication

_COLLECTIVES = {
    "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all",
    "all_reduce": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "reduce": "reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather": "all_gather",
    "broadcast": "broadcast",
}


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CommCounter:
    """Adds up the input-buffer bytes each collective is handed on this rank, by kind.

    Gradient reductions are the floating-point all_reduce / reduce_scatter /
    reduce calls; integer all-reduces (capacity agreement, idle-expert masks)
    are counted apart as "control". Calls on a one-rank group move nothing
    and are only counted as calls ("single_rank_group").
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._saved: dict[tuple[int, str], tuple[Any, Callable]] = {}

    def _wrap(self, name: str, kind: str, fn: Callable) -> Callable:
        import torch
        import torch.distributed as dist

        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None

        def group_size(args: tuple, kwargs: dict) -> int:
            group = kwargs.get("group")
            if group is None and signature is not None:
                try:
                    group = signature.bind_partial(*args, **kwargs).arguments.get("group")
                except TypeError:
                    group = None
            return dist.get_world_size(group) if group is not None else dist.get_world_size()

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if group_size(args, kwargs) == 1:  # e.g. expert gradients when ep_size == world size
                self.calls["single_rank_group"] = self.calls.get("single_rank_group", 0) + 1
                return fn(*args, **kwargs)
            # the buffer a rank contributes: "input"/"tensor"/"input_tensor" keyword, else the last tensor arg
            buf = next((kwargs[k] for k in ("input", "tensor", "input_tensor", "input_list") if k in kwargs), None)
            if buf is None:
                tensors = [a for a in args if isinstance(a, (torch.Tensor, list))]
                buf = tensors[-1] if kind in ("all_to_all", "reduce_scatter", "all_gather") and tensors else (
                    tensors[0] if tensors else None)
            label = kind
            if kind == "all_reduce" and isinstance(buf, torch.Tensor) and not buf.is_floating_point():
                label = "control"
            self.bytes[label] = self.bytes.get(label, 0) + _tensor_bytes(buf)
            self.calls[label] = self.calls.get(label, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def _targets(self) -> list[tuple[Any, str, str]]:
        """(object, attribute, kind): torch.distributed's functions, and the ones DeepSpeed's
        torch backend stored at start-up (so patching torch.distributed alone would miss them)."""
        import torch.distributed as dist

        targets = [(dist, name, kind) for name, kind in _COLLECTIVES.items() if hasattr(dist, name)]
        try:
            from deepspeed.comm import comm as ds_comm

            backend = ds_comm.cdb
        except ImportError:
            backend = None
        for attr, kind in (("all_gather_function", "all_gather"), ("reduce_scatter_function", "reduce_scatter")):
            if backend is not None and getattr(backend, attr, None) is not None:
                targets.append((backend, attr, kind))
        return targets

    def __enter__(self) -> "CommCounter":
        for obj, name, kind in self._targets():
            fn = getattr(obj, name)
            self._saved[(id(obj), name)] = (obj, fn)
            setattr(obj, name, self._wrap(name, kind, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for (_, name), (obj, fn) in self._saved.items():
            setattr(obj, name, fn)
        self._saved.clear()


# --------------------------------------------------------------------------- results


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def paste_into_readme(md_path: Path, readme: Path = README) -> bool:
    """Put ``md_path``'s text between ``<!-- NAME -->`` and ``<!-- end NAME -->`` in the README (NAME its file name).

    So that a README table is always the script's own output, never a hand
    copy. Returns False (and changes nothing) when the README has no such
    markers, or when ``md_path`` is not in ``benchmarks/results`` (a smoke run
    with ``--out /tmp/...`` must not overwrite the committed numbers).
    """
    md_path, readme = Path(md_path), Path(readme)
    if md_path.resolve().parent != RESULTS.resolve() and readme == README:
        return False
    start, end = f"<!-- {md_path.name} -->", f"<!-- end {md_path.name} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{md_path.read_text().strip()}\n{end}{tail}")
    print(f"[bench] pasted {md_path.name} into {readme}")
    return True
