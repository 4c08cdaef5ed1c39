"""Data-parallel pieces: torchrun's environment, backend choice, each rank's share of a global batch, the checks
before a run; and, under a real ``torchrun --nproc_per_node 2`` on the CPU (gloo), FSDP2 sharding of a tiny
Kandinsky 5 (fp32 and fp8 weights) and a tiny LTX-2 DiT with LoRA and gradient checkpointing, whose float32-averaged
LoRA gradient over the two ranks equals the one-process gradient of the same global batch, plus the collectives and
rank-0 writing; and (once the trainer takes a ``DistributedContext``) whole runs through the headless launcher on 2
ranks giving the losses and LoRA of one process, resumed from 2 ranks on 1 and from 1 on 2.

This file is also the worker script: ``torchrun … test_distributed.py <out> <k5 file> <ltx2 file>`` and
``torchrun … test_distributed.py launch <run folder>=<steps> …``."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import FAMILIES, K5, TinyFamily
from test_launch import setup_run

from cinetune.core.lora import inject_lora, load_lora
from cinetune.core.tiny import seeded_tensor
from cinetune.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    DistributedError,
    all_reduce_gradients,
    check_local_workers,
    check_sharding,
    check_world_divides,
    choose_backend,
    close_distributed,
    init_distributed,
    rank_share,
    shard_frozen_blocks,
    torchrun_env,
)
from cinetune.training.checkpointing import list_checkpoints, read_state
from cinetune.training.launch import launch
from cinetune.training.recipe import write_recipe
from cinetune.training.trainer import train_lora

GLOBAL_BATCH = 4
#: (family, weight dtype) pairs the torchrun test trains: both families in fp32, Kandinsky 5 with fp8 weights.
CASES = [(fam, "fp32") for fam in FAMILIES] + [(K5, "fp8_e4m3fn")]


def global_batch(fam: TinyFamily) -> dict[str, torch.Tensor]:
    """Four samples of the family's tiny inputs (seeds 1…4), stacked along the batch dimension."""
    per_sample = [fam.inputs(seed) for seed in range(1, GLOBAL_BATCH + 1)]
    batch = {k: torch.cat([s[k] for s in per_sample]) for k in per_sample[0] if "positions" not in k}
    batch.update({k: v for k, v in per_sample[0].items() if "positions" in k})  # shared by every sample
    return batch


def take(batch: dict[str, torch.Tensor], share: slice) -> dict[str, torch.Tensor]:
    return {k: v if "positions" in k else v[share] for k, v in batch.items()}


def add_lora(fam: TinyFamily, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """LoRA on the family's targets with a seeded init and a random (non-zero) up matrix, float32."""
    modules = inject_lora(model, rank=4, alpha=4.0, targets=fam.family.lora_targets, within=fam.family.lora_within,
                          dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for path, m in modules.items():
            m.lora_up.copy_(0.1 * seeded_tensor(5, path, tuple(m.lora_up.shape)))
    return [p for m in modules.values() for p in (m.lora_down, m.lora_up)]


def lora_gradient(fam: TinyFamily, model: torch.nn.Module, params, inputs) -> torch.Tensor:
    """The flattened LoRA gradient of ``mean(prediction²)`` over ``inputs`` (a mean over equally sized samples),
    with every block checkpointed as in training."""
    model.train()
    with fam.gradient_checkpointing(model):
        loss = fam.run(model, inputs).float().pow(2).mean()
        loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


def worker(out: Path, files: dict[str, str]) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    report: dict = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
                    "share": ctx.share(list(range(8))), "slice": [ctx.share_slice(6).start, ctx.share_slice(6).stop],
                    "any": ctx.any_true(ctx.rank == 1), "none": ctx.any_true(False),
                    "sum": ctx.sum_values([ctx.rank + 1.0, 2.0]), "object": ctx.broadcast_object(f"from {ctx.rank}")}
    report["written"] = ctx.run_on_main(lambda: (out / "main_only.txt").write_text(str(ctx.rank)), "writing")
    try:
        ctx.run_on_main(lambda: 1 / 0, "writing a file")
    except Exception as exc:  # rank 0 re-raises its own error, the others learn of it
        report["failure"] = f"{type(exc).__name__}: {exc}"
    for fam, weights in CASES:
        case = f"{fam.id}_{weights}"
        model = fam.load(Path(files[fam.id]), weights)
        full = sum(p.numel() for p in model.parameters())
        shard_frozen_blocks(model, fam.blocks(model), ctx)
        local = sum(p.to_local().numel() for p in model.parameters())
        params = add_lora(fam, model)
        try:
            shard_frozen_blocks(model, fam.blocks(model), ctx)
        except DistributedError as exc:
            report[f"{case}_refused"] = str(exc)
        grad = lora_gradient(fam, model, params, take(global_batch(fam), ctx.share_slice(GLOBAL_BATCH)))
        ctx.reduce_gradients(params)
        report[f"{case}_sharded"] = [local, full]
        report[f"{case}_lora_is_plain"] = all(type(p) is torch.nn.Parameter for p in params)
        torch.save({"own": grad, "reduced": torch.cat([p.grad.reshape(-1) for p in params])},
                   out / f"{case}_rank{ctx.rank}.pt")
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    close_distributed(ctx)


def launch_worker(jobs: list[str]) -> None:
    """Train each ``<run folder>=<steps>`` of ``jobs`` to its step count with the headless launcher on this torchrun
    world."""
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    for job in jobs:
        run, _, steps = job.rpartition("=")
        launch(run, ctx=ctx, max_steps=int(steps))
    close_distributed(ctx)


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        launch_worker(sys.argv[2:])
    else:
        worker(Path(sys.argv[1]), {"k5": sys.argv[2], "ltx2": sys.argv[3]})
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_gloo_ranks_with_fsdp_give_the_one_process_gradient(tiny_file, tmp_path):
    files = [str(tiny_file(fam)) for fam in FAMILIES]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tmp_path), *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r0["backend"], r1["rank"]) == (2, "gloo", 1)
    assert (r0["share"], r1["share"]) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert (r0["slice"], r1["slice"]) == ([0, 3], [3, 6])
    assert r0["any"] and r1["any"] and not r0["none"] and r0["sum"] == r1["sum"] == [3.0, 4.0]
    assert r0["object"] == r1["object"] == "from 0"
    assert (tmp_path / "main_only.txt").read_text() == "0" and r1["written"] is None
    assert r0["failure"].startswith("ZeroDivisionError")
    assert r1["failure"].startswith("DistributedError: rank 0 failed writing a file: ZeroDivisionError")

    for fam, weights in CASES:
        case = f"{fam.id}_{weights}"
        local, full = r0[f"{case}_sharded"]
        assert local < 0.6 * full and r0[f"{case}_lora_is_plain"]  # base weights sharded, LoRA replicated
        assert "parameters require grad" in r0[f"{case}_refused"]
        model = fam.load(Path(tiny_file(fam)), weights)
        params = add_lora(fam, model)
        expected = lora_gradient(fam, model, params, global_batch(fam))
        g0, g1 = (torch.load(tmp_path / f"{case}_rank{r}.pt") for r in (0, 1))
        assert not torch.allclose(g0["own"], g1["own"], rtol=1e-3)  # the ranks saw different samples
        assert torch.equal(g0["reduced"], g1["reduced"])
        rel = (g0["reduced"] - expected).norm() / expected.norm()
        assert rel < 1e-5, (case, float(rel))


