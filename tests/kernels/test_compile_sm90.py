"""The compiled path, which the interpreter never takes: the kernels compile for sm_90 (Hopper)
on this CPU machine, with and without the measuring switches; the PDL switches emit
griddepcontrol; and the K/V loads are software pipelined: with the block ids loaded one tile
ahead (PREFETCH_BLOCK_IDS) the loop waits for all but the newest copies (TTGIR async_wait
num > 0), without it for all of them (num = 0: no tile in flight while computing). Arguments are
marked divisible by 16, as Triton specializes them at a real launch (without that no load is
vectorized, so none is pipelined). Runs in a child process: kernels decorated under
TRITON_INTERPRET=1 (as the test session imports them) cannot be compiled."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    r"""
    import importlib, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    suffix = importlib.import_module("edgeprompt_vllm.kernels.paged_suffix")
    prefix = importlib.import_module("edgeprompt_vllm.kernels.relay_prefix")
    handoff = importlib.import_module("edgeprompt_vllm.kernels.handoff")
    FP32 = {"part_out_ptr", "part_lse_ptr", "prefix_out_ptr", "prefix_lse_ptr", "lse_ptr",
            "own_out_ptr", "own_lse_ptr"}
    FP16 = {"out_ptr", "query_ptr", "key_cache_ptr", "value_cache_ptr"}


    def compile_asm(kernel, consts):
        consts = dict(consts)
        opts = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp32" if name in FP32 else "*fp16" if name in FP16 else "*i32"
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
        cx = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
        nospec = set(kernel.do_not_specialize or ())
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if sig[n] in ("i32", "*fp16", "*fp32", "*i32") and n not in nospec}
        src = ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm
        return asm["ptx"], asm["ttgir"]


    def compile_sm90(kernel, consts):
        ptx, ttgir = compile_asm(kernel, consts)
        most_pending = max(map(int, re.findall(r"ttg.async_wait[^{]*[{]num = (\d+)", ttgir)),
                           default=-1)
        return ("griddepcontrol.wait" in ptx, "griddepcontrol.launch_dependents" in ptx,
                most_pending)


    def memory_order_ops(kernel, consts):  # the PTX's atomics and acquire loads (handoff.py)
        ptx, _ = compile_asm(kernel, consts)
        return sorted(set(re.findall(r"atom[.][\w.]+|ld[.]global[.]gpu[.]acquire[.]\w+", ptx)))


    common = dict(HEAD_SIZE=128, HEAD_PAD=128, BLOCK_SIZE=16, UPCAST_DOT=False, DOT_PRECISION=None)
    out = {}
    for name, over in [("default", {}), ("no_pdl", dict(PDL=False)),
                       ("switches", dict(PDL=True, HEAD_FASTEST=True, UNMASKED_FULL_TILES=True)),
                       ("no_prefetch", dict(PREFETCH_BLOCK_IDS=False)),
                       ("2_stages", dict(num_stages=2))]:
        cfg = suffix._suffix_config(4, 128, 16, 1, over)
        out["suffix_" + name] = compile_sm90(suffix._paged_suffix_kernel, dict(
            cfg, QUERIES_PER_KV=4, NUM_PREFIX_PARTS=2, SPLIT_KV=False, HANDOFF=False,
            STORE_LSE=False, **common))
    cfg = suffix._suffix_config(4, 128, 16, 1, dict(PDL=False, HEAD_FASTEST=True))
    out["suffix_handoff"] = memory_order_ops(suffix._paged_suffix_kernel, dict(
        cfg, QUERIES_PER_KV=4, NUM_PREFIX_PARTS=1, SPLIT_KV=False, HANDOFF=True, STORE_LSE=True,
        **common))
    out["handoff_finish"] = memory_order_ops(handoff._handoff_finish_kernel, dict(
        QUERIES_PER_KV=4, QPK_PAD=4, BLOCK_Q=4, BLOCK_M=16, HEAD_SIZE=128, HEAD_PAD=128,
        ONE_TILE_PER_REQ=True, STORE_LSE=True, num_warps=4, num_stages=1))
    for name, over in [("default", {}), ("no_pdl", dict(LAUNCH_DEPENDENTS=False)),
                       ("switches", dict(LAUNCH_DEPENDENTS=True, UNMASKED_FULL_TILES=True)),
                       ("no_prefetch", dict(PREFETCH_BLOCK_IDS=False))]:
        cfg = prefix._prefix_config(4, 128, 64, over)
        out["prefix_" + name] = compile_sm90(prefix._relay_prefix_kernel,
                                             dict(cfg, QUERIES_PER_KV=4, **common))
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    if run.returncode and ("ptxas" in run.stderr or "No module named" in run.stderr):
        pytest.skip(f"no sm_90 toolchain here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # (griddepcontrol.wait in the PTX, griddepcontrol.launch_dependents in the PTX, the most
    # copies an async_wait leaves pending). PDL is on by default (the launchers still launch
    # without it where it cannot act). 3 stages: the next K/V tile (2 copies) stays in flight.
    assert got == {
        "suffix_default": [True, False, 2],
        "suffix_no_pdl": [False, False, 2],
        "suffix_switches": [True, False, 2],
        "suffix_no_prefetch": [True, False, 0],
        "suffix_2_stages": [True, False, 0],
        # handoff.py: arrivals acq_rel at GPU scope, the ready flag released by the suffix and
        # acquired by the finisher
        "suffix_handoff": ["atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.release.exch.b32"],
        "handoff_finish": ["atom.global.gpu.acq_rel.add.u32", "ld.global.gpu.acquire.b32"],
        "prefix_default": [False, True, 2],
        "prefix_no_pdl": [False, False, 2],
        "prefix_switches": [False, True, 2],
        "prefix_no_prefetch": [False, True, 0],
    }
