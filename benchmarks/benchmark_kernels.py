"""Relay-attention kernels against FA3, vLLM's cascade and vLLM's Triton unified attention.

    python benchmarks/benchmark_kernels.py                  # default grid, GPU (< 4 min on an H100)
    python benchmarks/benchmark_kernels.py --full           # the full grid
    python benchmarks/benchmark_kernels.py --check          # GPU correctness: PASS/FAIL (exit 1)
    python benchmarks/benchmark_kernels.py --tune           # sweep our tiles on two decode shapes
    python benchmarks/benchmark_kernels.py --plot-only benchmarks/results/kernels/kernels.json
    TRITON_INTERPRET=1 python benchmarks/benchmark_kernels.py --smoke --out /tmp/k   # CPU, for CI

Schemes, each over the same paged cache, the shared prefix stored once (the same block ids in every
request's row, as vLLM's prefix cache makes):
    fa3_full    FA3 over each request's full block table (PagedAttention baseline)
    cascade     vLLM's cascade: FA3 prefix pass + FA3 suffix pass + merge_attn_states
    unified     vLLM's Triton unified_attention over the full table
    fa3_suffix  FA3 over each request's own blocks only (the ceiling: the shared prefix for free)
    relay       ours, as the backend calls it: relay_attention's default ("fused") schedule, one
                stream: the prefix pass, then the suffix kernel folds its state in (2 launches);
                the prefix pass is ours or FA3's, as the cost model picks (prefix_pass_by_flash),
                and FA3's runs beside the suffix ("handoff") where the cost model picks that
    relay_triton  relay with our Triton prefix pass (partials folded in by the suffix kernel)
    relay_flash   relay with FA3's prefix pass (kernels/external_prefix.py; needs vLLM)
    relay_handoff FA3's unsplit prefix pass on a side stream beside our suffix kernel, no merge
                launch after them (schedule="handoff", kernels/handoff.py; needs vLLM); "relay"
                where the cost model says so (prefix_pass_beside_suffix)
    relay_overlap ours, the prefix pass on a side stream, concurrent with the suffix pass, then one
                merge (schedule="overlap")
    relay_3k    ours, one stream: prefix, suffix, merge_attn_states
    ours_plain  ours without relay: paged_suffix over the full table

Output: a markdown table, one row per shape and scheme: ms (median; CUDA-graph replays unless
--eager, L2 flushed between replays by do_bench), bytes (what the problem must move: shared KV once,
every own KV, queries, outputs; own KV only for fa3_suffix), GB/s (bytes / time), % of the measured
device-to-device copy bandwidth, speedup vs fa3_full, and the cost model's choice next to the
measured winner of relay vs fa3_full. JSON (rows + environment) and a PNG go to --out.
"""

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = [
    "fa3_full",
    "cascade",
    "unified",
    "fa3_suffix",
    "relay",
    "relay_triton",
    "relay_flash",
    "relay_handoff",
    "relay_overlap",
    "relay_3k",
    "ours_plain",
]


@dataclass(frozen=True)
class Shape:
    model: str  # "llama2-7b" (MHA) or "gqa"
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    mode: str  # "decode" (1 query per request) or "prefill" (query_len queries per request)
    batch: int
    prefix: int  # shared tokens (block-aligned)
    suffix: int  # own tokens per request, queries included
    query_len: int
    dtype: str
    block_size: int = 16


MODELS = {"llama2-7b": (32, 32, 128), "gqa": (32, 8, 128)}


def _shape(model, mode, batch, prefix, suffix, dtype, query_len=1):
    return Shape(model, *MODELS[model], mode, batch, prefix, suffix, query_len, dtype)


def default_grid() -> list[Shape]:
    """DESIGN.md's kernel-table rows, GQA at the same points, long prefixes, small batches, bf16."""
    g = [
        _shape("llama2-7b", "decode", b, p, 576, "fp16")
        for b, p in [(64, 64), (64, 1024), (64, 2048), (128, 1024), (256, 2048), (256, 4096)]
    ]
    g += [
        _shape("llama2-7b", "decode", 8, 4096, 128, "fp16"),
        _shape("llama2-7b", "decode", 32, 1024, 1024, "fp16"),
    ]
    g += [
        _shape("gqa", "decode", b, p, 576, "fp16")
        for b, p in [(64, 1024), (256, 2048), (256, 4096), (384, 4096), (512, 4096), (8, 4096)]
    ]
    g += [
        _shape("llama2-7b", "decode", 64, 1024, 576, "bf16"),
        _shape("gqa", "decode", 128, 1024, 576, "bf16"),
    ]
    g += [_shape("llama2-7b", "prefill", 8, 1024, 512, "fp16", query_len=512)]
    return g


