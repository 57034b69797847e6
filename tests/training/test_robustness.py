"""A run never loses or silently corrupts work: non-finite guard, verified checkpoints, early errors (real ranks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from test_train_cli import deepspeed_cmd, model_states, write_configs

from conftest import ROOT, TINY_DS, dist_env, tiny_run_config

FAIL_FAST = 600


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=FAIL_FAST)


def checkpoint_params_finite(folder: Path) -> bool:
    """Every floating tensor in every model/expert file of a checkpoint folder is finite."""
    for path in folder.glob("*model_states.pt"):
        state = torch.load(path, weights_only=False)
        tensors = state["module"] if "module" in state else state
        if not all(torch.isfinite(t).all() for t in tensors.values() if torch.is_tensor(t) and t.is_floating_point()):
            return False
    return True


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_steps_are_skipped_then_the_run_stops_without_saving_nan(tmp_path, zero_stage):
    """NaN on rank 1 only at step 2 (skipped, run goes on), then at steps 4-5: stops at step 5 (limit 2)."""
    out = tmp_path / "nan"
    config = tiny_run_config(out, max_steps=8, save_every=1, keep_last=4, log_every=1, diversity_tokens=0,
                             max_nonfinite_steps=2, inject_nonfinite_steps=[2, 4, 5])
    run, ds = write_configs(tmp_path, config, {**TINY_DS, "zero_optimization": {"stage": zero_stage}})
    proc = run_cli(deepspeed_cmd(run, ds))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert "step 5: loss or gradient norm not finite for 2 consecutive steps" in log, log[-4000:]
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step4'}" in log
    assert "step 2: loss or gradient norm not finite on some rank: update skipped" in log

    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN would not parse
    assert metrics["nonfinite_steps"] == 3 and metrics["step"] == 5
    assert "consecutive" in metrics["stopped"]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step4"
    assert stat.S_IMODE((ckpt / "latest").stat().st_mode) & 0o044  # group/others may read it
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step1", "step2", "step3", "step4"]
    assert all(checkpoint_params_finite(ckpt / f"step{s}") for s in range(1, 5))
    # The skipped steps 2 and 4 left every parameter as it was; step 3 trained.
    weights = {s: model_states(out, f"step{s}") for s in range(1, 5)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])


def train_losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An uninterrupted 2-rank run of 6 steps, checkpoints at 2, 4 and 6, every step's loss logged."""
    root = tmp_path_factory.mktemp("straight")
    out = root / "run"
    run, ds = write_configs(root, tiny_run_config(out, max_steps=6, save_every=2, keep_last=3, log_every=1,
                                                  diversity_tokens=0))
    proc = run_cli(deepspeed_cmd(run, ds))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, run, ds


def stopped_at_step4(straight: Path, dest: Path) -> Path:
    """A copy of the straight run as if it had stopped after saving step 4."""
    shutil.copytree(straight / "checkpoints", dest / "checkpoints", ignore=shutil.ignore_patterns("step6"))
    (dest / "checkpoints" / "latest").write_text("step4")
    return dest


FILES = {"dense": "mp_rank_00_model_states.pt", "expert": "layer_0_expert_3_mp_rank_00_model_states.pt",
         "optimizer": "expp_rank_1_mp_rank_00_optim_states.pt", "rank_state": "mpomoe_rank1_state.pt",
         "manifest": "manifest.json"}


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        middle = len(data) // 2
        data[middle:middle + 48] = bytes(b ^ 0xFF for b in data[middle:middle + 48])
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_damaged_checkpoint_file_is_named_and_the_previous_checkpoint_is_chosen(straight_run, tmp_path,
                                                                                      kind, how):
    from mpomoe_ds.training.integrity import newest_verified

    out = stopped_at_step4(straight_run[0], tmp_path)
    damage(out / "checkpoints" / "step4" / FILES[kind], how)
    warnings: list[str] = []
    tag, manifest = newest_verified(out / "checkpoints", warnings.append)
    assert tag == "step2" and manifest["step"] == 2
    assert len(warnings) == 1 and str(out / "checkpoints" / "step4" / FILES[kind]) in warnings[0]


@pytest.mark.distributed
def test_no_verifying_checkpoint_fails_listing_each_one(straight_run, tmp_path):
    from mpomoe_ds.training.integrity import CheckpointError, newest_verified

    out = stopped_at_step4(straight_run[0], tmp_path)
    damage(out / "checkpoints" / "step4" / FILES["expert"], "flip")
    damage(out / "checkpoints" / "step2" / FILES["dense"], "truncate")
    with pytest.raises(CheckpointError, match=r"(?s)step4: .*layer_0_expert_3.*corrupted.*step2: .*mp_rank_00_model"):
        newest_verified(out / "checkpoints", print)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["expert", "rank_state"])
