"""Expert parallelism with 2 real ranks vs a single-process reference (CPU, gloo)."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_two_ranks

WORKER = ROOT / "tests" / "dist" / "moe_worker.py"
# fp32 throughout; differences are summation-order roundoff.
GRAD_TOL = 1e-6
LOSS_TOL = 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("zero,keep_prob,shard,clip", [(0, 0.5, False, 0.0), (2, 0.5, False, 0.0),
                                                     (2, 0.0, False, 0.0), (0, 1.0, True, 0.0),
                                                     (2, 0.5, True, 0.0), (2, 1.0, True, 0.05)])
def test_two_rank_expert_parallel_training_equals_single_process(tmp_path, zero, keep_prob, shard, clip):
    ranks = run_two_ranks(WORKER, ["--zero", str(zero), "--keep-prob", str(keep_prob), "--steps", "5",
                                   "--clip", str(clip)] + (["--shard-central"] if shard else []), tmp_path / "result")
    for r in ranks:
        if clip:  # DeepSpeed's ZeRO-2 clip, with experts and shards on different ranks, is the global one
            assert min(r["ref_grad_norm"]) > 2 * clip
        # loss and every gradient (dense after all-reduce, experts on their owner) match each step
        assert len(r["loss_diff"]) == 5
        assert max(r["loss_diff"]) < LOSS_TOL, r["loss_diff"]
        assert max(r["grad_diff"]) < GRAD_TOL, r["grad_diff"]
        assert r["param_diff"] < GRAD_TOL
        # central tensors, router, dense layers: bit-identical on both ranks after 5 steps
        assert r["replicated_bit_identical"]
        central_names = {"moe.central.up", "moe.central.down"}
        if shard:  # each rank holds half of each central tensor; state_dict() shows the full, trained one
            assert r["central_sharded"] and not central_names & set(r["replicated_names"])
            assert r["central_local_numel"] == sum(-(-n // 2) for n in r["central_full_numels"])
        else:
            assert not r["central_sharded"] and central_names <= set(r["replicated_names"])
            assert r["central_local_numel"] == sum(r["central_full_numels"])
        assert r["state_dict_central_diff"] < GRAD_TOL
        ours, single_process = r["report_expert_side_global"]  # counted at full size however it is laid out
        assert ours == single_process
        assert "moe.deepspeed_moe.gate.wg.weight" in r["replicated_names"]
        assert not any("deepspeed_experts" in n for n in r["replicated_names"])
        # each expert lives on exactly one rank of the expert-parallel group
        owners = r["expert_owners"]
        assert sorted(e for rank_experts in owners for e in rank_experts) == [0, 1, 2, 3]
        assert owners[0] != owners[1]
        # DeepSpeed checkpoint round trip, per-expert files included
        assert r["checkpoint_diff_before_load"] > 0.1
        assert r["checkpoint_diff_after_load"] == 0.0
        assert {f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)} <= set(r["checkpoint_files"])
        assert r["aux_moved"] > 0
        if zero == 0:  # the MoE-aware global gradient norm equals the single-process norm
            assert max(r["grad_norm_rel_diff"]) < 1e-6
        if keep_prob == 0.0:  # p = 0 freezes the central tensors while auxiliaries train
            assert r["central_moved"] == 0.0
        else:
            assert r["central_moved"] > 0


@pytest.mark.distributed
def test_gradient_mask_is_identical_across_ranks_and_zeroes_one_minus_p(tmp_path):
    ranks = run_two_ranks(WORKER, ["--zero", "0", "--keep-prob", "0.5", "--steps", "3"], tmp_path / "result")
    for r in ranks:
        assert all(r["mask_equal_across_ranks"]) and len(r["mask_equal_across_ranks"]) == 6
        # zeroed where the mask says so, even after the all-reduce: both ranks used the same mask
        assert r["mask_violations"] == 0
        assert min(r["mask_kept_nonzero"]) > 0.99
        # central tensors here have 2048 elements: 1-p = 0.5 within 4 sigma (sigma ~ 0.011)
        for fraction in r["mask_zero_fraction"]:
            assert abs(fraction - 0.5) < 0.045
    # masks differ between steps
    assert len(set(ranks[0]["mask_zero_fraction"])) > 1