def full_grid() -> list[Shape]:
    return [
        _shape(m, "decode", b, p, s, dt)
        for m in MODELS
        for dt in ("fp16", "bf16")
        for b in (8, 32, 64, 128, 256)
        for p in (64, 256, 1024, 2048, 4096)
        for s in (128, 576, 1024)
    ] + [
        _shape(m, "prefill", 8, p, 512, "fp16", query_len=512) for m in MODELS for p in (1024, 2048)
    ]


def smoke_grid() -> list[Shape]:
    return [
        Shape("tiny", 4, 2, 64, "decode", 3, 32, 17, 1, "fp32"),
        Shape("tiny", 4, 1, 64, "prefill", 2, 16, 9, 5, "fp16"),
    ]


# ---------------------------------------------------------------- batches


def build_batch(
    kernels,
    query_lens,
    own_lens,
    groups,
    *,
    num_q_heads,
    num_kv_heads,
    head_size,
    block_size,
    dtype,
    device,
    seed=0,
):
    """Paged cache + RelayMetadata; groups are (req_start, req_end, block-aligned prefix_len).
    Shared blocks appear once; all block ids are randomly permuted; unowned slots hold NaN."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    prefix = [0] * len(own_lens)
    for r0, r1, p in groups:
        prefix[r0:r1] = [p] * (r1 - r0)
    seq_lens = [p + n for p, n in zip(prefix, own_lens)]
    n_shared = [p // block_size for _, _, p in groups]
    n_own = [-(-n // block_size) for n in own_lens]
    num_blocks = sum(n_shared) + sum(n_own)
    ids = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    table = torch.zeros(
        len(own_lens), max(-(-s // block_size) for s in seq_lens), dtype=torch.int32, device=device
    )
    i = 0
    for g, (r0, r1, _) in enumerate(groups):
        table[r0:r1, : n_shared[g]] = ids[i : i + n_shared[g]]
        i += n_shared[g]
    for r in range(len(own_lens)):
        first = prefix[r] // block_size
        table[r, first : first + n_own[r]] = ids[i : i + n_own[r]]
        i += n_own[r]
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    value_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    for r, n in enumerate(own_lens):  # poison the tail of each request's last block
        tail = (-n) % block_size
        if tail:
            last = table[r, prefix[r] // block_size + n_own[r] - 1]
            key_cache[last, block_size - tail :] = float("nan")
            value_cache[last, block_size - tail :] = float("nan")
    query = torch.randn(
        sum(query_lens), num_q_heads, head_size, device=device, dtype=dtype, generator=gen
    )
    meta = kernels.RelayMetadata.build(list(query_lens), seq_lens, table, list(groups), block_size)
    return query, key_cache, value_cache, meta


def shape_batch(kernels, s: Shape, device):
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[s.dtype]
    return build_batch(
        kernels,
        [s.query_len] * s.batch,
        [s.suffix] * s.batch,
        [(0, s.batch, s.prefix)],
        num_q_heads=s.num_q_heads,
        num_kv_heads=s.num_kv_heads,
        head_size=s.head_size,
        block_size=s.block_size,
        dtype=dtype,
        device=device,
    )


def problem_bytes(s: Shape, suffix_only=False) -> int:
    elt = 4 if s.dtype == "fp32" else 2
    kv_token = 2 * s.num_kv_heads * s.head_size * elt
    qo = 2 * s.batch * s.query_len * s.num_q_heads * s.head_size * elt
    return (0 if suffix_only else s.prefix * kv_token) + s.batch * s.suffix * kv_token + qo


# ---------------------------------------------------------------- schemes


def make_schemes(kernels, s: Shape, query, kc, vc, meta, only_ours=False) -> dict:
    """name -> zero-argument callable returning the output [num_tokens, num_q_heads, head_size]."""
    import torch

    scale = s.head_size**-0.5
    qsl, seq, bt = meta.query_start_loc, meta.seq_lens, meta.block_table
    n_pre = s.prefix // s.block_size
    no_prefix = torch.zeros_like(seq)
    schemes = {
        "relay_triton": lambda: kernels.relay_attention(query, kc, vc, meta, scale, validate=False),
        "relay_overlap": lambda: kernels.relay_attention(
            query, kc, vc, meta, scale, validate=False, schedule="overlap"
        ),
        "relay_3k": lambda: kernels.relay_attention(
            query, kc, vc, meta, scale, validate=False, schedule="serial"
        ),
        "ours_plain": lambda: kernels.paged_suffix(
            query,
            kc,
            vc,
            qsl,
            seq,
            bt,
            no_prefix,
            scale,
            return_lse=False,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )[0],
    }
    schemes["relay"] = schemes["relay_triton"]
    if only_ours:  # our kernels alone: relay_triton is relay, not run twice
        return {k: v for k, v in schemes.items() if k != "relay_triton"}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - FA3 missing: report it, run the other schemes
        print(f"# FA3 unavailable: {e!r}", file=sys.stderr)
        flash_attn_varlen_func = None
    own_bt = bt[:, n_pre:].contiguous()
    own_seq = (seq - s.prefix).to(torch.int32)
    T = query.shape[0]

    def fa(q_bt, q_seq, max_k, causal, cu=qsl, max_q=s.query_len, lse=False):
        return flash_attn_varlen_func(
            query,
            kc,
            vc,
            max_seqlen_q=max_q,
            cu_seqlens_q=cu,
            max_seqlen_k=max_k,
            seqused_k=q_seq,
            softmax_scale=scale,
            causal=causal,
            block_table=q_bt,
            return_softmax_lse=lse,
            fa_version=3,
        )

    if flash_attn_varlen_func is not None:
        cu_all = torch.tensor([0, T], dtype=torch.int32, device=query.device)
        seq_pre = torch.tensor([s.prefix], dtype=torch.int32, device=query.device)
        bt_pre = bt[:1, :n_pre].contiguous()
        from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

        def cascade():
            po, pl = fa(bt_pre, seq_pre, s.prefix, False, cu=cu_all, max_q=T, lse=True)
            so, sl = fa(own_bt, own_seq, s.suffix, True, lse=True)
            out = torch.empty_like(query)
            merge_attn_states(out, po, pl, so, sl)
            return out

        schemes["relay_flash"] = _relay_flash(kernels, query, kc, vc, meta, scale)
        schemes["relay_handoff"] = _relay_handoff(kernels, query, kc, vc, meta, scale)
        by_choice = {"relay+fa3": schemes["relay_flash"], "handoff": schemes["relay_handoff"]}
        schemes["relay"] = by_choice.get(backend_choice(kernels.cost_model, s), schemes["relay"])
        schemes["fa3_full"] = lambda: fa(bt, seq, s.prefix + s.suffix, True)
        schemes["cascade"] = cascade
        schemes["fa3_suffix"] = lambda: fa(own_bt, own_seq, s.suffix, True)
    schemes["unified"] = lambda: _unified(query, kc, vc, qsl, seq, bt, s, scale)
    return schemes


def flash_prefix_kernel(num_splits: int = 0):
    """FA3's prefix pass as the CUDA backend calls it (attention/flash_prefix.py; needs vLLM)."""
    import vllm  # noqa: F401  (first: vLLM's attention modules alone import circularly)

    from edgeprompt_vllm.attention.flash_prefix import flash_prefix_attention

    return flash_prefix_attention(3, num_splits)


