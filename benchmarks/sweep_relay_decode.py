"""GQA decode sweep: variants of the relay decode path ("fused" schedule) on one GPU (issue 3).

    python benchmarks/sweep_relay_decode.py [OUT.json] [--variants a,b,...] [--shapes gqa:64:1024,...]
                                  [--budget 100] [--no-components] [--no-combo] [--fa3]
                                  [--list]

Shapes (head 128, block 16, fp16, decode: 1 query token per request, 576 own tokens per request,
one group sharing the prefix): GQA 32 q / 8 kv heads at (batch, prefix) = (64, 1024),
(128, 1024), (256, 2048), (256, 4096); MHA 32 / 32 at (64, 1024), (256, 2048).

Each variant is one way of calling kernels.relay_attention(..., schedule="fused") (the CUDA
backend's call): tile configs / launcher knobs through prefix_config / suffix_config, or forced
split counts. Per shape and variant the script
  - checks the output against the fp32 torch reference (plain attention over the whole KV) and
    against the "base" variant's output (max abs error, PASS at the tests' fp16 atol/rtol 1e-3),
  - times the call as benchmarks/benchmark_kernels.py does (CUDA-graph replay, L2 flushed between
    replays, median of >= 50 replays), and also its two launches alone (prefix partials; suffix
    with the prefix states folded in), unless --no-components,
  - counts the bytes the problem must move (shared KV once, every own KV, queries, outputs) and
    reports them as a share of a measured device-to-device copy bandwidth.
One table goes to stdout at the end (progress to stderr); JSON to OUT.json when given.
--budget (s): runs not started by then are recorded as skipped (Triton compiles count); past 85%
of it, the components are no longer timed. Variants run in the order given, each on every shape.
After the listed variants, "auto_combo" merges the knobs of those that beat base on the GQA
shapes (and do not lose on MHA) and runs the merge on every shape (--no-combo: not).
--fa3 adds FA3 over the own blocks only, and FA3's prefix pass alone and followed by our suffix
kernel: split by FA3 (num_splits 0 / 1 / 2 / 4), over the shared blocks as one consecutive run
(no block table), and over key chunks as sequences of their own (fa3_prefix_schemes) (needs
vLLM; its import takes a few seconds). The variants overlap_flash_* run FA3's pass on a side
stream beside our suffix kernel.
--list prints the variants (the defaults and the extras --variants can name).
The "launches" column shows what ran: P(refix) / S(uffix) / M(erge) kernels (FA3 prefix: FA3's
prefix pass, variants flash_prefix / backend), rows x keys per tile,
warps, stages, z = split count, and the switches on (+pdl / +trig: PDL, +hf: HEAD_FASTEST,
+um: UNMASKED_FULL_TILES) or off (+nopf: PREFETCH_BLOCK_IDS). Exit status 1 if any run fails its
check or errors.
Expected run time on an H100: about a minute (~45 Triton compiles of ~0.6 s, ~60 timed runs);
--budget (default 100 s, counted from the start of the script) caps it.

History: benchmarks/results/kernels/gqa_sweep_h100.md was measured when "base" had PDL off and
prefill tiles from 1024 rows; "pdl_decode_tiles" won and became the defaults, so "base" is now
that variant (and "pdl" / "prefix_decode_tiles" repeat it).
"""

import time

START = time.perf_counter()  # the --budget counts from here (imports, CUDA start-up included)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import benchmark_kernels as bk  # noqa: E402  (batch builder, byte count, copy bandwidth)

kernels = bk.import_kernels()
launch_mod = importlib.import_module(kernels.__name__ + "._launch")  # the launch recorder hook

SHAPES = [
    ("gqa", 64, 1024),
    ("gqa", 128, 1024),
    ("gqa", 256, 2048),
    ("gqa", 256, 4096),
    ("llama2-7b", 64, 1024),
    ("llama2-7b", 256, 2048),
]
SUFFIX = 576
DEVICE = "cuda"  # a CPU smoke test of this script (TRITON_INTERPRET=1) sets "cpu"

# ---------------------------------------------------------------- variants
# name -> (what it changes, shape -> relay_attention keyword arguments)

UNMASKED = {"UNMASKED_FULL_TILES": True}
DECODE_TILES = {"big_rows": 4096}  # prefix: decode tiles (64 x 64, 4 warps, 3 stages) to 4096 rows
BALANCED = {"split_policy": "balanced"}
PDL_TRIGGER = {"LAUNCH_DEPENDENTS": True}  # prefix kernel: let the next kernel start
PDL = {"PDL": True}  # suffix kernel: launched with PDL, waits before reading the prefix states


