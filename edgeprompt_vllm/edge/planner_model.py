"""The planner's communication model: pure functions of one request's `Costs` (DESIGN.md,
"The communication model"; paper §2.3).

Per layer l = 1..L: cloud compute t_c, transfer t_tr (bytes / bandwidth + per-message latency),
edge compute t_e. With layer-wise overlap

    T = T_init + t_c + t_tr + (L - 1) * max(t_tr, t_e) + t_e                       (pipelined)

    t_tr >= t_e: T ~ T_init + t_c + L * t_tr + t_e      (communication-bound, paper Eq. 12)
    t_e > t_tr:  T ~ T_init + t_c + t_tr + L * t_e      (edge-compute-bound, Eq. 13)

A warm cloud prompt drops t_c; one already on the edge drops t_tr. The planner predicts T for
each strategy and picks the fastest:

    layerwise  one layer per message (g = 1), pipelined
    grouped    g layers per message: message time g * bytes / bw + latency (amortises latency)
    bulk       one message of all L layers (g = L)
    recompute  no transfer: the edge prefills the cloud prompt itself (L * t_e of all tokens)

`predict` runs the three-stage pipeline (cloud compute -> serial link -> edge compute) as a
recurrence over layers; with uniform stages it equals the closed forms above (the unit tests
check that). Cloud compute is pipelined too: if t_c > t_tr the link waits for the cloud, so the
general form is T_init + t_c + t_tr + (L - 1) * max(t_c, t_tr, t_e) + t_e.

A cold cloud prompt's first layer is not a whole t_c: the cloud captures layer l's K and V as
layer l's attention starts (cloud/capture.py), so layer 0 is ready after the engine's start, the
embedding and layer 0's QKV projection (t_c_first), and each later layer one full layer (the rest
of layer l - 1 and layer l's projection: t_c) after the one before:

    layer l ready at  T_init + t_c_first + l * t_c        (cold; the paper's "T_init + t_c" with
                                                            t_c -> t_c_first for the first layer)

The edge receives on the cores it computes on: every message after a fetch's first arrives while
the edge computes and takes host time from it (Ray's pull, decode, checksum). In the CPU network
benchmark (benchmarks/results/network, one core per side) the same edge layers of a 256-token
cloud prompt took 19.5 ms each layer-wise, 17.5 ms with 2 layers per message and 15.3 ms in bulk,
where the one message is in before layer 0 (fitted: ~4 ms per message + ~0.25 ms per MB). A
model without it learns the mix of all three and over-predicts bulk (by ~10% warm, which made
auto pass over the fastest strategy). So a fetch of M messages stretches the edge's compute by

    t_rx(g) = (M - 1) * rx_msg + (bytes after the first message) * rx_byte

spread over the layers computed while later messages still arrive (l < L - last message's
layers); bulk (M = 1) pays none, and a link-bound fetch hides it behind its waits. The cloud
likewise sends every message but the last while it computes (a cold prompt): its layers 1..L-1
take t_c + t_tx(g) / (L - 1), t_tx(g) = (M - 1) * tx_msg + (bytes before the last message) *
tx_byte (256 tokens: 9.5 ms per layer in bulk, 12.5 ms layer-wise; fitted: ~2.5 ms per message
+ ~1.5 ms per MB).
"""

import math
from dataclasses import dataclass

FETCH_STRATEGIES = ("layerwise", "grouped", "bulk")
STRATEGIES = FETCH_STRATEGIES + ("recompute",)