@pytest.mark.skipif("distributed" not in inspect.signature(train_lora).parameters,
                    reason="the trainer does not take a DistributedContext yet")
def test_two_ranks_train_the_one_process_run_and_resume_across_world_sizes(tiny_file, tmp_path):
    # Per family: 2 ranks train steps 1-2, then one process steps 3-4; one process steps 1-2, then 2 ranks steps
    # 3-4; both must give the losses and LoRA of one process training steps 1-4 (global batch 2, 2 micro-batches).
    runs = {}
    for fam in FAMILIES:
        recipe = setup_run(fam, tiny_file, tmp_path / fam.id, batch_size=2, grad_accum=2, max_steps=4,
                           lr_schedule="constant", warmup_steps=0)
        runs[fam.id] = {name: tmp_path / fam.id / name for name in ("straight", "two_then_one", "one_then_two")}
        for run in runs[fam.id].values():
            write_recipe(run, recipe)
        launch(runs[fam.id]["straight"], device="cpu")
        launch(runs[fam.id]["one_then_two"], device="cpu", max_steps=2)

    jobs = [f"{r['two_then_one']}=2" for r in runs.values()] + [f"{r['one_then_two']}=4" for r in runs.values()]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "launch", *jobs], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for fam in FAMILIES:
        straight = runs[fam.id]["straight"]
        launch(runs[fam.id]["two_then_one"], device="cpu", max_steps=4)
        expected_losses = torch.tensor(read_state(list_checkpoints(straight)[-1][1])["losses"])
        expected_lora = lora_vector(straight / "lora.safetensors")
        for name in ("two_then_one", "one_then_two"):
            run = runs[fam.id][name]
            got = torch.tensor(read_state(list_checkpoints(run)[-1][1])["losses"])
            assert len(got) == 4 and float((got - expected_losses).abs().max() / expected_losses.abs().max()) < 1e-5
            lora = lora_vector(run / "lora.safetensors")
            assert float((lora - expected_lora).norm() / expected_lora.norm()) < 1e-5, (fam.id, name)


def lora_vector(path: Path) -> torch.Tensor:
    return torch.cat([torch.cat([d.flatten(), u.flatten()]) for _, (d, u, _) in sorted(load_lora(path).layers.items())])