def _rows(s) -> int:
    """Rows of the prefix pass per KV head: group tokens x query heads per KV head."""
    return s.batch * s.query_len * (s.num_q_heads // s.num_kv_heads)


def _suffix_programs(s) -> int:
    return s.batch * s.num_kv_heads


def _suffix_only(doc: str, **knobs) -> tuple:
    """A variant that changes only the suffix kernel's tile config (the same on every shape)."""
    return doc, lambda s: dict(suffix_config=dict(knobs))


def _behind_fa3(doc: str, **suffix_knobs) -> tuple:
    """FA3's prefix pass, then the suffix kernel with these knobs (the backend's order)."""
    return doc, lambda s: dict(prefix_attention=bk.flash_prefix_kernel(),
                               suffix_config=dict(suffix_knobs))


def _beside_fa3(doc: str, **suffix_knobs) -> tuple:
    """FA3's unsplit prefix pass on a high-priority side stream beside the suffix kernel with
    these knobs, then a merge (the overlap schedule; overlap_flash_z1_hi below)."""
    return doc, lambda s: dict(schedule="overlap", side_priority=-1,
                               prefix_attention=bk.flash_prefix_kernel(1),
                               suffix_config=dict(suffix_knobs))


def _big_group_prefix(doc: str, splits: int | None = None, **tiles) -> tuple:
    """A variant that gives the prefix pass these tiles (and `splits` prefix splits, if given)
    where a group has >= 512 rows."""

    def kwargs(s) -> dict:
        big = _rows(s) >= 512
        return dict(prefix_config=dict(tiles) if big else None,
                    prefix_splits=splits if big else None)

    return doc, kwargs


VARIANTS = {
    "base": ("the kernels' defaults (what the backend runs)", lambda s: {}),
    "pdl": (
        "programmatic dependent launch: the suffix streams its KV while the prefix pass runs",
        lambda s: dict(prefix_config=dict(PDL_TRIGGER), suffix_config=dict(PDL)),
    ),
    "pdl_decode_tiles": (
        "pdl + prefix_decode_tiles (64-row prefix programs leave room for a suffix program per SM)",
        lambda s: dict(
            prefix_config={**PDL_TRIGGER, **DECODE_TILES}, suffix_config=dict(PDL)
        ),
    ),
    "suffix_s5": _suffix_only(
        "suffix 5 stages: K/V tiles double-buffered (3 stages: one 64-key tile in flight)",
        num_stages=5,
    ),
    "suffix_n32s5": _suffix_only(
        "suffix 32-key tiles, 5 stages: double-buffered, 96 regs, 5 programs per SM",
        TILE_N=32, num_stages=5,
    ),
    "prefix_balanced": (
        "prefix: split count that fills whole waves (split_policy=balanced)",
        lambda s: dict(prefix_config=dict(BALANCED)),
    ),
    "prefix_decode_tiles": (
        "prefix: decode tiles 64x64 w4 s3 up to 4096 rows (default: prefill tiles from 1024)",
        lambda s: dict(prefix_config=dict(DECODE_TILES)),
    ),
    "head_fastest": _suffix_only(
        "suffix grid (kv heads, requests): a request's KV heads launched together",
        HEAD_FASTEST=True,
    ),
    "unmasked": (
        "full tiles without masks, prefix and suffix (UNMASKED_FULL_TILES)",
        lambda s: dict(prefix_config=dict(UNMASKED), suffix_config=dict(UNMASKED)),
    ),
    # ---- extras, only with --variants
    "combo_pdl": (
        "pdl + prefix_balanced + prefix_decode_tiles + head_fastest + unmasked",
        lambda s: dict(
            prefix_config={**UNMASKED, **DECODE_TILES, **BALANCED, **PDL_TRIGGER},
            suffix_config={**UNMASKED, **PDL, "HEAD_FASTEST": True},
        ),
    ),
    "suffix_m64": _suffix_only(
        "suffix 64 rows (wgmma; K/V double-buffered at 3 stages; 2 programs per SM)",
        BLOCK_M=64,
    ),
    "suffix_n32s4": _suffix_only(
        "suffix 32-key tiles, 4 stages (3 K/V buffers, 54 KB)",
        TILE_N=32, num_stages=4,
    ),
    "prefix_128x64w8": _big_group_prefix(
        "prefix tiles 128x64, 8 warps, 3 stages where rows >= 512",
        BLOCK_M=128, TILE_N=64, num_warps=8, num_stages=3,
    ),
    "prefix_128x128w8": _big_group_prefix(
        "prefix tiles 128 rows x 128 keys, 8 warps, 2 stages where rows >= 512",
        BLOCK_M=128, TILE_N=128, num_warps=8, num_stages=2,
    ),
    "prefix_128x64w8s2": _big_group_prefix(
        "prefix tiles 128x64, 8 warps, 2 stages where rows >= 512",
        BLOCK_M=128, TILE_N=64, num_warps=8, num_stages=2,
    ),
    "suffix_split2": (
        "suffix split in 2 where there are < 4 programs per SM (+1 merge launch)",
        lambda s: dict(suffix_splits=2 if _suffix_programs(s) < 4 * _sms() else None),
    ),
    "suffix_w2": _suffix_only(
        "suffix 2 warps (GQA: 4 real rows of 16; fewer registers, more programs per SM)",
        num_warps=2,
    ),
    "suffix_w8": _suffix_only("suffix 8 warps", num_warps=8),
    "suffix_n128": _suffix_only(
        "suffix 128-key tiles (one 64 KB K+V tile in flight per program)",
        TILE_N=128,
    ),
    "suffix_n128w8": _suffix_only("suffix 128-key tiles, 8 warps", TILE_N=128, num_warps=8),
    "suffix_n32w2": _suffix_only(
        "suffix 32-key tiles, 2 warps, 3 stages",
        TILE_N=32, num_warps=2,
    ),
    "suffix_split2_all": (
        "suffix always split in 2 (+1 merge launch)",
        lambda s: dict(suffix_splits=2),
    ),
    "overlap": (
        "schedule=overlap (prefix on a side stream, then merge_attn_states)",
        lambda s: dict(schedule="overlap"),
    ),
    # The prefix pass is compute-bound at large GQA groups, the suffix bandwidth-bound. With the
    # prefix unsplit its grid leaves a program slot per SM free, so suffix programs run beside it
    # (co-resident) instead of queueing behind it.
    "overlap_z1": (
        "overlap, prefix unsplit (64x64 w4 s3: at most one prefix program per SM)",
        lambda s: dict(schedule="overlap", prefix_splits=1),
    ),
    "overlap_z1_s2": (
        "overlap, prefix unsplit, 2 stages (less shared memory beside a suffix program)",
        lambda s: dict(schedule="overlap", prefix_splits=1, prefix_config=dict(num_stages=2)),
    ),
    "overlap_z1_128x64w8": (
        "overlap, prefix unsplit, 128x64 tiles, 8 warps, 2 stages (half the prefix programs)",
        lambda s: dict(schedule="overlap", prefix_splits=1,
                       prefix_config=dict(BLOCK_M=128, TILE_N=64, num_warps=8, num_stages=2)),
    ),
    # Session 13: with block ids loaded in the same iteration as the K/V tile they address,
    # Triton 3.6's pipeliner waited for every copy at the top of each iteration, so no K/V tile
    # was ever in flight while a program computed (TTGIR: async_wait num = 0). The kernels now
    # load the next tile's block ids one iteration ahead (PREFETCH_BLOCK_IDS, on by default).
    "no_prefetch": (
        "block ids loaded with their K/V tile (before session 13: no K/V load in flight while"
        " computing)",
        lambda s: dict(prefix_config=dict(PREFETCH_BLOCK_IDS=False),
                       suffix_config=dict(PREFETCH_BLOCK_IDS=False)),
    ),  # fmt: skip
    # Forced prefix split counts. At commits 36faa09 and 71e63ae (backed out) the fused schedule
    # reduced more than 4 splits with a merge launch before the suffix; now its epilogue folds
    # them all in (prefetch_h100_session13.md, runs 7-8).
    "prefix_z4": ("prefix split count 4 (the fused schedule's cap)",
                  lambda s: dict(prefix_splits=4)),
    "prefix_z8": ("prefix split count 8", lambda s: dict(prefix_splits=8)),
    "prefix_z16": ("prefix split count 16", lambda s: dict(prefix_splits=16)),
    "suffix_s2": _suffix_only("suffix 2 stages (one K/V buffer, 38 KB)", num_stages=2),
    "suffix_n32s3": _suffix_only("suffix 32-key tiles, 3 stages (2 K/V buffers, 37 KB)", TILE_N=32),
    # With the K/V loads in flight, a prefix program needs 214 registers and 112 KB (3 stages):
    # two fill an SM. Unsplit (128 programs, one per SM) on a side stream, the suffix's 2-stage
    # programs (119 registers, 38 KB) can run two beside it on every SM.
    "overlap_sfx2": (
        "overlap schedule, suffix 2 stages",
        lambda s: dict(schedule="overlap", suffix_config=dict(num_stages=2)),
    ),
    "overlap_z1_sfx2": (
        "overlap, prefix unsplit, suffix 2 stages",
        lambda s: dict(schedule="overlap", prefix_splits=1, suffix_config=dict(num_stages=2)),
    ),
    "overlap_z1_pfx2_sfx2": (
        "overlap, prefix unsplit and 2 stages, suffix 2 stages",
        lambda s: dict(schedule="overlap", prefix_splits=1, prefix_config=dict(num_stages=2),
                       suffix_config=dict(num_stages=2)),
    ),  # fmt: skip
    "pdl_z1_sfx2": (
        "fused schedule, prefix unsplit, suffix 2 stages",
        lambda s: dict(prefix_splits=1, suffix_config=dict(num_stages=2)),
    ),
    "prefix_s2": _big_group_prefix(
        "prefix 64x64, 2 stages (2 K/V buffers, 80 KB) where rows >= 512",
        BLOCK_M=64, TILE_N=64, num_warps=4, num_stages=2,
    ),
}
# The prefix pass of a large GQA group: deeper pipelines or more warps per program may hide its
# load latency (session 11: at one prefix program per SM, overlap_z1, it got far slower). Extras
# named prefix_MxN + wW (8 warps) or sS (4 warps, S stages).
# Session 13 (block ids prefetched): smaller prefix programs (64x32 s2-s4: 160-173 registers,
# 48-80 KB; 64x16: 149 registers) leave room for a suffix program beside two of them.
for _m, _n, _w, _s in [(64, 32, 4, 5), (64, 32, 4, 4), (64, 32, 4, 6), (64, 32, 4, 7),
                       (64, 16, 4, 8), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2),
                       (64, 16, 4, 4), (64, 16, 4, 6)]:
    VARIANTS[f"prefix_{_m}x{_n}" + (f"w{_w}" if _w != 4 else f"s{_s}")] = _big_group_prefix(
        f"prefix tiles {_m}x{_n}, {_w} warps, {_s} stages where rows >= 512",
        BLOCK_M=_m, TILE_N=_n, num_warps=_w, num_stages=_s,
    )

