"""Cost model: serve a group's shared prefix by relay (read once per batch) or plain (per request)?

Pure Python (no torch), so the scheduler-side metadata builder can call it cheaply.

Per group of n requests with T query tokens sharing P prefix tokens (kv = K+V bytes per token for
all KV heads, q = query bytes per token for all heads, F = 4 * T * P * num_q_heads * head_size
FLOPs for QK^T and PV):

    plain = max(P*kv/HBM + (n-1)*P*kv/REREAD,  F / PLAIN_FLOPS)
        every request reads the prefix itself; the first read comes from HBM, re-reads of the
        physically shared blocks mostly from L2 (REREAD, an effective bandwidth: high while the
        prefix KV stays resident in L2, ~7 TB/s once it does not)
    relay = max(P*kv/HBM + T*q/HBM + 2*S*T*num_q_heads*head_size*4/HBM,  F / RELAY_FLOPS,
                ceil(tiles / S) * PREFIX_TILE)
        the prefix pass reads the shared KV once, re-reads the group's queries, and writes S fp32
        partial states that the suffix kernel's epilogue reads back (S = prefix splits of the
        backend's "fused" schedule, at most 4); and each of its programs walks its share of the
        prefix's key tiles one after another (a small group over a long prefix: few programs,
        long ones)

A batch's relaying groups then take the prefix pass from FA3 instead of our Triton kernel when
that is cheaper (prefix_pass_by_flash; CUDA backend): FA3 runs the pass at a higher FLOP rate
but costs a fixed ~18 us (fa_prefix_time), so it wins where the pass has much tensor work
(large groups over long prefixes). Where the suffix launch has a middling number of programs per
SM, FA3's pass runs beside it instead of before it (prefix_pass_beside_suffix, measured).

The suffix work is the same either way and cancels. A group relays when relay < plain; the batch
runs the prefix pass only when the groups it would serve save more than one extra launch
(LAUNCH). Decode is memory-bound, so a shared prefix read n times pays for itself quickly;
prefill is compute-bound (every edge token attends to every cloud token either way), so there
relay wins only if its prefix kernel matches the plain kernel's FLOP rate. Where vLLM can replay
a whole decode step as one CUDA graph (attention/graph_mode.py), a step leaves that graph for
relay only if the saving over all layers exceeds PIECEWISE_STEP (worth_leaving_full_graph).

Numbers are per device; each is marked measured (with its source) or guessed. Re-fit them with
benchmarks/benchmark_kernels.py, which prints this model's choice next to the measured winner.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceModel:
    name: str
    hbm_bytes_per_s: float  # HBM bandwidth seen by a streaming kernel
    reread_bytes_per_s: float  # effective bandwidth of plain attention re-reading shared blocks
    l2_reread_bytes_per_s: float  # the same while the shared prefix KV stays resident in L2
    l2_resident_bytes: int  # largest shared-prefix KV (bytes) that stays resident
    plain_flops_per_s: float  # dense attention FLOP rate of the plain kernel (FA3 on Hopper)
    relay_flops_per_s: float  # dense FLOP rate of our Triton prefix kernel
    launch_s: float  # one more kernel launch in a CUDA-graph replay, incl. its tail
    prefix_tile_s: float  # one prefix program's time per 64-key tile (the pass's critical path)
    fa_prefix_fixed_s: float  # FA3's prefix pass (external_prefix.py): its cost at no FLOPs ...
    fa_prefix_flops_per_s: float  # ... plus the FLOPs at this rate
    piecewise_step_s: float  # a decode step run piecewise (attention eager), not as one FULL graph
    num_sms: int
    notes: dict = field(default_factory=dict, compare=False)


H100 = DeviceModel(
    name="H100 SXM",
    hbm_bytes_per_s=3.0e12,
    reread_bytes_per_s=7.0e12,
    l2_reread_bytes_per_s=4.0e13,
    l2_resident_bytes=2 << 20,
    plain_flops_per_s=6.1e14,
    relay_flops_per_s=2.3e14,
    launch_s=5e-6,
    prefix_tile_s=2.3e-6,
    fa_prefix_fixed_s=18e-6,
    fa_prefix_flops_per_s=6.2e14,
    piecewise_step_s=2e-3,
    num_sms=132,
    notes={
        "hbm_bytes_per_s": (
            "guessed: the 3 TB/s DESIGN.md's HBM floor uses (H100 SXM peak 3.35 TB/s; "
            "benchmark_kernels.py measured a 3.0 TB/s device-to-device copy)"
        ),
        "reread_bytes_per_s": (
            "measured: DESIGN.md kernel table, FA3 shared blocks minus suffix only; batch 64 / "
            "prefix 1024: 0.386 - 0.231 ms for 64 reads of 16.8 MB gives 7.1 TB/s for the 63 "
            "re-reads (6.7-7.0 TB/s at the other decode rows)"
        ),
        "l2_reread_bytes_per_s": (
            "measured: benchmark_kernels.py on an H100, batch 64 / prefix 64 (1 MB of shared KV): "
            "FA3 full table 0.2275 ms vs own blocks only 0.2260 ms, ~1.5 us for 63 re-reads of "
            "1 MB, about 40 TB/s"
        ),
        "l2_resident_bytes": (
            "guessed: between two measured points, 1 MB (resident, above) and 4.2 MB (GQA batch "
            "64 / prefix 1024: 63 re-reads in 33.5 us, 7.9 TB/s); the H100's 50 MB of L2 is "
            "shared with the streaming suffix KV"
        ),
        "plain_flops_per_s": "measured: DESIGN.md prefill row, (0.198 - 0.086) ms for 68.7 GFLOP",
        "relay_flops_per_s": (
            "measured: benchmark_kernels.py on an H100, our kernel on 8 x 512 prefill queries "
            "(best of 24 tile configurations), 227 TFLOP/s"
        ),
        "launch_s": (
            "measured: relay on an H100 at batch 64 / prefix 64 costs 3.8 us over FA3 on the own "
            "blocks alone (the merge launch and the partial states); rounded up"
        ),
        "prefix_tile_s": (
            "measured: sweep_relay_decode.py on an H100 (session 13), the prefix pass alone of 8 "
            "GQA decode requests over a 4096-token prefix, 4 splits of 16 tiles of 64 keys: "
            "0.0373 ms, 2.3 us a tile (batch 32-64 / prefix 1024, 4 tiles a split: 0.0145-0.0149 "
            "ms, about 5 us of launch plus 2.4 us a tile)"
        ),
        "fa_prefix_fixed_s": (
            "measured on an H200 (sweep_relay_decode.py --fa3, session 14): FA3's prefix pass "
            "alone over 9 decode groups of 2-34 GFLOP fits 18 us + FLOPs / 700 TFLOP/s within "
            "~20% (2.15 GFLOP: 0.023 ms; 17.2 GFLOP: 0.040-0.050 ms; 34.4 GFLOP: 0.066 ms); "
            "the fixed part taken for the H100 too (guessed)"
        ),
        "fa_prefix_flops_per_s": (
            "guessed for the H100: the H200's measured 700 TFLOP/s (above) scaled by the SM clocks "
            "(1.755 / 1.98 GHz)"
        ),
        "piecewise_step_s": (
            "guessed between two H100 measurements (benchmarks/results/README.md): at large "
            "batches a relay-backend step with no group relayed took ~0.8 ms more under piecewise "
            "graphs than stock's FULL graph (throughput at a 64-token prompt, 2.6% of a ~30 ms "
            "step, before FULL graphs); serving at 4 req/s (a few requests per step), "
            "EdgePrompt's p50 TPOT was 3.5 ms above stock's (host-bound eager layers)"
        ),
    },
)


@dataclass(frozen=True)
class AttentionShape:
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int = 2  # fp16 / bf16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_size * self.dtype_bytes

    @property
    def q_bytes_per_token(self) -> int:
        return self.num_q_heads * self.head_size * self.dtype_bytes


@dataclass(frozen=True)
class GroupShape:
    num_reqs: int  # requests sharing the prefix in this batch
    num_query_tokens: int  # their query tokens (decode: num_reqs)
    prefix_len: int  # shared tokens


@dataclass(frozen=True)
class GroupDecision:
    relay: bool
    plain_s: float
    relay_s: float

    @property
    def saving_s(self) -> float:
        """Seconds per layer a prefix pass saves this group over plain attention."""
        return self.plain_s - self.relay_s


def _prefix_rows(group: GroupShape, shape: AttentionShape) -> tuple[int, int]:
    """(padded query heads per KV head, rows per KV head) of the prefix pass's dot."""
    qpk_pad = _next_pow2(shape.num_q_heads // shape.num_kv_heads)
    return qpk_pad, _next_pow2(max(group.num_query_tokens, 1) * qpk_pad)


def prefix_tile_keys(group: GroupShape, shape: AttentionShape) -> int:
    """Keys per tile of the prefix pass (relay_prefix._prefix_config's TILE_N)."""
    _, rows = _prefix_rows(group, shape)
    small_tiles = rows >= 512 or shape.head_size > 128  # relay_prefix.LARGE_DECODE_ROWS, BIG_ROWS
    return 32 if small_tiles else 64


def prefix_tiles(group: GroupShape, shape: AttentionShape) -> int:
    """Key tiles of the group's prefix in the prefix pass."""
    return max(-(-group.prefix_len // prefix_tile_keys(group, shape)), 1)


def prefix_splits(group: GroupShape, shape: AttentionShape, device: DeviceModel) -> int:
    """The prefix split count relay_prefix's launcher picks for this group alone, as the backend's
    "fused" schedule runs it (mirrors relay_prefix._prefix_config and _pick_num_splits with
    fused=True; a test keeps them in step)."""
    qpk_pad, rows = _prefix_rows(group, shape)
    big = rows >= 4096  # relay_prefix.BIG_ROWS
    block_m = max(128 if big else min(max(rows, 16), 64), qpk_pad)
    m_tiles = max(-(-group.num_query_tokens // max(block_m // qpk_pad, 1)), 1)
    tiles = prefix_tiles(group, shape)
    programs = max(m_tiles * shape.num_kv_heads, 1)
    splits = max(1, min(-(-device.num_sms // programs), -(-tiles // 2), 4))  # MAX_FUSED_SPLITS
    return -(-tiles // -(-tiles // splits))


def plain_time(group: GroupShape, shape: AttentionShape, device: DeviceModel) -> float:
    """Seconds plain attention spends on this group's shared prefix."""
    kv = group.prefix_len * shape.kv_bytes_per_token
    reread = (
        device.l2_reread_bytes_per_s
        if kv <= device.l2_resident_bytes
        else device.reread_bytes_per_s
    )
    memory = kv / device.hbm_bytes_per_s + (group.num_reqs - 1) * kv / reread
    return max(memory, _flops(group, shape) / device.plain_flops_per_s)


def relay_time(group: GroupShape, shape: AttentionShape, device: DeviceModel) -> float:
    """Seconds the prefix pass (and the fused merge's partial traffic) spends on this group."""
    splits = prefix_splits(group, shape, device)
    partial = (
        2
        * splits
        * group.num_query_tokens
        * shape.num_q_heads
        * shape.head_size
        * 4
    )
    memory = (
        group.prefix_len * shape.kv_bytes_per_token
        + group.num_query_tokens * shape.q_bytes_per_token
        + partial
    ) / device.hbm_bytes_per_s
    tile_s = device.prefix_tile_s * prefix_tile_keys(group, shape) / 64
    critical_path = -(-prefix_tiles(group, shape) // splits) * tile_s
    return max(memory, _flops(group, shape) / device.relay_flops_per_s, critical_path)


def fa_prefix_time(
    groups: list[GroupShape], shape: AttentionShape, device: DeviceModel = H100
) -> float:
    """Seconds FA3's prefix pass takes for these groups, all in one varlen call."""
    flops = sum(_flops(g, shape) for g in groups)
    return device.fa_prefix_fixed_s + flops / device.fa_prefix_flops_per_s


def prefix_pass_by_flash(
    groups: list[GroupShape],
    decisions: list[GroupDecision],
    shape: AttentionShape,
    device: DeviceModel = H100,
) -> bool:
    """Whether the relaying groups' prefix pass is cheaper by FA3 (one call for all of them,
    external_prefix.py, fa_prefix_time) than by our Triton pass, counted as its tensor work
    alone (FLOPs / relay_flops_per_s): the rest of our pass (a small group's long chain of tiles,
    relay_time's critical path) runs beside the suffix kernel in the fused schedule, while FA3's
    pass runs before it. On an H200 (sweep_relay_decode.py --fa3, 21 decode shapes) this picks
    the faster of the two on all but three: MHA 64 / 4096 and 256 / 1024 (FA3 4% and 1.3%
    faster) and 8 GQA requests over 4096 (FA3 14% faster; choose_relay sends that group to plain
    attention, which measured the same). With the critical path counted it sent 32 GQA requests
    over a 4096-token prefix to FA3, 27% slower. With the H100 numbers the rule is: FA3 from
    ~6.6 GFLOP of prefix work in the batch."""
    relaying = [g for g, d in zip(groups, decisions) if d.relay]
    ours = sum(_flops(g, shape) for g in relaying) / device.relay_flops_per_s
    return bool(relaying) and fa_prefix_time(relaying, shape, device) < ours


# The "handoff" schedule (handoff.py) runs FA3's unsplit prefix pass on a side stream beside the
# suffix kernel, with no merge launch after it. Measured on an H200 against FA3's pass before the
# suffix (benchmarks/results/kernels/decode_h200_session18.md), by suffix programs (requests x KV
# heads) per SM: GQA batch 256 (15.5 per SM) 4-7% faster at prefix 2048 and 4096, batch 384 (23)
# 7% faster; batch 512 (31) 4% slower, MHA batch 256 (62) 4% slower; batch 128 (7.8) 1-6% slower
# and batch 64 (3.9) 2% faster to 24% slower, bimodal between timings. So: beside from 12 to 24.
HANDOFF_PROGRAMS_PER_SM = (12.0, 24.0)


def prefix_pass_beside_suffix(num_suffix_programs: int, num_sms: int) -> bool:
    """Whether a batch whose prefix pass is FA3's (prefix_pass_by_flash) runs it beside the
    suffix kernel (relay_attention's "handoff" schedule) rather than before it ("fused"):
    `num_suffix_programs` = the suffix launch's (query tile, KV head) programs (decode: requests
    x KV heads). Enough of them keep the SMs FA3 leaves streaming; too many (or a pass that
    fills the GPU) leave nothing for the overlap to hide."""
    low, high = HANDOFF_PROGRAMS_PER_SM
    return low <= num_suffix_programs / num_sms <= high


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _flops(group: GroupShape, shape: AttentionShape) -> float:
    return 4.0 * group.num_query_tokens * group.prefix_len * shape.num_q_heads * shape.head_size


def relay_saving(decisions: list[GroupDecision]) -> float:
    """Seconds per layer the relaying groups save over plain attention."""
    return sum(d.saving_s for d in decisions if d.relay)


def choose_relay(
    groups: list[GroupShape], shape: AttentionShape, device: DeviceModel = H100
) -> list[GroupDecision]:
    """Per group: relay or plain. Groups of one request or an empty prefix never relay (nothing is
    shared). If the relaying groups together save less than one launch, none relays."""
    decisions = []
    for g in groups:
        t_plain, t_relay = plain_time(g, shape, device), relay_time(g, shape, device)
        shared = g.num_reqs > 1 and g.prefix_len > 0
        decisions.append(
            GroupDecision(relay=shared and t_relay < t_plain, plain_s=t_plain, relay_s=t_relay)
        )
    if relay_saving(decisions) <= device.launch_s:
        decisions = [GroupDecision(False, d.plain_s, d.relay_s) for d in decisions]
    return decisions


def worth_leaving_full_graph(decisions: list[GroupDecision], num_layers: int,
                             piecewise_step_s: float = H100.piecewise_step_s) -> bool:
    """Whether the relaying groups save more over all layers of a decode step than running that
    step piecewise (attention eager) instead of as one FULL CUDA graph costs."""
    return num_layers * relay_saving(decisions) > piecewise_step_s
