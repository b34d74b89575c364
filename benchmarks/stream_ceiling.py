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
  suffix           our suffix kernel over the same pages, without a prefix state (paged_suffix)

(The first run, commit e1da2a0, also timed a flat grid-stride read and 128-key tiles: an untuned
read kernel and a spilling accumulator, so both were dropped. Summing each tile's columns
instead of keeping the [N, head] tile made every row slower.)

and reports each as GB/s of own-KV bytes and as a share of the copy bandwidth. Table to stdout,
JSON to OUT.json when given.
"""

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

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
        keys = pos + offs_n
        valid = keys < end
        blk = tl.load(block_table_ptr + req * stride_bt + keys // BLOCK_SIZE, mask=valid, other=0)
        row = blk.to(tl.int64) * stride_blk + (keys % BLOCK_SIZE) * stride_slot
        ptr = row[:, None] + kv_head * stride_head + offs_d[None, :]
        k = tl.load(key_cache_ptr + ptr, mask=valid[:, None], other=0.0)
        v = tl.load(value_cache_ptr + ptr, mask=valid[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + req * tl.num_programs(1) + kv_head, tl.sum(acc))


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

    out = {}
    for tile_n, stages in [(64, 2), (64, 3), (64, 4), (32, 4)]:
        out[f"gather_n{tile_n}_s{stages}"] = gather(tile_n, stages)
    out["suffix"] = lambda: kernels.paged_suffix(
        query, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_table, meta.prefix_lens,
        scale, return_lse=False, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
    )[0]  # fmt: skip
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="write JSON here")
    p.add_argument("--shapes", default="gqa:256:4096,gqa:512:4096,llama2-7b:256:4096,gqa:64:1024")
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
        for name, fn in schemes(s, *batch_args).items():
            ms = sw.graph_ms(fn, sw.rep_for(nbytes / bw * 1.5e3))[0]
            rows.append(dict(model=s.model, batch=s.batch, prefix=s.prefix, scheme=name, ms=ms,
                             gbps=nbytes / ms / 1e6, pct_copy=100 * nbytes / bw / (ms * 1e-3)))
            print(f"{s.model} {s.batch} {s.prefix} {name}: {ms:.4f} ms, "
                  f"{rows[-1]['gbps']:.0f} GB/s, {rows[-1]['pct_copy']:.0f}% of copy",
                  file=sys.stderr)  # fmt: skip
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, triton {triton.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s; own KV of"
          " a decode batch, 576 tokens per request, fp16, head 128, block 16")  # fmt: skip
    print("| model | batch | prefix | scheme | ms | GB/s of own KV | % of copy BW |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['scheme']} | {r['ms']:.4f} | "
              f"{r['gbps']:.0f} | {r['pct_copy']:.0f} |")  # fmt: skip
    if args.out:
        env = dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                   command=" ".join(sys.argv), git_commit=os.environ.get("EDGEPROMPT_COMMIT"))
        json.dump(dict(env=env, copy_bandwidth_bytes_per_s=bw, rows=rows), open(args.out, "w"),
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