# Session 14: the prefix pass of a 256-request GQA group reads its shared K/V from L2 once per
# 64-row program: 268 MB at prefix 4096, 3.8 TB/s in its 0.07 ms, competing with the suffix's own
# stream. 128 or 256 rows per program read it half or a quarter as often; the split count is
# forced so the programs fill the SMs once (64 x 2 or 32 x 4 = 128 programs on 132 SMs).
# Without masks on full tiles (UNMASKED_FULL_TILES, "_um"), 64x32 prefix programs need 163
# registers, not 172: three fit an SM, so 3 splits (384 programs) run at once.
for _m, _n, _w, _s, _z, _um in [
    (128, 32, 8, 3, 2, False), (128, 32, 8, 4, 2, False), (128, 64, 8, 2, 2, False),
    (128, 32, 8, 3, None, False), (256, 32, 16, 2, 4, False), (256, 32, 16, 3, 4, False),
    (64, 32, 4, 3, None, True), (64, 32, 4, 3, 3, True), (128, 32, 8, 3, 2, True),
    (128, 32, 8, 3, 1, True), (128, 32, 8, 3, None, True),
]:  # fmt: skip
    VARIANTS[f"prefix_{_m}x{_n}w{_w}s{_s}" + ("_um" if _um else "") + (f"_z{_z}" if _z else "")] = (
        _big_group_prefix(
            f"prefix tiles {_m}x{_n}, {_w} warps, {_s} stages"
            + (", no masks on full tiles" if _um else "") + (f", {_z} splits" if _z else "")
            + " where rows >= 512",
            splits=_z, BLOCK_M=_m, TILE_N=_n, num_warps=_w, num_stages=_s,
            **(UNMASKED if _um else {}),
        )
    )


def _backend_choice(s) -> dict:
    """The prefix pass the CUDA backend picks for the shape's one group (cost model): ours, FA3's
    before the suffix, or FA3's beside it (the handoff's buffers kept, as its replays keep them)."""
    choice = bk.backend_choice(kernels.cost_model, s)
    if choice == "relay+fa3":
        return dict(prefix_attention=bk.flash_prefix_kernel())
    if choice == "handoff":
        return VARIANTS["handoff_flash_z1_kept"][1](s)
    return {}


# Session 14: FA3's prefix pass, our suffix kernel folding its state in (kernels/external_prefix.py)
VARIANTS["flash_prefix"] = ("the prefix pass by FA3 (needs vLLM)",
                            lambda s: dict(prefix_attention=bk.flash_prefix_kernel()))
VARIANTS["backend"] = ("the prefix pass the backend's cost model picks: ours or FA3's",
                       _backend_choice)

# Session 15: FA3's pass costs ~0.047 ms at (256, 4096) GQA however it is split or whether its
# keys are paged (--fa3 rows), and runs before the suffix. Unsplit it is 64 programs: on a side
# stream (high priority: placed first) it leaves half the SMs to our suffix kernel, streaming
# beside it; then one merge. Measured (H200, run 3 of prefix_overlap_h200_session15.md): z1_hi
# beat the backend's path by 1.7% at (256, 4096) and 3.4% at (256, 2048), lost 4% at batch 512
# and 21-30% at batch 64-128. (Session 15 read this as half the SMs streaming at half the rate;
# session 16 found a plain read streams well beside the pass, and the suffix's online softmax is
# what costs there: stream_ceiling.py --beside-fa3, decode_h200_session16.md runs 4 and 6.)
for _z in (0, 1):
    for _prio in (0, -1):
        VARIANTS[f"overlap_flash_z{_z}" + ("_hi" if _prio else "")] = (
            f"FA3's prefix pass (num_splits {_z}) on a side stream of priority {_prio} beside our"
            " suffix kernel, then merge",
            lambda s, z=_z, p=_prio: dict(schedule="overlap", side_priority=p,
                                          prefix_attention=bk.flash_prefix_kernel(z)),
        )  # fmt: skip
VARIANTS["overlap_lo"] = ("overlap schedule, side stream of priority 0 (before session 15)",
                          lambda s: dict(schedule="overlap", side_priority=0))
