"""How fast can a decode batch's own KV be read at all? The ceiling under the suffix (issue 3).

    python benchmarks/stream_ceiling.py [OUT.json] [--shapes gqa:256:4096,...]   # CUDA

The "% of copy bandwidth" the kernel tables report divides by a device-to-device copy (read +
write). The suffix pass only reads, and reads each request's pages through its block table, in
256-byte rows (one KV head of one token) 2 KB apart. Per shape (sweep_relay_decode.py's batches:
576 own tokens per request, head 128, block 16, fp16) this times, CUDA-graph replays with the L2
flushed as the kernel tables do:

  gather_nN_sS     every (request, KV head) program walks its pages as the suffix kernel does, N
                   keys per tile, S stages, 4 warps, and adds K and V into a [N, head] fp32
                   tile (no attention): how fast this access pattern reads at least
  tma_sS           the same walk, one page per step, each page's K and V (16 slots x one KV head)
                   by a TMA copy through a tensor descriptor over the cache, S stages
  dots_n64_s2      gather_n64_s2 plus the suffix kernel's two dots per tile (S = Q K^T, P V on a
                   16-row tile of the KV head's query heads), no softmax between them
  softmax_n64_s2   and the online softmax between them too (the suffix's loop, less its masks,
                   block-id prefetch and epilogue)
  suffix           our suffix kernel over the same pages, without a prefix state (paged_suffix)
  suffix_<tag>     the same with sweep_relay_decode.py's REGISTER_CAP_CONFIGS[tag] (tiles,
                   stages, warps, a register cap)

--beside-fa3 (needs vLLM) also times each of them with FA3's unsplit prefix pass running beside it
on a high-priority side stream (the overlap_flash_z1_hi schedule of sweep_relay_decode.py), and
FA3's pass alone: that pass fills about half the SMs of an H200 at GQA batch 256, so these rows
show whether the other SMs can stream the own KV at the full rate, or each SM only at its share
(on an H200 a plain read could, our suffix kernel less so: see
benchmarks/results/kernels/decode_h200_session16.md).

(The first run, commit e1da2a0, also timed a flat grid-stride read and 128-key tiles: an untuned
read kernel and a spilling accumulator, so both were dropped. Summing each tile's columns
instead of keeping the [N, head] tile made every row slower.)

and reports each as GB/s of own-KV bytes and as a share of the copy bandwidth, and whether each
probe's sums match gather_n64_s2's (the same bytes were read), and each suffix_* probe's output
`suffix`'s. Table to stdout, JSON to OUT.json when given. --only REGEX times the probes whose
names match.
"""

import argparse
import importlib
import json
import os
import re
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import benchmark_kernels as bk  # noqa: E402
import sweep_relay_decode as sw  # noqa: E402

kernels = sw.kernels


@triton.jit
def _gather_kernel(
    out_ptr,  # [num_reqs, num_kv_heads] float32
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,
    block_table_ptr,  # [num_reqs, max_blocks] int32
    prefix_lens_ptr,  # [num_reqs] int32: own keys start here
    seq_lens_ptr,  # [num_reqs] int32
    stride_bt,
    stride_blk,
    stride_slot,
    stride_head,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    start = tl.load(prefix_lens_ptr + req)
    end = tl.load(seq_lens_ptr + req)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD)
    acc = tl.zeros([TILE_N, HEAD], tl.float32)
    for pos in tl.range(start, end, TILE_N, num_stages=NUM_STAGES):
        k, v, _ = _own_tile(key_cache_ptr, value_cache_ptr, block_table_ptr + req * stride_bt,
                            kv_head, pos + offs_n, end, stride_blk, stride_slot, stride_head,
                            offs_d, BLOCK_SIZE)  # fmt: skip
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + req * tl.num_programs(1) + kv_head, tl.sum(acc))