def _relay_flash(kernels, query, kc, vc, meta, scale, **kw):
    """relay_attention with FA3's prefix pass, as the CUDA backend calls it (`kw`: its other
    arguments, e.g. the schedule)."""
    prefix_attention = flash_prefix_kernel()
    return lambda: kernels.relay_attention(
        query, kc, vc, meta, scale, validate=False, prefix_attention=prefix_attention, **kw
    )


def _relay_handoff(kernels, query, kc, vc, meta, scale):
    """relay_attention's "handoff" schedule as the CUDA backend runs it: FA3's unsplit pass, and
    the handoff's buffers kept from call to call (as a recorded layer pipeline keeps them)."""
    prefix_attention = flash_prefix_kernel(1)
    handoff = kernels.handoff_buffers(query, kc, meta)
    return lambda: kernels.relay_attention(query, kc, vc, meta, scale, validate=False,
                                           prefix_attention=prefix_attention, schedule="handoff",
                                           handoff=handoff)  # fmt: skip


def _replayed_handoff(kernels, query, kc, vc, meta, scale):
    """The handoff schedule (FA3's pass) as the backend runs it per layer: recorded by
    replay.LayerReplay at a first call, replayed (stream switches included) at a second; returns
    the replay's output."""
    import importlib

    import torch

    replay_mod = importlib.import_module(kernels.__name__ + ".replay")
    prefix_attention = flash_prefix_kernel(1)

    def run():
        replay = replay_mod.LayerReplay(lambda query, out: kernels.relay_attention(
            query, kc, vc, meta, scale, out=out, validate=False, schedule="handoff",
            prefix_attention=prefix_attention))  # fmt: skip
        for _ in range(2):
            out = torch.empty_like(query)
            replay(query=query, out=out)
        if not replay.replaying:
            raise RuntimeError("the handoff pipeline was not replayed")
        return out

    return run