# Our prefix pass unsplit (one program per SM at a 256-request GQA group), placed first on every
# SM by the side stream's priority, with tiles small enough that suffix programs still fit
# beside it (session 13's unsplit overlap variants ran at normal priority). Measured (run 4):
# 3-62% slower than base at (256, 4096) GQA, unsplit 7-62%: one program per SM runs the pass
# far too slowly.
for _m, _n, _w, _s, _z, _sfx in [(64, 32, 4, 3, 1, 2), (64, 32, 4, 3, 1, 3), (64, 16, 4, 4, 1, 2),
                                 (64, 32, 4, 2, 1, 2), (64, 64, 4, 2, 1, 2), (64, 16, 4, 3, 2, 2),
                                 (128, 32, 8, 2, 1, 2), (64, 32, 4, 2, 2, 2)]:
    VARIANTS[f"overlap_hi_z{_z}_p{_m}x{_n}w{_w}s{_s}_sfx{_sfx}"] = (
        f"overlap, side priority -1, prefix {_m}x{_n} {_w} warps {_s} stages, {_z} split(s),"
        f" suffix {_sfx} stages",
        lambda s, m=_m, n=_n, w=_w, st=_s, z=_z, sfx=_sfx: dict(
            schedule="overlap", side_priority=-1, prefix_splits=z,
            prefix_config=dict(BLOCK_M=m, TILE_N=n, num_warps=w, num_stages=st),
            suffix_config=dict(num_stages=sfx)),
    )  # fmt: skip

# After FA3's pass the suffix kernel runs alone, with no prefix kernel to stream beside: its
# tiles were tuned for the fused schedule. A read-only probe walking the same pages reads GQA
# (256, 4096) fastest with 32-key tiles and 4 stages (stream_ceiling.py). Programs of 1-2 warps
# (session 16, run 5 of decode_h200_session16.md): 1-7% slower than the default at batch 256.
for _n, _s, _hf, _w in [(32, 4, False, 4), (32, 3, False, 4), (64, 3, False, 4),
                        (64, 4, False, 4), (64, 2, True, 4), (64, 2, True, 2), (64, 3, True, 2),
                        (32, 3, True, 2), (32, 4, True, 1)]:
    VARIANTS[f"flash_prefix_sfx_n{_n}s{_s}" + ("_hf" if _hf else "") + (f"_w{_w}" if _w != 4
                                                                         else "")] = _behind_fa3(
        f"the prefix pass by FA3, suffix {_n}-key tiles, {_s} stages, {_w} warps"
        + (", HEAD_FASTEST" if _hf else ""),
        TILE_N=_n, num_stages=_s, HEAD_FASTEST=_hf, num_warps=_w,
    )  # fmt: skip

VARIANTS["flash_prefix_no_hf"] = _behind_fa3(
    "the prefix pass by FA3, the suffix without HEAD_FASTEST (before session 15)",
    HEAD_FASTEST=False)

# Session 16: beside FA3's unsplit pass (64 programs that fill their SMs) the suffix kernel has
# the other SMs only while the pass runs: tiles with more bytes in flight per SM, for the overlap
# schedule's suffix launch. Measured (H200, run 2 of decode_h200_session16.md): 64-key tiles,
# 3 stages, HEAD_FASTEST best, 0.1995 ms at GQA (256, 4096), 3% faster than the backend's path
# there, 3% slower at batch 512 and 12% at batch 128; deeper pipelines and larger tiles slower.
# With 2 warps and 32-key tiles (run 5) 0.1973 ms there, but 6-19% slower at prefix 2048 and at
# batch 128.
for _n, _s, _w, _hf in [(64, 3, 4, False), (64, 4, 4, False), (32, 4, 4, False),
                        (32, 6, 4, False), (64, 2, 4, True), (64, 3, 4, True),
                        (128, 2, 4, False), (128, 3, 8, False), (64, 2, 2, True),
                        (64, 3, 2, True), (32, 3, 2, True), (32, 4, 2, True), (16, 4, 1, True),
                        (32, 3, 1, True)]:
    VARIANTS[f"overlap_flash_z1_hi_sfx_n{_n}s{_s}w{_w}" + ("_hf" if _hf else "")] = _beside_fa3(
        f"overlap_flash_z1_hi, suffix {_n}-key tiles, {_s} stages, {_w} warps"
        + (", HEAD_FASTEST" if _hf else ""),
        TILE_N=_n, num_stages=_s, num_warps=_w, HEAD_FASTEST=_hf,
    )  # fmt: skip

# Session 17, run 1 (decode_h200_session17.md): one online-softmax state per warp (KEY_SLICES:
# a batched dot gives each warp one key slice of each tile, so no row max, row sum or P crosses
# warps in the loop; commit 4f95035, removed again) was slower on every shape and schedule. The
# sliced loop took 255 registers on sm_90 (a 16 x 128 fp32 accumulator per warp instead of one
# shared by the warps): 2 programs of 4 warps per SM; capped at 168 registers it spilled.
# Register caps: the suffix's 2-stage decode program takes 109 registers (Triton 3.9's PTX through
# ptxas, on the CPU), so 4 programs of 4 warps fit an SM where its 38 KB of shared memory allow 5.
# Capped at 96 (maxnreg) it spills 4 bytes and 5 fit. Measured (run 2): 7% slower on the
# backend's path at GQA (256, 4096), slower on all 6 shapes; 9% slower alone, 6% beside FA3.
REGISTER_CAP_CONFIGS = {
    "n64s2w4_r96": dict(TILE_N=64, num_stages=2, num_warps=4, HEAD_FASTEST=True, maxnreg=96),
}
for _tag, _knobs in REGISTER_CAP_CONFIGS.items():
    VARIANTS[f"flash_prefix_{_tag}"] = _behind_fa3(
        f"the prefix pass by FA3, then the suffix with {_knobs}", **_knobs)
    VARIANTS[f"overlap_flash_z1_hi_{_tag}"] = _beside_fa3(
        f"overlap_flash_z1_hi, the suffix with {_knobs}", **_knobs)
    VARIANTS[f"suffix_{_tag}"] = _suffix_only(f"the suffix with {_knobs}", **_knobs)

