"""The compile checker's parsing and verdicts on captured tool output, plus one real compile of one kernel."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_checker():
    spec = importlib.util.spec_from_file_location("kernels_check", REPO / "bench" / "kernels_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kc = _load_checker()

# cuobjdump --dump-resource-usage on a Triton cubin (sm_90a, _lora_s_kernel with dropout), verbatim.
RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _lora_s_kernel:
  REG:128 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _other:
  REG:40 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# The ptxas -v log of Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG=1), verbatim but for the second function,
# which has the layout of nvcc's log of a kernel with a 2 KB local array.
PTXAS_LOG = """ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_lora_s_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _lora_s_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 128 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 3239.175 ms
ptxas info    : Compiling entry function '_fused_gemm_kernel' for 'sm_90a'
ptxas info    : Function properties for _fused_gemm_kernel
    3824 bytes stack frame, 6136 bytes spill stores, 7764 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 3824 bytes cumulative stack size, 1024 bytes smem, 60 bytes cmem[0]
"""

# cuobjdump -sass layout (absolute branch targets, encoding words on the next line): a loop 0x20..0x50 holding one
# HGMMA, a larger loop 0x70..0xf0 without tensor-core work, and the exit trap branching to itself.
SASS_CUOBJDUMP = """
	code for sm_90a
	.target	sm_90a

		Function : _kernel
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                   /* 0x00000a00ff017b82 */
                                                                                            /* 0x000fe20000000800 */
        /*0010*/               @P0 BRA 0x60 ;                                               /* 0x000000f400800947 */
                                                                                            /* 0x000fe20000000800 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R82+0x7000], desc[UR20][R18.64], !PT ;  /* 0x0 */
        /*0030*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;   /* 0x0 */
        /*0040*/                   IMAD.HI.U32 R120, R3, -0x3361d2af, RZ ;                 /* 0x0 */
        /*0050*/              @!P1 BRA 0x20 ;                                               /* 0x0 */
        /*0060*/                   NOP ;                                                    /* 0x0 */
        /*0070*/                   LOP3.LUT R21, R20, 0x3, RZ, 0xc0, !PT ;                 /* 0x0 */
        /*0080*/                   IADD3 R4, R4, 0x1, RZ ;                                  /* 0x0 */
        /*0090*/                   FSETP.GE.AND P6, PT, R7, R8, PT ;                       /* 0x0 */
        /*00a0*/                   STG.E desc[UR4][R2.64], R4 ;                            /* 0x0 */
        /*00b0*/                   IADD3 R5, R5, 0x1, RZ ;                                  /* 0x0 */
        /*00c0*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;                       /* 0x0 */
        /*00d0*/                   IADD3 R6, R6, 0x1, RZ ;                                  /* 0x0 */
        /*00e0*/                   IADD3 R7, R7, 0x1, RZ ;                                  /* 0x0 */
        /*00f0*/               @P0 BRA 0x70 ;                                               /* 0x0 */
        /*0100*/                   EXIT ;                                                   /* 0x0 */
        /*0110*/                   BRA 0x110;                                               /* 0x0 */
		..........
"""

# nvdisasm layout: label targets.
SASS_NVDISASM = """
        .text._kernel:
        /*0000*/                   S2R R75, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDS.128 R8, [R2] ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0050*/                   EXIT ;