def backend_choice(cost_model, s: Shape, num_sms: int = 132) -> str:
    """The CUDA backend's path for this shape's one group: "plain" (FlashAttention over the full
    table), "relay" (our prefix pass), "relay+fa3" (FA3's prefix pass, then our suffix kernel) or
    "handoff" (FA3's pass beside our suffix kernel). `num_sms`: the H100's and H200's."""
    groups = [cost_model.GroupShape(s.batch, s.batch * s.query_len, s.prefix)]
    shape = cost_model.AttentionShape(s.num_q_heads, s.num_kv_heads, s.head_size)
    decisions = cost_model.choose_relay(groups, shape)
    if not decisions[0].relay:
        return "plain"
    if not cost_model.prefix_pass_by_flash(groups, decisions, shape):
        return "relay"
    beside = s.query_len == 1 and cost_model.prefix_pass_beside_suffix(
        s.batch * s.num_kv_heads, num_sms)
    return "handoff" if beside else "relay+fa3"


def _unified(query, kc, vc, qsl, seq, bt, s: Shape, scale):
    import torch
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    out = torch.empty_like(query)
    unified_attention(
        q=query,
        k=kc,
        v=vc,
        out=out,
        cu_seqlens_q=qsl,
        max_seqlen_q=s.query_len,
        seqused_k=seq,
        max_seqlen_k=s.prefix + s.suffix,
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1),
        block_table=bt,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    return out


