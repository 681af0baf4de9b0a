"""Compile the Triton kernels for NVIDIA GPUs without a GPU (ahead-of-time, to cubin).

The interpreter tests (test_kernels.py) check the numerics but never run
Triton's GPU lowering, and under the interpreter bf16 ``tl.dot`` takes a
float32 detour (see ``DOT_F32`` in kernels/prefix_attention.py).  This test
lowers the real GPU code path (native fp16/bf16 ``tl.dot``, wgmma on sm_90,
mma on sm_80) to a cubin with the ptxas bundled in the Triton wheel, and checks
that the main configurations do not spill registers.

It uses Triton's compiler API (``ASTSource`` / ``GPUTarget``), which changes
between releases; it skips if that API or the NVIDIA backend is unavailable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Do not import triton here: on a machine without a GPU, test_kernels.py must be
# the first to import it (after setting TRITON_INTERPRET=1).
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
    pytest.skip("torch and triton are needed", allow_module_level=True)

# Arguments that are multiples of 16 in any real call (Triton's JIT adds the
# same divisibility hints when it specialises on the actual values).
DIV16 = {
    "Q", "K_cache", "V_cache", "O_part", "LSE_part", "Out", "LSE_out",
    "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
    "stride_qb", "stride_qt", "stride_qh", "stride_op", "stride_on", "stride_out",
}

CONFIGS = [
    # (id, kernel name, constexprs, dtype, num_warps, num_stages, cc, expected instruction)
    ("prefix-bf16-d128-m64-sm90", "_prefix_attn_kernel",  # the GPU default tiling
     dict(NUM_KV_HEADS=4, GQA=8, HEAD=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, SINGLE_GROUP=True, DOT_F32=False),
     "bf16", 4, 2, 90, "wgmma"),
    ("prefix-bf16-d128-m128-sm90", "_prefix_attn_kernel",
     dict(NUM_KV_HEADS=4, GQA=8, HEAD=128, BLOCK_SIZE=16, BLOCK_M=128, BLOCK_N=64, SINGLE_GROUP=True, DOT_F32=False),
     "bf16", 8, 3, 90, "wgmma"),
    ("prefix-fp16-d64-bs64-sm90", "_prefix_attn_kernel",
     dict(NUM_KV_HEADS=8, GQA=4, HEAD=64, BLOCK_SIZE=64, BLOCK_M=64, BLOCK_N=64, SINGLE_GROUP=False, DOT_F32=False),
     "fp16", 4, 2, 90, "wgmma"),
    ("prefix-bf16-d128-m128-sm80", "_prefix_attn_kernel",
     dict(NUM_KV_HEADS=4, GQA=8, HEAD=128, BLOCK_SIZE=16, BLOCK_M=128, BLOCK_N=64, SINGLE_GROUP=True, DOT_F32=False),
     "bf16", 8, 2, 80, "mma.sync"),
    ("suffix-bf16-d128-decode-fused-sm90", "_suffix_attn_kernel",
     dict(NUM_KV_HEADS=4, GQA=8, HEAD=128, BLOCK_SIZE=16, BLOCK_M=16, BLOCK_N=64, CAUSAL=False, PART_BASE=8, FUSE_MERGE=True,
          WRITE_LSE=False, DOT_F32=False), "bf16", 4, 2, 90, "mma"),
    ("suffix-fp16-d128-causal-sm90", "_suffix_attn_kernel",
     dict(NUM_KV_HEADS=4, GQA=8, HEAD=128, BLOCK_SIZE=32, BLOCK_M=64, BLOCK_N=64, CAUSAL=True, PART_BASE=8, FUSE_MERGE=False,
          WRITE_LSE=True, DOT_F32=False), "fp16", 4, 2, 90, "mma"),
    ("merge-bf16-d128-sm90", "_merge_kernel", dict(NUM_PARTS=9, HEAD=128, BLOCK_R=16, WRITE_LSE=True), "bf16", 4, 1, 90, None),
]


# The compilation runs in a child process: under TRITON_INTERPRET=1 (set by
# test_kernels.py on machines without a GPU) kernels are wrapped for the
# interpreter and cannot be lowered, so the child imports them afresh without it.
_CHILD = r"""
import json, os, re, shutil, subprocess, sys, tempfile
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:
    print(json.dumps({"skip": f"triton compiler API unavailable: {e}"})); sys.exit(0)
from kernels import prefix_attention as pa

DIV16 = set(json.loads(sys.argv[1]))
CONFIGS = json.loads(sys.argv[2])

def arg_type(name, dtype):
    if name in ("Q", "K_cache", "V_cache", "Out"):
        return "*" + dtype
    if name in ("PrefixTables", "PrefixLens", "GroupOffsets", "SuffixTables", "SuffixLens"):
        return "*i32"
    if name in ("O_part", "LSE_part", "LSE_out"):
        return "*fp32"
    return "fp32" if name == "qk_scale" else "i32"

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(tool):
    tool = shutil.which("cuobjdump")
results = {}
for cid, kname, constexprs, dtype, warps, stages, cc, instr in CONFIGS:
    fn = getattr(pa, kname)
    sig = {n: ("constexpr" if n in constexprs else arg_type(n, dtype)) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in DIV16}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:
        results[cid] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        continue
    r = {"has_instr": instr is None or instr in k.asm["ptx"], "regs": None, "stack": None}
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        if m:
            r["regs"], r["stack"] = int(m.group(1)), int(m.group(2))
    results[cid] = r
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(sorted(DIV16)), json.dumps(CONFIGS)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"compile child failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_compiles_for_gpu_without_spills(compiled, cfg):
    cid, instr = cfg[0], cfg[-1]
    r = compiled[cid]
    if "error" in r:
        if "ptxas" in r["error"] or "backend" in r["error"].lower():
            pytest.skip(f"NVIDIA backend unavailable: {r['error'][:200]}")
        pytest.fail(r["error"])
    assert r["has_instr"], f"expected tensor-core instruction {instr!r} in the PTX"
    if r["stack"] is None:
        pytest.skip("cuobjdump not available to read register usage")
    assert r["stack"] == 0, f"register spills: {r['regs']} registers, {r['stack']} bytes of stack"