def test_resume_past_a_damaged_checkpoint_continues_like_the_uninterrupted_run(straight_run, tmp_path, kind):
    straight, run, ds = straight_run
    out = stopped_at_step4(straight, tmp_path)
    damage(out / "checkpoints" / "step4" / FILES[kind], "flip" if kind == "expert" else "truncate")
    proc = run_cli(deepspeed_cmd(run, ds, f"train.output_dir={out}", "--resume"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "falling back to checkpoint step2" in log and FILES[kind] in log
    resumed, reference = train_losses(out), train_losses(straight)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:  # fp32 on CPU, one thread per rank: the same computation, bit for bit
        assert resumed[step] == reference[step], step
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"


def _too_late(*args, **kwargs):
    raise AssertionError("data or model work started before the bad input was reported")


@pytest.mark.parametrize("case", ["zero3", "output_dir", "max_seq_len", "roberta_positions", "train_file", "corpus",
                                  "document_masking"])
def test_bad_input_fails_before_any_data_or_model_work(tmp_path, monkeypatch, case):
    from mpomoe_ds.cli.train import run as train_cli
    from mpomoe_ds.training import trainer

    monkeypatch.setattr(trainer, "prepare_tasks", _too_late)
    monkeypatch.setattr(trainer, "build_model", _too_late)
    config, ds = tiny_run_config(tmp_path / "out"), {}
    if case == "zero3":
        ds = {"zero_optimization": {"stage": 3}}
        match = "ZeRO stage 3 is not supported with MoE.*stage 1 or 2"
    elif case == "output_dir":
        (tmp_path / "a_file").write_text("")
        config["train"]["output_dir"] = str(tmp_path / "a_file" / "out")
        match = "train.output_dir=.*a_file/out.* is not writable.*--output_dir"
    elif case == "max_seq_len":
        config["data"]["max_seq_len"] = 1024
        match = r"data.max_seq_len=1024: .* embeds at most 512 positions; use data.max_seq_len <= 512"
    elif case == "roberta_positions":  # position ids start after padding_idx 1: 34 embeddings hold 32 tokens
        import transformers

        transformers.RobertaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=34,
                                   pad_token_id=1).save_pretrained(tmp_path / "roberta")
        config["model"].update(name_or_path=str(tmp_path / "roberta"), tokenizer="minilm", random_init=True)
        config["data"]["max_seq_len"] = 33
        match = r"data.max_seq_len=33: .* embeds at most 32 positions; use data.max_seq_len <= 32"
    elif case == "train_file":
        config["data"]["tasks"] = [{"name": "sst2", "train_file": str(tmp_path / "nope.csv")}]
        match = r"data.tasks\[0\].train_file=.*nope.csv.*no such file"
    elif case == "corpus":
        config["data"].update(tasks=[], corpora=[{"name": "en", "path": str(tmp_path / "nope")}])
        match = r"data.corpora\[0\].path=.*nope.*no prepared corpus there.*mpomoe-prepare"
    else:  # MiniLM is an encoder: its attention cannot be kept inside packed documents
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "index.json").write_text("{}")
        config["data"].update(tasks=[], document_masking=True,
                              corpora=[{"name": "en", "path": str(tmp_path / "corpus")}])
        match = r"data.document_masking=true: the model 'minilm' \(bert\) cannot keep attention inside documents"
    run, ds_path = write_configs(tmp_path, config, {**json.loads(json.dumps(TINY_DS)), **ds})
    with pytest.raises(Exception, match=match):
        train_cli(["--config", str(run), "--deepspeed_config", str(ds_path)])


@pytest.mark.distributed
@pytest.mark.parametrize("override, shown", [
    ("moe.num_experts=8", "moe.num_experts: checkpoint 4, now 8"),
    ("optim.lr=0.5", "optim.lr: checkpoint 0.001, now 0.5"),
])
def test_resume_with_changed_architecture_or_optimizer_keys_is_refused_naming_each(straight_run, tmp_path,
                                                                                  monkeypatch, override, shown):
    from mpomoe_ds.cli.train import run as train_cli
    from mpomoe_ds.training import trainer

    monkeypatch.setattr(trainer, "prepare_tasks", _too_late)
    straight, run, ds = straight_run
    out = stopped_at_step4(straight, tmp_path)
    with pytest.raises(Exception, match=shown) as err:
        train_cli(["--config", str(run), "--deepspeed_config", str(ds), f"train.output_dir={out}", override,
                   "--resume"])
    assert "another train.output_dir" in str(err.value)
    assert not (out / "run_config.json").exists()  # nothing recorded that was not applied


def rank_pid(marker: str, rank: int) -> Optional[int]:
    """The pid of the training process of ``rank`` whose command line contains ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and f"--local_rank={rank}".encode() in cmd and any(marker.encode() in c for c in cmd):
            return int(proc.name)
    return None


def kill_rank_when(out: Path, ready, cmd: list[str]) -> None:
    """Start ``cmd``, SIGKILL rank 1 as soon as ``ready(out)``; the launcher must then end, non-zero."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + FAIL_FAST
    while not ready(out):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill point"
        time.sleep(0.01)
    pid = rank_pid(str(out), 1)
    assert pid is not None
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=60)
    # The launcher ends the other rank (~2.5 s on an idle machine); no hang. 30 s leaves room for a loaded CI box.
    assert time.monotonic() - killed < 30
    assert proc.returncode != 0, log[-3000:]
    assert not (out / "metrics.json").exists()  # killed before the end