# Session 18: the overlap schedule without its merge launch after the join (schedule "handoff",
# kernels/handoff.py): a suffix program folds FA3's state in itself when the pass is done by the
# time its own keys are, else a finisher behind the pass on the side stream merges its rows.
def _handoff(doc: str, fa3_splits: int | None = 1, kept: bool = False,
             finish_programs: int | None = None, finish_warps: int = 1,
             **suffix_knobs) -> tuple:  # fmt: skip
    """FA3's prefix pass (num_splits `fa3_splits`; None: ours) on a high-priority side stream,
    then the finisher; the suffix kernel with these knobs beside them (schedule "handoff").
    `kept`: one Handoff per shape serves every call (no zeroing launch per call);
    `finish_programs`: the finisher's grid (None: the default)."""

    def kwargs(s) -> dict:
        kw = dict(schedule="handoff", side_priority=-1, suffix_config=dict(suffix_knobs),
                  prefix_attention=None if fa3_splits is None
                  else bk.flash_prefix_kernel(fa3_splits))  # fmt: skip
        if kept or finish_programs:  # decode: one suffix program per request and KV head
            query = torch.empty(s.batch * s.query_len, s.num_q_heads, s.head_size, device=DEVICE)
            kw["handoff"] = kernels.Handoff.new(
                query, s.batch * s.num_kv_heads, finish_programs, finish_warps)
        return kw

    return doc, kwargs


VARIANTS["handoff_flash_z1"] = _handoff("handoff: FA3 unsplit beside the suffix (its defaults)")
VARIANTS["handoff_flash_z0"] = _handoff("handoff: FA3 split as FA3 picks", fa3_splits=0)
VARIANTS["handoff_ours"] = _handoff("handoff: our prefix pass on the side stream", fa3_splits=None)
for _n, _s, _w in [(64, 3, 4), (32, 3, 2), (32, 4, 4), (64, 2, 2), (32, 3, 4)]:
    VARIANTS[f"handoff_flash_z1_sfx_n{_n}s{_s}w{_w}"] = _handoff(
        f"handoff: FA3 unsplit, suffix {_n}-key tiles, {_s} stages, {_w} warps",
        TILE_N=_n, num_stages=_s, num_warps=_w)  # fmt: skip
# Measured (H200, decode_h200_session18.md). Run 1 (a finisher program per item, counters zeroed
# every call): GQA (256, 2048) 0.1841 ms (79%) against 0.1941 on the backend's path then;
# (256, 4096) 0.2002 against 0.2052, no faster than the overlap schedule (0.1995); slower at batch
# 512, 128, 64 and MHA. Runs 2-3: the finisher's grid decides: one program per SM 0.2110-0.2213 at
# (256, 4096), ~1000 programs 0.1913-0.1921 (the default since: 8 per SM, 1 warp); kept buffers
# save a memset (~0.005 ms with 132 programs). Other suffix tiles (_sfx_*) were slower.
VARIANTS["handoff_flash_z1_kept"] = _handoff("handoff_flash_z1, Handoff kept", kept=True)
for _p, _w in [(264, 4), (1024, 4), (2048, 4), (264, 1), (1024, 1), (2048, 1), (132, 1),
               (528, 1), (1024, 2)]:  # programs (one per item: batch 256 x 8 KV heads = 2048)
    VARIANTS[f"handoff_flash_z1_kept_f{_p}" + (f"w{_w}" if _w != 4 else "")] = _handoff(
        f"handoff_flash_z1_kept, a finisher of {_p} programs of {_w} warps", kept=True,
        finish_programs=_p, finish_warps=_w)  # fmt: skip

# In this order (a variant runs on every shape before the next starts, so a --budget cut drops
# whole variants from the end). "auto_combo" (after them, unless --no-combo) merges the knobs of
# those that beat base on the GQA shapes without losing on MHA; see auto_combo().
DEFAULT_VARIANTS = ["base", "pdl", "pdl_decode_tiles", "suffix_s5", "suffix_n32s5",
                    "prefix_balanced", "prefix_decode_tiles", "head_fastest",
                    "unmasked"]  # fmt: skip


def auto_combo(rows: list, names: list) -> tuple[str, list]:
    """(description, variants) for the combination of the measured winners: a variant qualifies
    when it is >= 0.5% faster than base on average over the GQA shapes and nowhere more than 1%
    slower on MHA; qualifying variants are merged best first, one whose keys clash with an earlier
    pick's (e.g. two suffix tile choices) is left out."""
    speed = {}
    for r in rows:
        if r.get("vs_base") and r["variant"] in names and r["variant"] != "base":
            speed.setdefault(r["variant"], {"gqa": [], "mha": []})[
                "gqa" if r["model"] == "gqa" else "mha"
            ].append(r["vs_base"])
    good = [
        (sum(v["gqa"]) / len(v["gqa"]), n)
        for n, v in speed.items()
        if v["gqa"] and sum(v["gqa"]) / len(v["gqa"]) >= 1.005 and min(v["mha"] or [1.0]) >= 0.99
    ]
    picked, keys = [], set()
    probe = bk._shape("gqa", "decode", 64, 1024, SUFFIX, "fp16")
    for _, n in sorted(good, reverse=True):
        mine = _knob_keys(VARIANTS[n][1](probe))
        if not mine & keys:
            picked.append(n)
            keys |= mine
    return " + ".join(picked) or "(nothing beat base)", picked


def _knob_keys(kw: dict) -> set:
    """The knobs a variant sets: (argument, config key) pairs."""
    keys = set()
    for arg, value in kw.items():
        if isinstance(value, dict):
            keys |= {(arg, k) for k in value}
            if {"TILE_N", "num_stages", "BLOCK_M", "num_warps"} & set(value):
                keys.add((arg, "tiles"))  # tile choices clash with each other as a whole
        elif value is not None:
            keys.add((arg, None))
    return keys


def merged_kwargs(picked: list):
    """shape -> the merged relay_attention arguments of the picked variants."""

    def kwargs(s):
        out = {}
        for n in picked:
            for arg, value in VARIANTS[n][1](s).items():
                if isinstance(value, dict):
                    out[arg] = {**out.get(arg, {}), **value}
                elif value is not None:
                    out[arg] = value
        return out

    return kwargs


def _sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


# ---------------------------------------------------------------- measuring


def graph_ms(fn, rep_ms: float) -> tuple[float, str]:
    """(median ms of fn, "graph" or "eager"): benchmark_kernels' timing, rep_ms of replays."""
    return bk.time_ms(fn, eager=False, warmup=10, rep=rep_ms)


def rep_for(ms_estimate: float) -> float:
    """do_bench's rep (ms of replays incl. the ~0.1 ms L2 flush) for >= 60 replays."""
    return max(60.0, 60 * (ms_estimate + 0.15))


def relay_call(s, query, kc, vc, meta, kw: dict):
    """The variant's relay_attention call (schedule "fused" unless the variant says otherwise)."""
    kw = dict(kw)
    schedule = kw.pop("schedule", "fused")
    scale = s.head_size**-0.5
    out = torch.empty_like(query)
    return lambda: kernels.relay_attention(
        query, kc, vc, meta, scale, out=out, validate=False, schedule=schedule, **kw
    )


