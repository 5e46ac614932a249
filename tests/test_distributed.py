"""CoTo under data parallelism: 2 gloo ranks on the CPU (DDP, FSDP2, FSDP1), gate agreement, engine errors.

The multi-process scenarios run in ONE spawn of two ranks (imports dominate the cost), each writing its
results to a file; the tests below assert on those files. Every collective has a 60 s timeout and the spawn a
hard deadline, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import batch_for, tiny_peft_model
from torch import nn

import coto_kernels
from coto_kernels import distributed as coto_dist
from coto_kernels.callbacks import check_trainer_args

WORLD = 2
STEPS = 6
TOTAL_STEPS = 8
LAYERS = 3
SPAWN_DEADLINE_S = 400  # a hang detector, not a timing: a loaded 2-core machine took ~300 s


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor
            out[_clean(name)] = full.detach().clone()
    return out


def _grad_none(model: nn.Module) -> list[str]:
    return sorted(_clean(n) for n, p in model.named_parameters() if p.requires_grad and p.grad is None)


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    return batch_for("llama", batch=2 * WORLD, seq=8, seed=100 + step)


def _blocks(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if name.endswith("model.layers") and isinstance(module, nn.ModuleList):
            return module
    raise AssertionError("no decoder blocks")


def _train(model: nn.Module, controller, wrapped: nn.Module, rank: int | None, probe_blocks: bool = True) -> dict:
    """STEPS AdamW steps of CoTo; rank None = one process on the whole global batch."""
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    controller.attach_optimizer(optimizer)
    record = {"gates": [], "grad_none": [], "graph": [], "stepped_without_grad": []}
    # what the optimizer sees (after CoTo's own step pre-hook): adapters without a gradient are not updated
    optimizer.register_step_pre_hook(lambda *_: record["stepped_without_grad"].append(_grad_none(model)))
    inputs_have_graph: list[list[bool]] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: inputs_have_graph[-1].append(a[0].grad_fn is not None),
                                         with_kwargs=True) for i, b in enumerate(_blocks(model)) if probe_blocks]
    for step in range(STEPS):
        batch = _global_batch(step)
        if rank is not None:
            batch = {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}
        inputs_have_graph.append([])
        wrapped(**batch).loss.backward()
        record["gates"].append([bool(g) for g in controller.gates])
        record["grad_none"].append(_grad_none(model))
        record["graph"].append(inputs_have_graph[-1])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.step()
    for h in hooks:
        h.remove()
    return record


def _build(seed: int | None = None, check_gates: bool = True):
    model = tiny_peft_model("llama", num_layers=LAYERS)
    controller = coto_kernels.patch(model, total_steps=TOTAL_STEPS, initial_p=0.3, seed=seed,
                                    check_gates=check_gates)
    model.train()
    return model, controller


def _expect_error(fn, *exc_types) -> str:
    try:
        fn()
    except exc_types as err:  # noqa: PERF203
        return f"{type(err).__name__}: {err}"
    return "no error"


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        # 1. seed=None: each rank's local draw differs (different torch seeds), rank 0's is broadcast.
        torch.manual_seed(1234 + rank)
        model, controller = _build(seed=None)
        results["seed"] = controller.seed
        # 2. DDP, find_unused_parameters=True: compare with one process (done by the parent).
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        results["ddp"] = _train(model, controller, ddp, rank)
        torch.save(_lora_state(model), os.path.join(out_dir, f"ddp_{rank}.pt"))
        # 3. FSDP2: fully_shard each block, then the root.
        from torch.distributed.fsdp import fully_shard

        model, controller = _build(seed=results["seed"])
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        results["fsdp2"] = _train(model, controller, model, rank)
        torch.save(_lora_state(model), os.path.join(out_dir, f"fsdp2_{rank}.pt"))
        # 4. FSDP1 with use_orig_params=True (flat parameters are rejected, see 7) and, as PEFT's
        # fsdp_auto_wrap_policy does, each LoRA matrix in its own unit: the frozen base stays out of autograd.
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        policy = functools.partial(lambda_auto_wrap_policy,
                                   lambda_fn=lambda m: isinstance(m, nn.Linear) and m.weight.requires_grad)
        model, controller = _build(seed=results["seed"])
        fsdp1 = FSDP(model, use_orig_params=True, auto_wrap_policy=policy, device_id=torch.device("cpu"))
        results["fsdp1"] = _train(model, controller, fsdp1, rank)
        with FSDP.summon_full_params(fsdp1):
            torch.save(_lora_state(fsdp1), os.path.join(out_dir, f"fsdp1_{rank}.pt"))
        # 4b. DDP + torch.compile: gates as data (one graph), zero grads of skipped adapters cleared before the step
        from torch._dynamo.backends.debugging import aot_eager

        compiles = [0]

        def counting_backend(gm, example_inputs):
            compiles[0] += 1
            return aot_eager(gm, example_inputs)

        model, controller = _build(seed=results["seed"])
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        results["ddp_compile"] = _train(model, controller, torch.compile(ddp, backend=counting_backend), rank,
                                        probe_blocks=False)
        results["ddp_compile"]["compiles"] = compiles[0]
        torch.save(_lora_state(model), os.path.join(out_dir, f"ddp_compile_{rank}.pt"))
        # 5. Gates differing across ranks (different explicit seeds): caught at the first DDP training forward.
        model, controller = _build(seed=rank)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        batch = {k: v[:2] for k, v in _global_batch(0).items()}
        results["mismatch_forward"] = _expect_error(lambda: ddp(**batch), coto_dist.GateMismatchError)
        # 5b. The same with patch(check_gates=False): the first-forward all-gather is not made.
        ddp = nn.parallel.DistributedDataParallel(_build(seed=rank, check_gates=False)[0], find_unused_parameters=True)
        results["mismatch_forward_unchecked"] = _expect_error(lambda: ddp(**batch), coto_dist.GateMismatchError)
        # 6. Same seed, but one rank skipped a controller.step(): the explicit check catches it.
        model, controller = _build(seed=7)
        if rank == 1:
            controller.step()
        results["mismatch_step"] = _expect_error(lambda: coto_dist.check_gates_consistent(controller),
                                                 coto_dist.GateMismatchError)
        # 7. Engine options CoTo cannot run under, and the wrong order.
        ddp = nn.parallel.DistributedDataParallel(_build(seed=7)[0], find_unused_parameters=False)
        results["find_unused_false"] = _expect_error(lambda: ddp(**batch), RuntimeError)
        ddp = nn.parallel.DistributedDataParallel(_build(seed=7)[0], find_unused_parameters=True, static_graph=True)
        results["static_graph"] = _expect_error(lambda: ddp(**batch), RuntimeError)
        flat = FSDP(tiny_peft_model("llama", num_layers=LAYERS), use_orig_params=False, auto_wrap_policy=policy,
                    device_id=torch.device("cpu"))
        results["fsdp1_flat"] = _expect_error(lambda: coto_dist.check_engine(flat), RuntimeError)
        wrapped_first = nn.parallel.DistributedDataParallel(tiny_peft_model("llama", num_layers=LAYERS),
                                                            find_unused_parameters=True)
        results["patch_after_ddp"] = _expect_error(lambda: coto_kernels.patch(wrapped_first), RuntimeError)
        results["ok"] = True
    except Exception:  # report instead of dying, so the other rank is not left waiting on a file
        results["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("coto_ddp"))
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the 2-rank gloo run did not finish within {SPAWN_DEADLINE_S} s (a collective hung)")
    results = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
        assert "error" not in results[-1], f"rank {rank} failed:\n{results[-1]['error']}"
    return SimpleNamespace(results=results, out_dir=out_dir)


def _single_process_reference(seed: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared CPU
    try:
        model, controller = _build(seed=seed)
        record = _train(model, controller, model, None)
    finally:
        torch.set_num_threads(threads)
    return _lora_state(model), record


@pytest.fixture(scope="module")
def reference(ranks):
    return _single_process_reference(ranks.results[0]["seed"])


pytestmark = pytest.mark.slow


def test_seed_is_broadcast_from_rank_0(ranks):
    assert ranks.results[0]["seed"] == ranks.results[1]["seed"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1", "ddp_compile"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(ranks, reference, engine):
    ref_state, ref_record = reference
    for rank in range(WORLD):
        record = ranks.results[rank][engine]
        # same gates on every rank and in the single process, and they changed during the run
        assert record["gates"] == ref_record["gates"]
        assert len({tuple(g) for g in record["gates"]}) >= 3
        state = torch.load(os.path.join(ranks.out_dir, f"{engine}_{rank}.pt"))
        assert state.keys() == ref_state.keys()
        for name, value in state.items():
            torch.testing.assert_close(value, ref_state[name], rtol=1e-5, atol=1e-6, msg=f"{engine} {name}")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
def test_gated_off_adapters_keep_grad_none_and_backward_stops_below(ranks, reference, engine):
    _, ref_record = reference
    for step, gates in enumerate(ref_record["gates"]):
        off_blocks = [f".layers.{i}." for i, on in enumerate(gates) if not on]
        expected = ref_record["grad_none"][step]
        assert len(expected) == 2 * 7 * len(off_blocks)  # A and B of the 7 projections of each off block
        assert all(any(b in n for b in off_blocks) for n in expected)
        assert ref_record["stepped_without_grad"][step] == expected
    for rank in range(WORLD):
        record = ranks.results[rank][engine]
        for step, gates in enumerate(record["gates"]):
            if engine != "fsdp1":  # FSDP1's local views of parameters outside this rank's shard never get a grad
                # right after backward: DDP's find_unused_parameters and FSDP2 leave skipped adapters at None
                assert record["grad_none"][step] == ref_record["grad_none"][step], (engine, rank, step)
                assert record["stepped_without_grad"][step] == ref_record["grad_none"][step], (engine, rank, step)
            # a block's input has an autograd graph only when some block below it is on: backward stops there
            lowest = gates.index(True)
            assert record["graph"][step] == [i > lowest for i in range(LAYERS)], (engine, rank, step)


def test_ddp_compile_compiles_once_and_steps_only_active_adapters(ranks, reference):
    _, ref_record = reference
    for rank in range(WORLD):
        record = ranks.results[rank]["ddp_compile"]
        assert record["compiles"] == 1
        # the static graph gives skipped adapters zero grads; the optimizer sees None (clear_inactive_grads)
        assert record["stepped_without_grad"] == ref_record["grad_none"]


def test_differing_gates_are_detected(ranks):
    for result in ranks.results:
        assert result["mismatch_forward"].startswith("GateMismatchError: CoTo gates differ across ranks")
        assert result["mismatch_forward_unchecked"] == "no error"  # patch(check_gates=False)
        assert result["mismatch_step"].startswith("GateMismatchError")
        assert "step 0" in result["mismatch_step"] and "step 1" in result["mismatch_step"]


def test_unsupported_engine_options_and_order_fail_early(ranks):
    for result in ranks.results:
        assert "find_unused_parameters=True" in result["find_unused_false"]
        assert "ddp_find_unused_parameters=True" in result["find_unused_false"]
        assert "static_graph=True" in result["static_graph"]
        assert "use_orig_params=True" in result["fsdp1_flat"]
        assert "Patch the PEFT model first, then wrap it" in result["patch_after_ddp"]


# -- single-process checks (no process group needed) -------------------------------------------------------------


def test_checks_are_no_ops_without_a_process_group():
    model, controller = _build(seed=0)
    assert coto_dist.world_size() == 1
    coto_dist.check_gates_consistent(controller)
    assert coto_dist.broadcast_seed(5) == 5
    a = coto_dist.gate_fingerprint(controller)
    controller.step()
    assert coto_dist.gate_fingerprint(controller) != a


def test_trainer_args_that_break_coto_fail_at_construction(monkeypatch):
    model, controller = _build(seed=0)
    args = SimpleNamespace(world_size=2, deepspeed=None, ddp_static_graph=None, ddp_find_unused_parameters=False,
                           fsdp=None)
    with pytest.raises(RuntimeError, match="ddp_find_unused_parameters=True"):
        check_trainer_args(args, model, controller)
    args.ddp_find_unused_parameters = None  # the Trainer's default for a PeftModel is True
    check_trainer_args(args, model, controller)
    args.ddp_static_graph = True
    with pytest.raises(RuntimeError, match="ddp_static_graph"):
        check_trainer_args(args, model, controller)
    args.ddp_static_graph, args.deepspeed = None, "ds_config.json"
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        check_trainer_args(args, model, controller)
    args.deepspeed, args.world_size, args.ddp_find_unused_parameters = None, 1, False
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_trainer_args(args, model, controller)  # one process: DDP is not used


def test_clear_inactive_grads_leaves_adamw_off_the_skipped_adapters():
    model, controller = _build(seed=0)
    controller.set_override([False, True, True])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    handle = controller.attach_optimizer(optimizer)
    for p in model.parameters():  # zero-filled grads, as a compiled graph or zero_grad(set_to_none=False) leave
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.0." in n and "lora_" in n}
    model(**batch_for("llama")).loss.backward()
    optimizer.step()
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    handle.remove()


def _torchrun_example(*extra: str, timeout: int = 150) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), os.path.join(root, "examples", "train_ddp.py"), "--cpu",
           "--steps", "6", *extra]
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([*cmd, "--output-dir", out], env=env, cwd=out, capture_output=True, text=True,
                              timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_trainer_example_runs_on_two_processes_with_and_without_checkpointing():
    """examples/train_ddp.py through torchrun: the README's multi-process Trainer recipe, end to end."""
    plain = _torchrun_example()
    checkpointed = _torchrun_example("--gradient-checkpointing")
    assert "CoTo after 6 steps" in plain
    checksum = [line for line in plain.splitlines() if line.startswith("adapter checksum")]
    assert checksum and checksum == [line for line in checkpointed.splitlines() if line.startswith("adapter checksum")]