.L_x_2:
        /*0060*/                   BRA `(.L_x_2);
"""


def test_parse_resource_usage_reads_every_function():
    usage = kc.parse_resource_usage(RESOURCE_USAGE)
    assert usage["_lora_s_kernel"] == {"REG": 128, "STACK": 0, "SHARED": 1024, "LOCAL": 0, "CONSTANT[0]": 600,
                                       "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert usage["_other"]["STACK"] == 16 and usage["_other"]["LOCAL"] == 8 and usage["_other"]["REG"] == 40


def test_parse_ptxas_log_splits_by_function_and_reads_spills():
    log = kc.parse_ptxas_log(PTXAS_LOG)
    assert log["_lora_s_kernel"] == {"stack_frame": 0, "spill_stores": 0, "spill_loads": 0, "registers": 128,
                                     "smem": 0}
    assert log["_fused_gemm_kernel"] == {"stack_frame": 3824, "spill_stores": 6136, "spill_loads": 7764,
                                         "registers": 255, "smem": 1024}


def test_sass_loops_from_cuobjdump_listing():
    instructions = kc.parse_sass(SASS_CUOBJDUMP)
    assert len(instructions) == 18
    assert instructions[1].opcode == "BRA" and instructions[1].branch_target == 0x60
    loops = kc.find_loops(instructions)
    assert [(hex(lp.start), hex(lp.end), lp.instructions, lp.mma) for lp in loops] == [
        ("0x20", "0x50", 4, 1), ("0x70", "0xf0", 9, 0)]  # the self-branch at 0x110 is no loop
    main = kc.main_loop(instructions)
    assert (main.start, main.instructions) == (0x20, 4)  # the tensor-core loop wins over the larger one


def test_sass_loops_from_nvdisasm_labels():
    instructions = kc.parse_sass(SASS_NVDISASM)
    assert [i.opcode for i in instructions][:3] == ["S2R", "BRA", "LDS.128"]
    assert instructions[1].branch_target == 0x50
    main = kc.main_loop(instructions)
    assert (main.start, main.end, main.instructions, main.mma) == (0x20, 0x40, 3, 1)


def test_main_loop_without_tensor_cores_takes_the_largest_and_none_without_loops():
    no_mma = [kc.Instruction(0x0, "IADD3", None), kc.Instruction(0x10, "BRA", 0x0),
              kc.Instruction(0x20, "IADD3", None), kc.Instruction(0x30, "IADD3", None),
              kc.Instruction(0x40, "BRA", 0x20)]
    assert kc.main_loop(no_mma).start == 0x20  # 3 instructions against 2
    assert kc.main_loop(no_mma[:1]) is None


def test_per_element_counts_thread_instructions():
    # The S pass with dropout on sm_90: 3790 loop instructions, 4 warps, BLOCK_M 64 x BLOCK_K 128 -> 59.2
    config = {"LORA_DROPOUT": True, "R_BLOCK": 16, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4}
    tile = kc.streamed_tile_elements(config)
    assert tile == 64 * 128
    assert kc.per_element(3790, 4, tile) == pytest.approx(59.22, abs=0.01)
    assert kc.streamed_tile_elements({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}) is None  # a GEMM


def test_register_file_bound():
    assert kc.max_warps_for_registers(255) == 8  # 255 -> 256 per thread, 8192 per warp
    assert kc.max_warps_for_registers(128) == 16
    assert kc.max_warps_for_registers(32) == 64


def _job(target="sm_90", warps=8):
    return kc.CompileJob(kernel=None, target=kc.TARGETS[target], signature={}, constexprs={}, attrs={}, options={},
                         key="k", config={"BLOCK_M": 64, "num_warps": warps}, specialized=[])


def _result(**overrides):
    result = dict(regs=128, stack=0, stack_frame=0, local=0, spill_stores=0, spill_loads=0, smem=1024, tmem=0)
    result.update(overrides)
    return result


def test_problems_flags_each_violation_and_passes_a_clean_compile():
    assert kc.problems(_job(), _result()) == []
    assert "spills" in kc.problems(_job(), _result(spill_stores=4, spill_loads=4, stack=8, stack_frame=8))[0]
    assert kc.problems(_job(), _result(stack=16))[0].startswith("stack 16 B")
    # 240 KiB fits no target; 200 KiB fits sm_90 (227 KiB) but not sm_80 (163 KiB)
    assert "shared memory" in kc.problems(_job("sm_90"), _result(smem=240 * 1024))[0]
    assert kc.problems(_job("sm_90"), _result(smem=200 * 1024)) == []
    assert "shared memory" in kc.problems(_job("sm_80"), _result(smem=200 * 1024))[0]
    assert "register file" in kc.problems(_job(warps=16), _result(regs=255))[0]
    assert kc.problems(_job(), {"error": "CompilationError: boom"}) == ["compile error: CompilationError: boom"]


def test_problems_flags_an_s_or_da_loop_over_eight_instructions_per_element():
    x_pass = SimpleNamespace(__name__="_lora_x_pass_kernel")
    config = {"LORA_DROPOUT": True, "BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4}  # 64 elements per thread
    job = dataclasses.replace(_job(), kernel=x_pass, config=config, uses=[(kc.Scenario(r=16, p=0.1), "fwd")])
    assert kc.problems(job, _result(loop_instructions=512)) == []  # 8.0
    assert "per element > 8" in kc.problems(job, _result(loop_instructions=520))[0]
    assert kc.problems(dataclasses.replace(job, config={**config, "LORA_DROPOUT": False}),
                       _result(loop_instructions=520)) == []  # the target is for the dropout loops
    rank_64 = dataclasses.replace(job, uses=[(kc.Scenario(r=64, p=0.1), "fwd")])
    assert kc.problems(rank_64, _result(loop_instructions=900)) == []  # reported, not the target's setting


def test_problems_flags_a_dora_dropout_forward_k_loop_over_its_target():
    gemm = SimpleNamespace(__name__="_fused_gemm_kernel")
    config = {"DORA_DROPOUT": True, "HAS_COL_SCALE": True, "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 128,
              "BLOCK_K": 64, "num_warps": 8}  # 32 elements of the X tile per thread
    job = dataclasses.replace(_job(), kernel=gemm, config=config, uses=[(kc.Scenario(variant="dora", p=0.1), "fwd")])
    assert kc.twin_loop_cost(job, _result(inner_loop_instructions=314)) == pytest.approx(314 / 32)
    assert kc.problems(job, _result(inner_loop_instructions=384)) == []  # 12.0
    assert "DoRA dropout K loop 12.03" in kc.problems(job, _result(inner_loop_instructions=385))[0]
    small_tile = dataclasses.replace(job, config={**config, "BLOCK_N": 64})
    assert kc.problems(small_tile, _result(inner_loop_instructions=900)) == []  # reported, not the target's
    dx = dataclasses.replace(job, config={**config, "HAS_COL_SCALE": False})
    assert kc.twin_loop_cost(dx, _result(inner_loop_instructions=900)) is None


def test_shared_memory_limits_are_the_opt_in_maxima():
    assert kc.TARGETS["sm_80"].smem_per_block_optin == 163 * 1024 == 166912
    assert kc.TARGETS["sm_90"].smem_per_block_optin == 227 * 1024 == 232448


def test_full_grid_covers_the_issue_product():
    grid = kc.scenarios("full")
    main = [s for s in grid if s.variant == "linear"]
    assert {s.dtype for s in main} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
    assert {s.r for s in main} == {8, 16, 64, 128, 256} and {s.p for s in main} == {0.0, 0.1}
    assert {s.m for s in main} == {48, 1024, 16384} and {s.deterministic for s in main} == {False, True}
    assert len(main) == 4 * 5 * 2 * 3 * 2
    assert {s.variant for s in grid} == set(kc.VARIANTS)
    dora = [s for s in grid if s.variant in kc.DORA_VARIANTS]
    assert {s.dtype for s in dora} == {"bf16", "fp16"} and {s.p for s in dora} == {0.0, 0.1}
    assert {s.m for s in dora} == {48, 1024, 16384} and {s.deterministic for s in dora} == {False, True}


def test_load_cache_ignores_unreadable_reports(tmp_path):
    assert kc.load_cache(tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert kc.load_cache(tmp_path / "bad.json") == {}
    (tmp_path / "ok.json").write_text(json.dumps({"compiles": [{"key": "abc", "regs": 3}]}))
    assert kc.load_cache(tmp_path / "ok.json") == {"abc": {"key": "abc", "regs": 3}}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_native_check_flags_a_stack_frame(tmp_path):
    (tmp_path / "local_array.cu").write_text(
        "__global__ void pick(float* y, const float* x, const int* idx, int n) {\n"
        "  float buf[512];\n"
        "  for (int j = 0; j < 512; ++j) buf[j] = x[j * n + threadIdx.x];\n"
        "  y[threadIdx.x] = buf[idx[threadIdx.x] & 511];\n"
        "}\n")
    results = kc.check_native(tmp_path)
    assert [item["target"] for item in results] == ["sm_80", "sm_90"]
    assert all(item["stack"] == 2048 and item["problems"] for item in results)


def test_native_check_skips_without_sources(tmp_path, capsys):
    assert kc.check_native(tmp_path) == []
    assert "skipped" in capsys.readouterr().out


@pytest.mark.slow  # two fresh processes (~10 s of CPU each: imports, recording, one ~3 s compile)
def test_one_real_compile_and_the_cache(tmp_path):
    """Record the quick grid's launches, compile the mask kernel for sm_90, read its cubin; rerun from the cache."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(REPO / "bench" / "kernels_check.py"), "--grid", "quick", "--targets", "sm_90",
               "--only", "_keep_mask_kernel", "--recheck", "0", "--jobs", "1", "--out", str(tmp_path / "kc")]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    report = json.loads((tmp_path / "kc.json").read_text())
    (row,) = report["compiles"]
    assert row["kernel"] == "_keep_mask_kernel" and row["target"] == "sm_90" and row["problems"] == []
    assert 0 < row["regs"] <= 255 and row["spill_stores"] == 0 and row["sass"] > 10
    assert "PASS" in (tmp_path / "kc.md").read_text()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "1 compiles reused" in second.stdout and "0 to compile" in second.stdout


def test_committed_report_covers_the_dora_dropout_gemms_on_both_targets():
    """The two-accumulator DoRA GEMMs (forward and dX, with and without biases) are in the committed report for
    sm_80 and sm_90, without spills or stack: what CI reuses as its cache."""
    report = json.loads((Path(kc.__file__).resolve().parent.parent / "docs" / "kernels_check.json").read_text())
    twins = [row for row in report["compiles"] if row["config"].get("DORA_DROPOUT")]
    seen = {(row["target"], bool(row["config"]["HAS_COL_SCALE"]), bool(row["config"]["HAS_BIAS"])) for row in twins}
    assert seen >= {(t, fwd, bias) for t in ("sm_80", "sm_90") for fwd, bias in ((True, False), (True, True),
                                                                                   (False, False))}
    assert all(not (row["spill_stores"] or row["spill_loads"] or row["stack"] or row["stack_frame"]) for row in twins)


BINDING = """#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {
at::Tensor keep_mask_cuda(const at::Tensor& x, int64_t seed, double dropout_p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  (void)stream;
  (void)seed;
  (void)dropout_p;
  return x;
}
}  // namespace

TORCH_LIBRARY_IMPL(coto_kernels_native, CUDA, m) { m.impl("keep_mask", &keep_mask_cuda); }
"""


@pytest.mark.slow  # three ~10 s C++ builds
@pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("nvcc", "c++", "cc", "nm")),
                    reason="needs nvcc, a C/C++ compiler and nm")
def test_cuda_binding_check_builds_and_loads_the_binding(tmp_path):
    """A binding using c10/cuda and cudaStream_t builds on a CPU torch and loads beside the CPU ops (CUDA kernel
    registered); a registration whose C++ signature does not match the op's schema (which aborts the importing
    process on a GPU machine) and a type error each fail with the reason; a .cpp without c10/cuda is skipped."""
    pytest.importorskip("coto_kernels.kernels.lora_native", exc_type=ImportError)
    (tmp_path / "cpu_only.cpp").write_text("int broken(\n")
    (tmp_path / "binding.cpp").write_text(BINDING)
    (good,) = kc.check_cuda_bindings(tmp_path)
    assert good["file"].endswith("binding.cpp") and good["problems"] == [] and good["cuda_ops"] == ["keep_mask"]

    (tmp_path / "binding.cpp").write_text(BINDING.replace("int64_t seed", "double seed"))
    (mismatch,) = kc.check_cuda_bindings(tmp_path)
    assert len(mismatch["problems"]) == 1 and "does not load" in mismatch["problems"][0]
    assert "Mismatch in kernel C++ signatures" in mismatch["problems"][0]

    (tmp_path / "binding.cpp").write_text(BINDING.replace("return x;", "return stream;"))
    (type_error,) = kc.check_cuda_bindings(tmp_path)
    assert len(type_error["problems"]) == 1 and "build failed" in type_error["problems"][0]
    assert "binding.cpp" in type_error["problems"][0] and "error" in type_error["problems"][0]