def component_calls(s, query, kc, vc, meta, kw: dict):
    """(prefix partials alone, suffix with the prefix states folded in) as the fused schedule
    launches them (the suffix without PDL: alone, it has no prefix kernel to overlap)."""
    scale = s.head_size**-0.5
    prefix = lambda: kernels.relay_prefix_partials(  # noqa: E731
        query, kc, vc, meta.query_start_loc, meta.group_req_start, meta.group_req_end,
        meta.group_block_table, meta.group_prefix_len, scale,
        max_group_query_len=meta.max_group_query_len, max_prefix_len=meta.max_prefix_len,
        num_splits=kw.get("prefix_splits"), config=kw.get("prefix_config"),
    )  # fmt: skip
    parts = prefix()
    out = torch.empty_like(query)
    alone = {k: v for k, v in (kw.get("suffix_config") or {}).items() if k != "PDL"}  # no prior
    suffix = lambda: kernels.paged_suffix(  # noqa: E731
        query, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.prefix_lens,
        scale, out=out, return_lse=False, prefix_state=parts,
        max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
        num_splits=kw.get("suffix_splits"), config=alone,
    )  # fmt: skip
    return prefix, suffix


SHOWN = ("BLOCK_M", "TILE_N", "num_warps", "num_stages", "NUM_PREFIX_PARTS", "NUM_A",
         "HEAD_FASTEST", "UNMASKED_FULL_TILES", "PDL", "LAUNCH_DEPENDENTS",
         "launch_pdl", "HANDOFF")  # fmt: skip


def recorded_call(fn):
    """(fn(), its kernel launches: name, grid and the tile / switch arguments of each)."""
    seen = []

    def record(kernel, grid, kwargs, compiled):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        shown = {k: kwargs[k] for k in SHOWN if k in kwargs}
        seen.append(dict(kernel=name, grid=None if grid is None else list(grid), **shown))

    previous, launch_mod.RECORDER = launch_mod.RECORDER, record
    try:
        out = fn()
    finally:
        launch_mod.RECORDER = previous
    return out, seen


def launch_summary(launches: list) -> str:
    """P(refix) / S(uffix) / M(erge): rows x keys, warps, stages, z = splits; switches on."""
    flags = {"LAUNCH_DEPENDENTS": "trig", "launch_pdl": "pdl", "HEAD_FASTEST": "hf",
             "UNMASKED_FULL_TILES": "um", "HANDOFF": "ho"}  # fmt: skip
    out = []
    for ln in launches:
        if ln["grid"] is None:  # another library's kernel: FA3's prefix pass (_launch.call)
            out.append("FA3 prefix")
            continue
        if ln["kernel"] == "_handoff_finish_kernel":
            out.append("F")
            continue
        tag = {"_relay_prefix_kernel": "P", "_paged_suffix_kernel": "S"}.get(ln["kernel"])
        if tag is None:
            out.append(f"M{ln.get('NUM_A', '')}")
            continue
        on = "".join(f"+{v}" for k, v in flags.items() if ln.get(k))
        on += "" if ln.get("PREFETCH_BLOCK_IDS", True) else "+nopf"
        out.append(
            f"{tag} {ln.get('BLOCK_M')}x{ln.get('TILE_N')}w{ln.get('num_warps')}"
            f"s{ln.get('num_stages')} z{ln['grid'][2]}{on}"
        )
    return " | ".join(out)


def prepare(model: str, batch: int, prefix: int) -> dict:
    """The shape's paged batch (benchmark_kernels.py's builder) and its fp32 reference output."""
    s = bk._shape(model, "decode", batch, prefix, SUFFIX, "fp16")
    query, kc, vc, meta = built = bk.shape_batch(kernels, s, DEVICE)
    ref = torch.empty(query.shape, dtype=torch.float32, device=DEVICE)
    kernels.plain_attention_ref(
        query, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, s.head_size**-0.5,
        out=ref,
    )  # fmt: skip
    return dict(shape=s, batch=built, ref=ref, base_out=None)


def run_case(case: dict, name: str, bw: float, args, start: float) -> dict:
    """One variant on one shape; a failure or the time budget gives a row saying so."""
    s = case["shape"]
    head = dict(model=s.model, batch=s.batch, prefix=s.prefix, suffix=s.suffix, variant=name)
    elapsed = time.perf_counter() - start
    if elapsed > args.budget:
        return dict(head, skipped="budget")
    try:
        components = not args.no_components and elapsed < 0.85 * args.budget
        row, out = run_variant(s, name, case["batch"], case["ref"], case["base_out"], bw,
                               components)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
        return dict(head, error=repr(e)[:300])
    if name == "base":
        case["base_out"] = out
    return row


def run_variant(s, name, batch, ref, base_out, bw, components: bool) -> tuple[dict, torch.Tensor]:
    """(row, output) of one variant on one shape: check, time, and time the components."""
    query, kc, vc, meta = batch
    row = dict(model=s.model, batch=s.batch, prefix=s.prefix, suffix=s.suffix, variant=name)
    kw = VARIANTS[name][1](s)
    kw = {k: v for k, v in kw.items() if v is not None}
    row["kwargs"] = repr(kw)
    t0 = time.perf_counter()
    fn = relay_call(s, query, kc, vc, meta, kw)
    out, launches = recorded_call(fn)  # compiles
    out = out.clone()
    torch.cuda.synchronize()
    row["first_call_s"] = time.perf_counter() - t0
    row["launches"] = launches
    row["launch_summary"] = launch_summary(launches)
    row["max_err_ref"] = (out.float() - ref).abs().max().item()
    row["pass"] = bool(torch.allclose(out.float(), ref, atol=1e-3, rtol=1e-3)) and not bool(
        out.isnan().any()
    )
    if base_out is not None:
        row["max_diff_base"] = (out.float() - base_out.float()).abs().max().item()
    floor_ms = bk.problem_bytes(s) / bw * 1e3
    row["ms"], row["timing"] = graph_ms(fn, rep_for(floor_ms * 1.5))
    row["bytes"] = bk.problem_bytes(s)
    row["floor_ms"] = floor_ms
    row["pct_bw"] = 100 * floor_ms / row["ms"]
    if components and kw.get("schedule", "fused") == "fused" and "prefix_attention" not in kw:
        prefix, suffix = component_calls(s, query, kc, vc, meta, kw)
        row["prefix_ms"] = graph_ms(prefix, rep_for(0.05))[0]
        row["suffix_ms"] = graph_ms(suffix, rep_for(floor_ms * 1.5))[0]
    return row, out