def time_ms(fn, eager: bool, warmup: float = 25, rep: float = 100) -> tuple[float, str]:
    """(median ms of fn, "graph" or "eager"): CUDA-graph replay unless eager (falls back to eager
    if capture fails); triton's do_bench flushes L2 before each run. warmup / rep: its ms."""
    import torch
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if not eager:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return tt.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median"), "graph"
        except Exception as e:  # noqa: BLE001 - capture failure: fall back to eager timing
            print(f"# graph capture failed ({e!r}); timing eagerly", file=sys.stderr)
    return tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"), "eager"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write of a 1 GiB buffer)."""
    import torch
    import triton.testing as tt

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = tt.do_bench(functools.partial(b.copy_, a), warmup=25, rep=200, return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


# ---------------------------------------------------------------- runs


def run_benchmark(kernels, shapes, args) -> dict:
    import torch

    cost_model = kernels.cost_model
    bw = copy_bandwidth()
    print(f"# measured copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for s in shapes:
        query, kc, vc, meta = shape_batch(kernels, s, "cuda")
        schemes = make_schemes(kernels, s, query, kc, vc, meta)
        ref = schemes["fa3_full"]() if "fa3_full" in schemes else None
        shape_rows = [
            bench_scheme(s, name, schemes[name], ref, bw, args.eager)
            for name in SCHEMES
            if name in schemes
        ]
        times = {r["scheme"]: r["ms"] for r in shape_rows if "ms" in r}
        choice = backend_choice(cost_model, s)
        # the measured winner among the paths the backend can take for the group
        paths = {"plain": "fa3_full", "relay": "relay_triton", "relay+fa3": "relay_flash",
                 "handoff": "relay_handoff"}  # fmt: skip
        measured = {k: times[v] for k, v in paths.items() if v in times}
        for row in shape_rows:
            row["model_choice"] = choice
            if "fa3_full" in times and "ms" in row:
                row["speedup_vs_fa3"] = times["fa3_full"] / row["ms"]
                row["measured_winner"] = min(measured, key=measured.get)
        rows += shape_rows
        print(markdown(shape_rows), flush=True)
        del query, kc, vc, meta, schemes, ref
        torch.cuda.empty_cache()
    return dict(env=environment(), copy_bandwidth_bytes_per_s=bw, rows=rows)


def bench_scheme(s: Shape, name: str, fn, ref, bw: float, eager: bool) -> dict:
    """One row: correctness against FA3 first, then the timing; errors are recorded, not raised."""
    row = dict(asdict(s), scheme=name)
    try:
        out = fn()
        same_problem = (
            ref is not None and name != "fa3_suffix"
        )  # fa3_suffix skips the prefix on purpose
        row["max_abs_diff_vs_fa3"] = (
            (out.float() - ref.float()).abs().max().item() if same_problem else None
        )
        row["ms"], row["timing"] = time_ms(fn, eager)
    except Exception as e:  # noqa: BLE001 - one failing baseline must not end the run
        row["error"] = repr(e)[:300]
        print(f"# {name} failed on {s}: {e!r}", file=sys.stderr)
        return row
    row["bytes"] = problem_bytes(s, suffix_only=name == "fa3_suffix")
    row["gb_per_s"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
    row["pct_copy_bw"] = 100 * row["bytes"] / (row["ms"] * 1e-3) / bw
    row["floor_ms"] = row["bytes"] / bw * 1e3
    return row


def run_check(kernels) -> bool:
    """The CPU tests' comparisons at GPU sizes: relay (each schedule, split), ours_plain against the
    fp32 torch reference over the concatenated KV (the default run also diffs against FA3)."""
    import torch

    cases = {
        "decode_one_group_fp16_mha": dict(
            heads=(32, 32),
            dtype=torch.float16,
            query_lens=[1] * 16,
            own_lens=[577, 1, 37, 300] * 4,
            groups=[(0, 16, 1024)],
        ),
        "decode_groups_of_1_and_ungrouped_bf16_gqa": dict(
            heads=(32, 8),
            dtype=torch.bfloat16,
            query_lens=[1] * 9,
            own_lens=[17, 99, 5, 257, 64, 1, 130, 33, 9],
            groups=[(0, 4, 2048), (4, 5, 512), (7, 9, 64)],
        ),
        "prefill_chunks_fp16_gqa": dict(
            heads=(32, 8),
            dtype=torch.float16,
            query_lens=[37, 17, 1, 129],
            own_lens=[37, 100, 1, 129],
            groups=[(0, 3, 1024)],
        ),
        "no_sharing_bf16_mha": dict(
            heads=(32, 32),
            dtype=torch.bfloat16,
            query_lens=[1, 5, 1],
            own_lens=[1500, 37, 17],
            groups=[],
        ),
        "head64_block32_fp16": dict(
            heads=(16, 4),
            dtype=torch.float16,
            head_size=64,
            block_size=32,
            query_lens=[1] * 8,
            own_lens=[33] * 8,
            groups=[(0, 8, 4096)],
        ),
    }
    ok = True
    for name, c in cases.items():
        q, kc, vc, meta = build_batch(
            kernels,
            c["query_lens"],
            c["own_lens"],
            c["groups"],
            num_q_heads=c["heads"][0],
            num_kv_heads=c["heads"][1],
            head_size=c.get("head_size", 128),
            block_size=c.get("block_size", 16),
            dtype=c["dtype"],
            device="cuda",
            seed=len(name),
        )
        scale = q.shape[2] ** -0.5
        ref = kernels.plain_attention_ref(
            q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, scale
        )
        atol, rtol = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1.6e-2)}[c["dtype"]]
        meta.validate(q.shape[0], kc.shape[1])
        runs = _check_runs(kernels, q, kc, vc, meta, scale)
        for run, fn in runs.items():
            out = fn()
            diff = (out.float() - ref.float()).abs().max().item()
            good = (
                bool(torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol))
                and not out.isnan().any()
            )
            ok &= good
            print(
                f"{'PASS' if good else 'FAIL'} {name:45s} {run:12s} max_abs_diff={diff:.2e}",
                flush=True,
            )
    return ok