def logged_steps_at_least(steps: int):
    """A readiness check for :func:`kill_rank_when`: the run's train log holds ``steps`` lines."""
    def ready(out: Path) -> bool:
        log = out / "train_log.jsonl"
        return log.is_file() and len(log.read_text().splitlines()) >= steps
    return ready


@pytest.mark.distributed
@pytest.mark.parametrize("when", ["mid_run", "during_save"])
def test_kill_9_of_a_rank_then_resume_gives_the_uninterrupted_losses(straight_run, tmp_path, when):
    straight, run, ds = straight_run
    out = tmp_path / "killed"
    if when == "mid_run":  # after step 3 was logged (step 2 saved)
        ready = logged_steps_at_least(3)
    else:  # the moment step 4's folder appears: DeepSpeed is writing it
        ready = lambda o: (o / "checkpoints" / "step4").is_dir()  # noqa: E731
    kill_rank_when(out, ready, deepspeed_cmd(run, ds, f"train.output_dir={out}"))
    proc = run_cli(deepspeed_cmd(run, ds, f"train.output_dir={out}", "--resume"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    resumed, reference = train_losses(out), train_losses(straight)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert all(resumed[step] == reference[step] for step in resumed), (resumed, reference)
    assert json.loads((out / "metrics.json").read_text())["train_loss_first"] == reference[1]
    assert tensorboard_steps(out, "train/loss") == [1, 2, 3, 4, 5, 6]  # steps past the resume point not twice


def tensorboard_steps(output_dir: Path, tag: str) -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them (events past a purge_step dropped), every event file read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_crashed_save_newer_than_latest_is_pruned_and_never_chosen(tmp_path):
    from mpomoe_ds.training.checkpoint import prune
    from mpomoe_ds.training.integrity import candidate_tags, newest_verified, write_manifest

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpt / f"step{step}").mkdir(parents=True)
        (ckpt / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % step)
    write_manifest(ckpt / "step2", {"moe": {}}, {"step": 2, "train_batches": {"step": 2}, "world_size": 2})
    (ckpt / "latest").write_text("step2")  # step4 crashed after its files, before its manifest
    assert candidate_tags(ckpt) == ["step2", "step4"]
    assert newest_verified(ckpt, pytest.fail)[0] == "step2"  # no warning: latest verifies
    assert prune(ckpt, keep_last=2) == ["step4"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step2"]


def test_resume_accepts_a_checkpoint_from_before_a_key_existed_only_at_its_default():
    """A checkpoint written before ``moe.rotation_angle`` existed lacks it in its run config."""
    from mpomoe_ds.config import to_dict
    from mpomoe_ds.training.preflight import check_resume_config
    from mpomoe_ds.training.run_config import RunConfig

    current = to_dict(RunConfig())
    saved = json.loads(json.dumps(current))
    del saved["moe"]["rotation_angle"]
    check_resume_config(saved, current, "ckpt")  # absent then, default now: nothing changes
    current["moe"]["rotation_angle"] = 0.5
    with pytest.raises(Exception, match=r"moe.rotation_angle: checkpoint None, now 0.5"):
        check_resume_config(saved, current, "ckpt")


def test_resume_global_batch_check_reads_the_saved_plan_of_each_stream_kind():
    """Task stream: only the saved G = micro-batch x ranks continues (fix named); a corpus mixture: any G."""
    from mpomoe_ds.config import ConfigError
    from mpomoe_ds.data.sampling import TrainBatches
    from mpomoe_ds.training.preflight import check_resume_global_batch

    class _Rows(list):
        pass

    task = type("T", (), {"train": _Rows(range(64)), "spec": type("S", (), {"name": "toy"})()})()
    plan = json.loads(json.dumps(TrainBatches([task], 8, world_size=2).state_dict()))  # as the manifest stores it
    check_resume_global_batch(plan, 4, 4, "ckpt")  # 4 x 4 = 16 = 8 x 2: continues exactly
    with pytest.raises(ConfigError, match=r"global batch of 16 .* now it is 8 x 1 = 8.*"
                                          r"set train_micro_batch_size_per_gpu to 16"):
        check_resume_global_batch(plan, 8, 1, "ckpt")
    with pytest.raises(ConfigError, match=r"launch a number of ranks that divides 16"):
        check_resume_global_batch(plan, 5, 3, "ckpt")
    check_resume_global_batch({"kind": "packed_mixture", "position": 96, "global_batch": 32}, 3, 1, "ckpt")