@triton.jit
def _own_tile(key_cache_ptr, value_cache_ptr, block_row_ptr, kv_head, keys, end, stride_blk,
              stride_slot, stride_head, offs_d, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """(K, V, in range) of the keys at positions `keys` of one request ([TILE_N, HEAD] each,
    0 past `end`), gathered through its block-table row as the suffix kernel does."""
    valid = keys < end
    blk = tl.load(block_row_ptr + keys // BLOCK_SIZE, mask=valid, other=0)
    row = blk.to(tl.int64) * stride_blk + (keys % BLOCK_SIZE) * stride_slot
    ptr = row[:, None] + kv_head * stride_head + offs_d[None, :]
    k = tl.load(key_cache_ptr + ptr, mask=valid[:, None], other=0.0)
    v = tl.load(value_cache_ptr + ptr, mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _work_kernel(
    out_ptr,  # [num_reqs, num_kv_heads] float32
    query_ptr,  # [num_reqs, num_q_heads, head_size]: one decode token per request
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,
    block_table_ptr,  # [num_reqs, max_blocks] int32
    prefix_lens_ptr,  # [num_reqs] int32: own keys start here
    seq_lens_ptr,  # [num_reqs] int32
    stride_qt,
    stride_qh,
    stride_bt,
    stride_blk,
    stride_slot,
    stride_head,
    QPK: tl.constexpr,  # query heads per KV head (rows of the query tile, padded to 16)
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SOFTMAX: tl.constexpr,  # False: the two dots only; True: the suffix's online softmax too
):
    """The gather walk plus the suffix kernel's work per tile: S = Q K^T and P V on a 16-row
    query tile (the KV head's query heads), with or without the online softmax between them."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    start = tl.load(prefix_lens_ptr + req)
    end = tl.load(seq_lens_ptr + req)
    offs_m = tl.arange(0, 16)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD)
    q_rows = req * stride_qt + (kv_head * QPK + offs_m) * stride_qh
    q = tl.load(query_ptr + q_rows[:, None] + offs_d[None, :], mask=(offs_m < QPK)[:, None],
                other=0.0)  # fmt: skip
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, HEAD], tl.float32)
    for pos in tl.range(start, end, TILE_N, num_stages=NUM_STAGES):
        k, v, valid = _own_tile(key_cache_ptr, value_cache_ptr, block_table_ptr + req * stride_bt,
                                kv_head, pos + offs_n, end, stride_blk, stride_slot, stride_head,
                                offs_d, BLOCK_SIZE)  # fmt: skip
        s = tl.dot(q, tl.trans(k))  # (16, TILE_N)
        if SOFTMAX:
            s = tl.where(valid[None, :], s * 0.1275, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        else:
            acc += tl.dot(s.to(v.dtype), v)
    tl.store(out_ptr + req * tl.num_programs(1) + kv_head, tl.sum(acc) + tl.sum(l_i))


@triton.jit
def _tma_kernel(
    out_ptr,  # [num_reqs, num_kv_heads] float32
    k_desc,  # the key cache as [num_blocks * block_size, num_kv_heads, head_size], box [bs, 1, hd]
    v_desc,
    block_table_ptr,  # [num_reqs, max_blocks] int32
    prefix_lens_ptr,  # [num_reqs] int32: own keys start here (block-aligned here)
    seq_lens_ptr,  # [num_reqs] int32
    stride_bt,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    first = tl.load(prefix_lens_ptr + req) // BLOCK_SIZE
    seq_len = tl.load(seq_lens_ptr + req)
    end = tl.cdiv(seq_len, BLOCK_SIZE)
    slots = tl.arange(0, BLOCK_SIZE)
    acc = tl.zeros([BLOCK_SIZE, HEAD], tl.float32)
    for page in tl.range(first, end, num_stages=NUM_STAGES):
        row = tl.load(block_table_ptr + req * stride_bt + page) * BLOCK_SIZE
        k = k_desc.load([row, kv_head, 0]).reshape(BLOCK_SIZE, HEAD)
        v = v_desc.load([row, kv_head, 0]).reshape(BLOCK_SIZE, HEAD)
        in_seq = page * BLOCK_SIZE + slots < seq_len  # the last page's tail is not the sequence's
        acc += tl.where(in_seq[:, None], k.to(tl.float32) + v.to(tl.float32), 0.0)
    tl.store(out_ptr + req * tl.num_programs(1) + kv_head, tl.sum(acc))


def page_descriptor(cache: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor over a [num_blocks, block_size, num_kv_heads, head_size] cache whose box is
    one page of one KV head: block_size rows of head_size, num_kv_heads * head_size apart."""
    nb, bs, h, d = cache.shape
    return TensorDescriptor(cache.view(nb * bs, h, d), [nb * bs, h, d], [h * d, d, 1], [bs, 1, d])


def own_kv_bytes(s) -> int:
    return s.batch * s.suffix * 2 * s.num_kv_heads * s.head_size * 2


def schemes(s, query, kc, vc, meta) -> dict:
    """name -> zero-argument callable reading this batch's own KV."""
    gather_out = torch.empty(s.batch, s.num_kv_heads, dtype=torch.float32, device=query.device)
    scale = s.head_size**-0.5

    def gather(tile_n, stages):
        def run():
            _gather_kernel[(s.batch, s.num_kv_heads)](
                gather_out, kc, vc, meta.block_table, meta.prefix_lens, meta.seq_lens,
                meta.block_table.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
                HEAD=s.head_size, BLOCK_SIZE=s.block_size, TILE_N=tile_n, NUM_STAGES=stages,
                num_warps=4,
            )  # fmt: skip
            return gather_out

        return run

    def tma(stages):
        k_desc, v_desc = page_descriptor(kc), page_descriptor(vc)

        def run():
            _tma_kernel[(s.batch, s.num_kv_heads)](
                gather_out, k_desc, v_desc, meta.block_table, meta.prefix_lens, meta.seq_lens,
                meta.block_table.stride(0), HEAD=s.head_size, BLOCK_SIZE=s.block_size,
                NUM_STAGES=stages, num_warps=4,
            )  # fmt: skip
            return gather_out

        return run

    def work(softmax):
        def run():
            _work_kernel[(s.batch, s.num_kv_heads)](
                gather_out, query, kc, vc, meta.block_table, meta.prefix_lens, meta.seq_lens,
                query.stride(0), query.stride(1), meta.block_table.stride(0), kc.stride(0),
                kc.stride(1), kc.stride(2), QPK=s.num_q_heads // s.num_kv_heads, HEAD=s.head_size,
                BLOCK_SIZE=s.block_size, TILE_N=64, NUM_STAGES=2, SOFTMAX=softmax, num_warps=4,
            )  # fmt: skip
            return gather_out

        return run

    out = {}
    for tile_n, stages in [(64, 2), (64, 3), (64, 4), (32, 4)]:
        out[f"gather_n{tile_n}_s{stages}"] = gather(tile_n, stages)
    out["dots_n64_s2"] = work(False)
    out["softmax_n64_s2"] = work(True)
    for stages in (2, 3, 4, 6):
        out[f"tma_s{stages}"] = tma(stages)
    for name, config in SUFFIX_PROBES.items():
        out[name] = lambda config=config: kernels.paged_suffix(
            query, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table,
            meta.prefix_lens, scale, return_lse=False, max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len, config=config,
        )[0]  # fmt: skip
    return out


# our suffix kernel, as the backend configures it and with a register cap
SUFFIX_PROBES = {"suffix": None, "suffix_hf": {"HEAD_FASTEST": True}}  # hf: as behind FA3
SUFFIX_PROBES.update({f"suffix_{tag}": knobs for tag, knobs in sw.REGISTER_CAP_CONFIGS.items()})


def beside_fa3(s, query, kc, vc, meta, runs: dict) -> dict:
    """FA3's unsplit prefix pass alone, and each run with that pass on a high-priority side
    stream beside it (forked and joined as relay_attention's overlap schedule does)."""
    external = importlib.import_module(kernels.__name__ + ".external_prefix")
    relay = importlib.import_module(kernels.__name__ + ".relay_attention")
    side = sw.launch_mod.side_stream(query.device, -1)
    fa3 = bk.flash_prefix_kernel(1)
    state = external.external_state_buffers(query)
    scale = s.head_size**-0.5

    def prefix():
        external.external_prefix_state(fa3, query, kc, vc, meta, scale, state=state)

    def both(run):
        def call():
            with relay._forked(side) as fork:
                prefix()
            out = run()
            relay._join(fork)
            return out

        return call

    out = {"fa3_prefix_z1": prefix}
    out.update({f"{name}+fa3": both(run) for name, run in runs.items()})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="write JSON here")
    p.add_argument("--shapes", default="gqa:256:4096,gqa:512:4096,llama2-7b:256:4096,gqa:64:1024")
    p.add_argument("--only", help="time only the probes whose names match this regex")
    p.add_argument("--beside-fa3", action="store_true",
                   help="also beside FA3's unsplit prefix pass on a side stream (needs vLLM)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("stream_ceiling.py times reads of GPU memory: it needs a CUDA GPU")
    bw = bk.copy_bandwidth()
    rows = []
    for spec in args.shapes.split(","):
        model, batch, prefix = spec.split(":")
        s = bk._shape(model, "decode", int(batch), int(prefix), 576, "fp16")
        batch_args = bk.shape_batch(kernels, s, "cuda")
        nbytes = own_kv_bytes(s)
        runs = schemes(s, *batch_args)
        first = runs["gather_n64_s2"]().clone()  # every probe must read the same own KV
        first_out = runs["suffix"]().clone()  # and every suffix probe give the same output
        if args.only:
            runs = {k: v for k, v in runs.items() if re.search(args.only, k)}
        if args.beside_fa3:
            runs.update(beside_fa3(s, *batch_args, runs))
        for name, fn in runs.items():
            same = None
            if name.startswith(("gather", "tma")):
                same = bool(torch.allclose(fn(), first, rtol=1e-3, atol=1e-2))
            elif name.startswith("suffix"):
                same = bool(torch.allclose(fn(), first_out, rtol=1e-2, atol=2e-3))
            ms = sw.graph_ms(fn, sw.rep_for(nbytes / bw * 1.5e3))[0]
            rows.append(dict(model=s.model, batch=s.batch, prefix=s.prefix, scheme=name, ms=ms,
                             gbps=nbytes / ms / 1e6, pct_copy=100 * nbytes / bw / (ms * 1e-3),
                             same_sums=same))  # fmt: skip
            print(f"{s.model} {s.batch} {s.prefix} {name}: {ms:.4f} ms, "
                  f"{rows[-1]['gbps']:.0f} GB/s, {rows[-1]['pct_copy']:.0f}% of copy"
                  + ("" if same is None else f", sums {'match' if same else 'DIFFER'}"),
                  file=sys.stderr)  # fmt: skip
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, triton {triton.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s; own KV of"
          " a decode batch, 576 tokens per request, fp16, head 128, block 16")  # fmt: skip
    print("| model | batch | prefix | scheme | ms | GB/s of own KV | % of copy BW | sums |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {None: "", True: "match", False: "DIFFER"}[r["same_sums"]]
        print(f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['scheme']} | {r['ms']:.4f} | "
              f"{r['gbps']:.0f} | {r['pct_copy']:.0f} | {same} |")  # fmt: skip
    if args.out:
        env = dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                   command=" ".join(sys.argv), git_commit=os.environ.get("EDGEPROMPT_COMMIT"))
        json.dump(dict(env=env, copy_bandwidth_bytes_per_s=bw, rows=rows), open(args.out, "w"),
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