def _check_runs(kernels, q, kc, vc, meta, scale) -> dict:
    """The variants --check compares with the reference: name -> zero-argument callable."""
    import torch

    no_prefix = torch.zeros_like(meta.seq_lens)
    relay = functools.partial(kernels.relay_attention, q, kc, vc, meta, scale)
    runs = {}
    if meta.prefix_seq_start_loc is not None:
        try:
            runs["relay_flash"] = _relay_flash(kernels, q, kc, vc, meta, scale)
            runs["handoff_flash"] = _relay_flash(kernels, q, kc, vc, meta, scale,
                                                 schedule="handoff")  # fmt: skip
            runs["handoff_replay"] = _replayed_handoff(kernels, q, kc, vc, meta, scale)
        except ImportError as e:  # no vLLM: our kernels only
            print(f"# relay_flash skipped: {e!r}", flush=True)
    return runs | {
        "relay": relay,
        "relay_overlap": functools.partial(relay, schedule="overlap"),
        "relay_3k": functools.partial(relay, schedule="serial"),
        "relay_handoff": functools.partial(relay, schedule="handoff"),
        "relay_split": functools.partial(relay, suffix_splits=3, prefix_splits=4),
        "ours_plain": lambda: kernels.paged_suffix(
            q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, no_prefix, scale
        )[0],
    }


def run_smoke(kernels, out_dir) -> bool:
    """CPU interpreter: tiny shapes, our kernels against the torch references, no vLLM."""

    rows, ok = [], True
    for s in smoke_grid():
        q, kc, vc, meta = shape_batch(kernels, s, "cpu")
        scale = s.head_size**-0.5
        ref = kernels.plain_attention_ref(
            q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, scale
        )
        for name, fn in make_schemes(kernels, s, q, kc, vc, meta, only_ours=True).items():
            t0 = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - t0) * 1e3
            diff = (out.float() - ref.float()).abs().max().item()
            ok &= diff < (1e-4 if s.dtype == "fp32" else 1e-2)
            rows.append(
                dict(
                    asdict(s),
                    scheme=name,
                    ms=ms,
                    max_abs_diff_vs_ref=diff,
                    timing="cpu-interpreter",
                    bytes=problem_bytes(s),
                )
            )
    result = dict(env=environment(), rows=rows)
    write_outputs(result, out_dir, "kernels_smoke")
    return ok


def tune(kernels, args) -> dict:
    """Sweep the launchers' tile choices on the two decode shapes the design targets."""
    rows = []
    for s in [
        _shape("llama2-7b", "decode", 64, 1024, 576, "fp16"),
        _shape("gqa", "decode", 64, 1024, 576, "fp16"),
    ]:
        query, kc, vc, meta = shape_batch(kernels, s, "cuda")
        scale = s.head_size**-0.5
        for tile_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = dict(TILE_N=tile_n, num_warps=warps, num_stages=stages)
                    fn = functools.partial(
                        kernels.relay_attention,
                        query,
                        kc,
                        vc,
                        meta,
                        scale,
                        validate=False,
                        suffix_config=cfg,
                        prefix_config=cfg,
                    )
                    try:
                        ms, _ = time_ms(fn, args.eager)
                    except Exception as e:  # noqa: BLE001 - a config that fails is skipped
                        print(f"# {cfg} failed: {e!r}", file=sys.stderr)
                        continue
                    rows.append(dict(asdict(s), scheme="relay", ms=ms, **cfg))
                    print(
                        f"{s.model:10s} TILE_N={tile_n:4d} warps={warps} stages={stages}  "
                        f"{ms:.4f} ms",
                        flush=True,
                    )
    return dict(env=environment(), rows=rows)


# ---------------------------------------------------------------- output


def environment() -> dict:
    import torch
    import triton

    env = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        command=" ".join(sys.argv),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
    )
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - vLLM is optional here
        env["vllm"] = None
    env["git_commit"] = git_commit()
    return env