@dataclass(frozen=True)
class Costs:
    """Everything the model needs for one request; times in seconds, per layer unless noted."""

    num_layers: int
    layer_bytes: float  # bytes of one layer's cloud KV (as loaded; the codec is in bandwidth)
    bandwidth: float  # bytes / s
    latency: float  # s per message
    t_e: float  # edge compute per layer of this step, cloud KV loaded, nothing arriving meanwhile
    t_c: float = 0.0  # cloud compute per layer after the first; 0: warm (computed in the cloud)
    t_init: float = 0.0  # stream start -> first message can go (RPC to the cloud)
    # cold only: the cloud's prefill start -> layer 0's KV captured (engine start, embedding,
    # layer 0's QKV projection); None: a whole t_c (the paper's T_init + t_c)
    t_c_first: float | None = None
    t_e_recompute: float = math.inf  # edge compute per layer when the edge prefills it all
    t_e_pre_recompute: float = 0.0  # recompute only: the edge's compute before layer 0's attention
    t_fixed: float = 0.0  # per step, outside the forward (added to every strategy)
    # the edge's host time receiving a message while it computes (s per message, s per byte)
    rx_msg: float = 0.0
    rx_byte: float = 0.0
    # the cloud's host time sending a message while it computes (cold; s per message, s per byte)
    tx_msg: float = 0.0
    tx_byte: float = 0.0
    # layers per message -> seconds on the link (the transfer fit near that size, TransferFit);
    # None or a missing size: latency + bytes / bandwidth
    msg_s: dict[int, float] | None = None

    def t_msg(self, g: int) -> float:
        """One message of g layers on the serial link."""
        if self.msg_s and g in self.msg_s:
            return self.msg_s[g]
        return self.latency + g * self.layer_bytes / self.bandwidth

    def t_rx(self, g: int) -> float:
        """Edge compute added by a fetch of g layers per message: receiving every message after
        the first while it computes (bulk: 0)."""
        sizes = message_sizes(self.num_layers, g)
        later_bytes = (self.num_layers - sizes[0]) * self.layer_bytes
        return (len(sizes) - 1) * self.rx_msg + later_bytes * self.rx_byte

    def t_c_at(self, g: int) -> float:
        """Cloud compute per layer after the first, in a fetch of g layers per message: the
        cloud sends every message but the last while it computes (0 when warm)."""
        if not self.t_c or self.num_layers < 2:
            return self.t_c
        sizes = message_sizes(self.num_layers, g)
        early_bytes = (self.num_layers - sizes[-1]) * self.layer_bytes
        t_tx = (len(sizes) - 1) * self.tx_msg + early_bytes * self.tx_byte
        return self.t_c + t_tx / (self.num_layers - 1)


def message_sizes(num_layers: int, g: int) -> list[int]:
    g = max(1, min(int(g), num_layers))
    return [min(g, num_layers - s) for s in range(0, num_layers, g)]


def pipelined_time(c: Costs, g: int = 1) -> float:
    """T of a fetch with g layers per message: cloud -> link -> edge, a recurrence over layers.

    The cloud has layer l at t_init + t_c_first + l * t_c (cold; warm: t_c = 0 and no
    t_c_first); message m goes when its last layer is computed and the link is free; the edge
    runs layer l when it finished layer l - 1 and layer l arrived. Layers 0..K-1 (K = L - the
    last message's layers) are computed while later messages arrive: each takes
    t_e + t_rx(g) / K (Costs.t_rx)."""
    first = c.t_c if c.t_c_first is None else c.t_c_first
    t_c = c.t_c_at(g)
    sizes = message_sizes(c.num_layers, g)
    k = c.num_layers - sizes[-1]
    rx = c.t_rx(g) / k if k else 0.0
    link_free = edge_free = 0.0
    layer = 0
    for n in sizes:
        last = layer + n - 1
        cloud_ready = c.t_init + first + last * t_c
        start = max(cloud_ready, link_free)
        link_free = arrive = start + c.t_msg(n)
        for l in range(layer, layer + n):
            edge_free = max(edge_free, arrive) + c.t_e + (rx if l < k else 0.0)
        layer += n
    return c.t_fixed + edge_free


def recompute_time(c: Costs) -> float:
    return c.t_fixed + c.t_e_pre_recompute + c.num_layers * c.t_e_recompute


def cached_time(c: Costs) -> float:
    """Already on the edge: no transfer."""
    return c.t_fixed + c.num_layers * c.t_e


# The closed forms of the paper (uniform layers, one layer per message, t_c <= max(t_tr, t_e);
# cold, the t_c after T_init is the first layer's, Costs.t_c_first):
def closed_form_pipelined(t_init: float, t_c: float, t_tr: float, t_e: float, num_layers: int) -> float:
    return t_init + t_c + t_tr + (num_layers - 1) * max(t_tr, t_e) + t_e


def closed_form_eq12(t_init, t_c, t_tr, t_e, num_layers) -> float:  # t_tr >= t_e
    return t_init + t_c + num_layers * t_tr + t_e


def closed_form_eq13(t_init, t_c, t_tr, t_e, num_layers) -> float:  # t_e > t_tr
    return t_init + t_c + t_tr + num_layers * t_e


def group_candidates(num_layers: int) -> list[int]:
    """Layers per message for `grouped`: powers of two strictly between 1 and L."""
    return [g for g in (2 ** k for k in range(1, 12)) if g < num_layers]


def predict_all(c: Costs) -> dict[str, tuple[float, int]]:
    """strategy -> (predicted T, layers per message); grouped: its best g."""
    out = {"layerwise": (pipelined_time(c, 1), 1)}
    groups = [(pipelined_time(c, g), g) for g in group_candidates(c.num_layers)]
    if groups:
        out["grouped"] = min(groups)
    out["bulk"] = (pipelined_time(c, c.num_layers), c.num_layers)
    if math.isfinite(c.t_e_recompute):
        out["recompute"] = (recompute_time(c), 0)
    return out