def test_torchrun_environment_is_read_and_checked():
    assert torchrun_env({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29500"}
    got = torchrun_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size, got.master_addr, got.master_port) == \
        (3, 4, 1, 2, "node0", 29500)
    with pytest.raises(DistributedError, match="RANK='x' is not an integer"):
        torchrun_env({**env, "RANK": "x"})
    with pytest.raises(DistributedError, match="do not fit WORLD_SIZE=4"):
        torchrun_env({**env, "RANK": "4"})
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        torchrun_env({**env, "MASTER_ADDR": ""})
    alone = init_distributed("cpu", environ={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    assert alone == SINGLE_PROCESS and init_distributed("cpu", environ={}) == SINGLE_PROCESS


def test_backends_follow_the_device_and_refuse_nccl_without_cuda():
    assert choose_backend("cpu", cuda_available=False) == "gloo"
    assert choose_backend("cuda", cuda_available=True, nccl_available=True) == "nccl"
    with pytest.raises(DistributedError, match="NCCL backend needs CUDA GPUs and none is visible.*gloo"):
        choose_backend("cpu", "nccl", cuda_available=False)
    with pytest.raises(DistributedError, match="only moves CUDA tensors; on the CPU use gloo"):
        choose_backend("cpu", "nccl", cuda_available=True)
    with pytest.raises(DistributedError, match="no NCCL"):
        choose_backend("cuda", cuda_available=True, nccl_available=False)
    with pytest.raises(DistributedError, match="gloo is for the CPU"):
        choose_backend("cuda", "gloo", cuda_available=True)
    with pytest.raises(DistributedError, match="one of nccl, gloo"):
        choose_backend("cpu", "mpi")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="NCCL backend needs CUDA"):
            init_distributed("cpu", backend="nccl", environ={})


def test_shares_are_disjoint_ordered_and_refuse_uneven_batches():
    batch = [7, 3, 9, 1, 4, 8]
    shares = [rank_share(batch, r, 3) for r in range(3)]
    assert shares == [[7, 3], [9, 1], [4, 8]] and sum(shares, []) == batch
    assert rank_share(batch, 0, 1) == batch
    with pytest.raises(DistributedError, match="global batch of 6 samples cannot be split evenly over 4"):
        rank_share(batch, 0, 4)
    with pytest.raises(ValueError, match="rank must be"):
        rank_share(batch, 3, 3)
    assert DistributedContext(rank=1, world_size=2).share_slice(4) == slice(2, 4)


def test_every_batch_of_an_epoch_is_checked_before_a_run():
    keys = [((64, 64), 17)] * 3 + [((80, 48), 17)]
    check_world_divides(keys, [1, 1, 2, 2], batch_size=2, world_size=2)  # groups of 4 and 2 samples
    check_world_divides(keys, [1, 1, 1, 1], batch_size=2, world_size=1)
    with pytest.raises(DistributedError, match=r"group \(\(64, 64\), 17\) has 3 samples .* a batch of 1"):
        check_world_divides(keys, [1, 1, 1, 2], batch_size=2, world_size=2)
    with pytest.raises(DistributedError, match="batch_size 3 it has a batch of 3"):
        check_world_divides(keys, [1, 1, 1, 3], batch_size=3, world_size=2)


def test_fsdp_and_block_swap_are_refused_together():
    check_sharding("fsdp", 0)
    check_sharding("replicate", 8)
    with pytest.raises(DistributedError, match="FSDP sharding and block swap .* cannot be combined.*replicate"):
        check_sharding("fsdp", 4)
    with pytest.raises(DistributedError, match="sharding must be one of fsdp, replicate"):
        check_sharding("zero3", 0)


def test_local_workers_are_refused_where_the_trainer_cannot_hand_the_run_over():
    check_local_workers(1, "mps", visible_gpus=0, blocks_to_swap=8, validation_clips=True)  # in ComfyUI: anything
    check_local_workers(4, "cuda", visible_gpus=4)
    check_local_workers(3, "cpu", visible_gpus=0)  # gloo processes; GPUs do not count
    check_local_workers(2)  # at queue time the device is not known yet
    with pytest.raises(DistributedError, match="gpus must be an integer ≥ 1; got 0"):
        check_local_workers(0)
    with pytest.raises(DistributedError, match="computes on 'mps': set gpus to 1"):
        check_local_workers(2, "mps")
    with pytest.raises(DistributedError, match=r"only 2 CUDA GPU\(s\) are visible.*set gpus to at most 2"):
        check_local_workers(3, "cuda", visible_gpus=2)
    with pytest.raises(DistributedError, match="cannot be combined with block swap.*--sharding replicate"):
        check_local_workers(2, "cuda", visible_gpus=2, blocks_to_swap=1)
    with pytest.raises(DistributedError, match="set validate_every to 0.*validation_loss_every"):
        check_local_workers(2, "cpu", validation_clips=True)


def test_one_process_needs_no_collectives():
    model = K5.build()
    params = add_lora(K5, model)
    grad = lora_gradient(K5, model, params, K5.inputs(1))
    assert shard_frozen_blocks(model, K5.blocks(model), SINGLE_PROCESS) is model
    SINGLE_PROCESS.reduce_gradients(params)
    all_reduce_gradients(params, op="sum")
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), grad)
    assert SINGLE_PROCESS.sum_values([1.5]) == [1.5] and SINGLE_PROCESS.any_true(True)
    assert SINGLE_PROCESS.run_on_main(lambda: 5, "x") == 5
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        all_reduce_gradients(params, op="max")