def markdown(rows) -> str:
    head = (
        "| model | mode | dtype | batch | prefix | suffix | scheme | ms | floor ms | GB/s "
        "| % copy BW "
        "| vs FA3 | max diff | model / measured |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['prefix']} | "
                f"{r['suffix']} | {r['scheme']} | error: {r['error'][:60]} |||||||"
            )
            continue
        f = functools.partial(_fmt, r)
        diff = f("max_abs_diff_vs_fa3", ".1e") or f("max_abs_diff_vs_ref", ".1e")
        choice = f"{r['model_choice']} / {r['measured_winner']}" if r.get("measured_winner") else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['prefix']} "
            f"| {r['suffix']} | {r['scheme']} | {f('ms', '.4f')} | {f('floor_ms', '.4f')} "
            f"| {f('gb_per_s', '.0f')} | {f('pct_copy_bw', '.0f')} | {f('speedup_vs_fa3', '.2f')} "
            f"| {diff} | {choice} |"
        )
    return "\n".join(lines)


def _fmt(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else ""


def write_outputs(result: dict, out_dir: str, stem: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result["rows"]))
    print(f"# wrote {path}")
    plot(result, os.path.join(out_dir, f"{stem}.png"))


def plot(result: dict, path: str) -> None:
    """Left: ms vs shared prefix per scheme for the series with the most prefixes. Right: speedup
    of relay over fa3_full (or ms when there is no FA3) for every shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# matplotlib missing: no plot; re-run locally with --plot-only {path[:-4]}.json")
        return
    rows = [r for r in result["rows"] if r.get("ms") is not None]
    if not rows:
        return
    key = lambda r: (r["model"], r["mode"], r["dtype"], r["batch"], r["suffix"])
    series = {}
    for r in rows:
        series.setdefault(key(r), set()).add(r["prefix"])
    best = max(series, key=lambda k: len(series[k]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6))
    for scheme in SCHEMES:
        pts = sorted(
            (r["prefix"], r["ms"]) for r in rows if key(r) == best and r["scheme"] == scheme
        )
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=scheme)
    ax1.set(
        xscale="log", xlabel="shared prefix (tokens)", ylabel="ms", title=" ".join(map(str, best))
    )
    ax1.legend()
    relay = [r for r in rows if r["scheme"] == "relay"]
    vals = [r.get("speedup_vs_fa3") or r["ms"] for r in relay]
    ax2.bar(range(len(relay)), vals)
    ax2.set_xticks(
        range(len(relay)),
        [
            f"{r['model']} {r['mode']} {r['dtype']} b{r['batch']} p{r['prefix']} s{r['suffix']}"
            for r in relay
        ],
        fontsize=7,
        rotation=90,
    )
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set(
        ylabel="speedup of relay vs FA3 full table"
        if relay and relay[0].get("speedup_vs_fa3")
        else "ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


# ---------------------------------------------------------------- main


def git_commit() -> str | None:
    """The commit that runs (bench/env.source_commit: $EDGEPROMPT_COMMIT, else git's HEAD). That
    module needs only the standard library: taken from the checkout when nothing is installed."""
    if REPO not in sys.path:
        sys.path.append(REPO)
    from edgeprompt_vllm.bench.env import source_commit

    return source_commit(short=False) or None


def import_kernels():
    try:
        from edgeprompt_vllm import kernels
    except ImportError:  # not installed: use the checkout's top-level kernels/ package
        sys.path.insert(0, REPO)
        import kernels
    return kernels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "kernels"))
    p.add_argument("--full", action="store_true", help="the full grid (tens of minutes)")
    p.add_argument("--smoke", action="store_true", help="CPU-capable tiny run of our kernels only")
    p.add_argument("--check", action="store_true", help="GPU correctness cases, PASS/FAIL")
    p.add_argument(
        "--tune", action="store_true", help="sweep our tile choices on two decode shapes"
    )
    p.add_argument(
        "--eager", action="store_true", help="time eager calls instead of CUDA-graph replays"
    )
    p.add_argument("--plot-only", metavar="FILE", help="re-plot a JSON written by an earlier run")
    args = p.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), args.plot_only[:-5] + ".png")
        return 0
    import torch

    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    kernels = import_kernels()
    if args.smoke:
        return 0 if run_smoke(kernels, args.out) else 1
    if not torch.cuda.is_available():
        print("no CUDA device: use --smoke on CPU", file=sys.stderr)
        return 2
    if args.check:
        return 0 if run_check(kernels) else 1
    if args.tune:
        write_outputs(tune(kernels, args), args.out, "kernels_tune")
        return 0
    t0 = time.time()
    result = run_benchmark(kernels, full_grid() if args.full else default_grid(), args)
    result["wall_s"] = time.time() - t0
    write_outputs(result, args.out, "kernels_full" if args.full else "kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