def fa3_prefix_schemes(s, query, kc, vc, meta) -> dict:
    """FA3's prefix pass over the shared blocks (all queries of the group as one sequence, its
    query heads packed per KV head), alone at split counts 0 (FA3's choice), 2 and 4; and
    followed by our suffix kernel folding FA3's (out, lse) in as its one prefix part."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    bt, scale, n_pre = meta.block_table, s.head_size**-0.5, s.prefix // s.block_size
    T = query.shape[0]
    cu = torch.tensor([0, T], dtype=torch.int32, device=query.device)
    seq_pre = torch.tensor([s.prefix], dtype=torch.int32, device=query.device)
    bt_pre = bt[:1, :n_pre].contiguous()

    def prefix(splits=0):
        return flash_attn_varlen_func(
            query, kc, vc, max_seqlen_q=T, cu_seqlens_q=cu, max_seqlen_k=s.prefix,
            seqused_k=seq_pre, softmax_scale=scale, causal=False, block_table=bt_pre,
            return_softmax_lse=True, num_splits=splits, fa_version=3,
        )  # fmt: skip

    # The shared blocks as one consecutive run of the cache (how a cloud prompt's blocks lie when
    # they were allocated at once): FA3 reads them without a block table (TMA tiles, no page
    # gather). "_run" a tensor of its own; "_at" a view of a larger one from a token offset (how
    # the backend would pass the cache; vLLM's wrapper takes cu_seqlens_k or seqused_k, not both).
    kvh, hd = kc.shape[2], kc.shape[3]
    ids = bt_pre[0].long()
    k_run, v_run = (c[ids].reshape(-1, kvh, hd) for c in (kc, vc))  # [prefix, kv_heads, head]
    at = 7 * s.block_size
    k_at, v_at = (torch.zeros(at + s.prefix + s.block_size, kvh, hd, dtype=kc.dtype,
                              device=kc.device) for _ in range(2))  # fmt: skip
    k_at[at : at + s.prefix], v_at[at : at + s.prefix] = k_run, v_run
    cu_run = torch.tensor([0, s.prefix], dtype=torch.int32, device=query.device)

    def prefix_run(splits=0, offset=False):
        k, v = (k_at[at:], v_at[at:]) if offset else (k_run, v_run)
        return flash_attn_varlen_func(
            query, k, v, max_seqlen_q=T, cu_seqlens_q=cu, max_seqlen_k=s.prefix,
            cu_seqlens_k=cu_run, softmax_scale=scale,
            causal=False, return_softmax_lse=True, num_splits=splits, fa_version=3,
        )  # fmt: skip

    def then_suffix_from(po, pl):  # FA3's state: one part, or [parts, ...] already
        parts = (po, pl) if po.dim() == 4 else (po[None], pl[None])
        return kernels.paged_suffix(
            query, kc, vc, meta.query_start_loc, meta.seq_lens, bt, meta.prefix_lens, scale,
            return_lse=False, prefix_state=parts,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
        )[0]  # fmt: skip

    def then_suffix(splits):
        return then_suffix_from(*prefix(splits))

    # FA3's own key split (num_splits) reduces its splits in a combine kernel. Instead: chunk c of
    # the shared keys as a sequence of its own, over a copy of the group's queries per chunk. FA3
    # runs unsplit on S x the tiles and returns S normalised parts that our suffix kernel folds in
    # (no combine launch; one query copy). "_run": the chunks of the consecutive run, no table.
    H = query.shape[1]
    cu_rep = {S: torch.arange(S + 1, dtype=torch.int32, device=query.device) * T for S in (2, 3, 4)}

    def chunk_plan(S):
        per = -(-n_pre // S)  # blocks per chunk
        table = torch.zeros(S, per, dtype=torch.int32, device=query.device)
        used, bounds = [], [0]
        for c in range(S):
            blocks = bt_pre[0, c * per : (c + 1) * per]
            table[c, : blocks.numel()] = blocks
            used.append(blocks.numel() * s.block_size)
            bounds.append(bounds[-1] + used[-1])
        as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=query.device)  # noqa: E731
        return table, as_i32(used), as_i32(bounds), per * s.block_size

    plans = {S: chunk_plan(S) for S in (2, 3, 4)}

    def prefix_chunks(S, run=False):
        table, used, bounds, max_k = plans[S]
        paged = dict(seqused_k=used, block_table=table)
        o, lse = flash_attn_varlen_func(
            query.repeat(S, 1, 1), k_run if run else kc, v_run if run else vc, max_seqlen_q=T,
            cu_seqlens_q=cu_rep[S], max_seqlen_k=max_k, softmax_scale=scale, causal=False,
            return_softmax_lse=True, num_splits=1, fa_version=3,
            **(dict(cu_seqlens_k=bounds) if run else paged),
        )  # fmt: skip
        return o.view(S, T, H, -1), lse.view(H, S, T).transpose(0, 1)  # parts of the state

    def chunks_merged(S, run=False):  # parts merged in torch (timed too), for the check
        o, lse = prefix_chunks(S, run)
        w = torch.softmax(lse, dim=0).permute(0, 2, 1).unsqueeze(-1)  # [S, T, H, 1]
        return (o.float() * w).sum(0).to(query.dtype)

    out = {f"fa3_prefix_z{z}": (lambda z=z: prefix(z)[0]) for z in (0, 1, 2, 4)}
    out.update({f"fa3_prefix_z{z}_then_suffix": (lambda z=z: then_suffix(z)) for z in (0, 2)})
    out.update({f"fa3_prefix_run_z{z}": (lambda z=z: prefix_run(z)[0]) for z in (0, 1, 2, 4)})
    out["fa3_prefix_at_z0"] = lambda: prefix_run(0, offset=True)[0]
    out["fa3_prefix_run_z0_then_suffix"] = lambda: then_suffix_from(*prefix_run(0))
    out["fa3_prefix_at_z0_then_suffix"] = lambda: then_suffix_from(*prefix_run(0, offset=True))
    for z in (2, 4):
        out[f"fa3_prefix_run_z{z}_then_suffix"] = lambda z=z: then_suffix_from(*prefix_run(z))
    for S in (2, 3, 4):
        for run in (False, True):
            tag = f"fa3_prefix{'_run' if run else ''}_chunks{S}"
            out[tag] = lambda S=S, run=run: chunks_merged(S, run)
            out[f"{tag}_then_suffix"] = lambda S=S, run=run: then_suffix_from(
                *prefix_chunks(S, run))
    return out


def fa3_rows(s, batch, ref, bw) -> list[dict]:
    """FA3 over each request's own blocks only (the ceiling: the shared prefix for free), and
    FA3's prefix pass alone (checked against FA3's paged pass) and then our suffix kernel
    (fa3_prefix_schemes; checked against the reference)."""
    schemes = bk.make_schemes(kernels, s, *batch)
    schemes.update(fa3_prefix_schemes(s, *batch))
    rows = []
    for name in schemes:
        if not name.startswith("fa3_") or name == "fa3_full":
            continue
        suffix_only = name == "fa3_suffix"
        alone = name.startswith("fa3_prefix_") and not name.endswith("then_suffix")
        nbytes = bk.problem_bytes(s, suffix_only=suffix_only)
        row = dict(model=s.model, batch=s.batch, prefix=s.prefix, suffix=s.suffix,
                   variant=f"ref:{name}", bytes=nbytes, floor_ms=nbytes / bw * 1e3)
        if alone:  # a prefix pass alone: against FA3's paged prefix pass (its own choice)
            paged = schemes["fa3_prefix_z0"]().float()
            out = schemes[name]().float()
            row["max_err_ref"] = (out - paged).abs().max().item()
            row["pass"] = bool(torch.allclose(out, paged, atol=1e-3, rtol=1e-3))
        elif not suffix_only:
            out = schemes[name]().float()
            row["max_err_ref"] = (out - ref).abs().max().item()
            row["pass"] = bool(torch.allclose(out, ref, atol=1e-3, rtol=1e-3))
        row["ms"] = graph_ms(schemes[name], rep_for(nbytes / bw * 1.5e3))[0]
        row["pct_bw"] = 100 * row["floor_ms"] / row["ms"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="write JSON here")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--shapes", help="model:batch:prefix,... (model gqa or llama2-7b)")
    p.add_argument("--budget", type=float, default=100.0, help="seconds; later runs skipped")
    p.add_argument("--no-components", action="store_true", help="time only the whole call")
    p.add_argument("--fa3", action="store_true",
                   help="add FA3 over the own blocks, and FA3's prefix beside our suffix (vLLM)")
    p.add_argument("--no-combo", action="store_true", help="skip the auto_combo run")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.list:
        for name, (doc, _) in VARIANTS.items():
            print(f"{name:22s} {doc}{'' if name in DEFAULT_VARIANTS else '   (extra)'}")
        return 0
    start = START
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list shows them")
    if "base" in names:  # first: the others are diffed against it
        names = ["base"] + [n for n in names if n != "base"]
    shapes = SHAPES
    if args.shapes:
        shapes = [(m, int(b), int(p)) for m, b, p in (x.split(":") for x in args.shapes.split(","))]
    bw = bk.copy_bandwidth()
    log(f"# {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    cases = [prepare(model, b, p) for model, b, p in shapes]  # every shape's batch stays alive
    log(f"# {len(cases)} batches and references built, {time.perf_counter() - start:.0f} s")
    rows = []
    for name in names:
        for case in cases:
            rows.append(run_case(case, name, bw, args, start))
            log(line(rows[-1]))
    if not args.no_combo and "base" in names:
        add_speedups(rows)
        doc, picked = auto_combo(rows, names)
        log(f"# auto_combo: {doc}")
        if len(picked) > 1:
            VARIANTS["auto_combo"] = (doc, merged_kwargs(picked))
            names.append("auto_combo")
            for case in cases:
                rows.append(run_case(case, "auto_combo", bw, args, start))
                log(line(rows[-1]))
    if args.fa3:
        for case in cases:
            try:
                for row in fa3_rows(case["shape"], case["batch"], case["ref"], bw):
                    rows.append(row)
                    log(line(row))
            except Exception as e:  # noqa: BLE001 - FA3 is only a reference
                log(f"# fa3 rows failed: {e!r}")
    order = {(m, b, p): i for i, (m, b, p) in enumerate(shapes)}
    rows.sort(key=lambda r: order[(r["model"], r["batch"], r["prefix"])])  # stable: variant order
    elapsed = time.perf_counter() - start
    print(table(rows, bw, elapsed))
    if args.out:
        result = dict(env=environment(), copy_bandwidth_bytes_per_s=bw, elapsed_s=elapsed,
                      variants={n: VARIANTS[n][0] for n in names}, rows=rows)  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"# wrote {args.out}")
    return 0 if all(r.get("pass", True) and "error" not in r for r in rows) else 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _f(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def line(r: dict) -> str:
    if "error" in r or "skipped" in r:
        what = r.get("error") or f"skipped ({r['skipped']})"
        return f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['variant']} | {what} |"
    ok = {True: "PASS", False: "FAIL"}.get(r.get("pass"), "")
    return (
        f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['variant']} | {_f(r, 'ms', '.4f')} "
        f"| {_f(r, 'floor_ms', '.4f')} | {_f(r, 'pct_bw', '.0f')} | {_f(r, 'vs_base', '.3f')} "
        f"| {_f(r, 'prefix_ms', '.4f')} | {_f(r, 'suffix_ms', '.4f')} "
        f"| {_f(r, 'max_err_ref', '.1e')} {ok} | {_f(r, 'max_diff_base', '.1e')} "
        f"| {_f(r, 'first_call_s', '.1f')} | {r.get('launch_summary', '')} "
        f"{'' if r.get('timing', 'graph') == 'graph' else '(eager)'}|"
    )


def add_speedups(rows: list) -> None:
    """row["vs_base"] = base ms / row ms on the same shape (> 1: faster than base)."""
    base = {(r["model"], r["batch"], r["prefix"]): r["ms"] for r in rows
            if r["variant"] == "base" and "ms" in r}  # fmt: skip
    for r in rows:
        key = (r["model"], r["batch"], r["prefix"])
        if "ms" in r and key in base:
            r["vs_base"] = base[key] / r["ms"]


def table(rows: list, bw: float, elapsed: float) -> str:
    add_speedups(rows)
    head = ("| model | batch | prefix | variant | ms | floor ms | % copy BW | speedup vs base "
            "| prefix ms | suffix ms | max err vs ref | diff vs base | 1st call s "
            "| launches: rows x keys, warps, stages, z = splits |")  # fmt: skip
    out = [f"# {torch.cuda.get_device_name()}, triton {triton.__version__}, copy bandwidth "
           f"{bw / 1e9:.0f} GB/s; decode, suffix {SUFFIX}, fp16, head 128, block 16; "
           f"{elapsed:.0f} s in all", head, "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
    out += [line(r) for r in rows]
    return "\n".join(out)


def environment() -> dict:
    env = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        device=torch.cuda.get_device_name(),
        sms=_sms(),
        command=" ".join(sys.argv),
    )
    env["git_commit"] = bk.git_commit()
    try:
        env["git_dirty"] = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "kernels"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001 - no git on the device
        env["git_dirty"] = None
    return env


if __name__ == "__main__":
    sys.exit(main())
