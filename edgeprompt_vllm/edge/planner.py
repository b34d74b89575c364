"""The communication-model planner (DESIGN.md, "The communication model"; paper §2.3).

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

The estimator learns every input online from what the edge measures (worker_side.py feeds it
the per-layer timeline and per-message transfer timings):
  transfer   latency + bytes / bandwidth: least squares over the last messages (bytes vary with
             prompt length and layers per message, which separates the two), and per message
             size over the recent messages of about that size (TransferFit: a shaped link is
             not one line over all sizes)
  edge       per-layer compute of a load step: a0 + a1 * new_tokens + a2 * sum(new * (context +
             new/2)) (linear work + attention) + rx_msg * later messages / (L - 1) + rx_byte *
             later bytes / (L - 1) (the receive above, in the measured mean over layers 0..L-2),
             least squares over the last load steps
  prefill    the same without a load (recompute's t_e_recompute; a step without cloud KV runs
             full causal attention, a2 * n^2 / 2, which costs per unit more than a load step's
             attention over the cached cloud KV, so it is its own fit; until it has a
             measurement, the load steps' fit stands in)
  cloud      per-layer prefill of n tokens: b0 + b1 * n + b2 * n^2 / 2 (+ the sending above, per
             measured layer) from layers 1..L-1 of the headers' compute times (b0: the capture
             hook and per-layer engine work; without it 256 -> 1024 tokens, 9.5 -> 34 ms, forced
             a negative b2 and over-predicted 1024 tokens by ~20%), and t_c_first = c0 + c1 * n
             (layer 0's: start to layer 0's KV)
  T_init     first header on the edge, less the cloud compute inside it
  T_fixed    per step outside the forward (scheduling, sampling), from steps whose forward start
             is known (start_load_kv before the forward: every load step)
  edge pre   the edge's compute before layer 0's attention (embedding, layer 0's projection):
             p0 + p1 * new tokens, from steps without a load. In a fetch it runs while layer 0 is
             on its way; recompute pays it: T = T_fixed + pre(all tokens) + L * t_e_recompute.
             Measured as layer 0's attention - start_load_kv where that comes first; where vLLM
             (0.32) calls start_load_kv after the forward of a step without a load, the step's
             overhead (build -> layer 0, forward end -> next scheduler call) holds it instead:
             pre = that overhead - T_fixed (it must not go into T_fixed: a 4096-token recompute
             has ~25 ms of it, and T_fixed is added to every strategy)
The predicted time to first token is T_fixed + T. Decisions and predictions are logged at INFO
and counted in `planner_stats()` (a plain dict, for the serving layer's /metrics).

One planner per process (`get_planner()`): the scheduler side asks it, the worker side feeds it.
"""

import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)

FETCH_STRATEGIES = ("layerwise", "grouped", "bulk")
STRATEGIES = FETCH_STRATEGIES + ("recompute",)


# ============================ the model (pure) ============================
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


# ============================ online estimates ============================
def _fit_subsets(xs: np.ndarray, y: np.ndarray, n: int, primary: int, nrows: int) -> tuple[list, float]:
    best, best_err = None, math.inf
    masks = sorted(range(1, 1 << n), key=lambda m: (bin(m).count("1"), m != 1 << primary))
    for mask in masks:
        cols = [j for j in range(n) if mask >> j & 1]
        if len(cols) > 1 and nrows < 2 * len(cols):
            continue
        if np.linalg.matrix_rank(xs[:, cols]) < len(cols):
            continue
        coef, *_ = np.linalg.lstsq(xs[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        err = float(((xs[:, cols] @ coef - y) ** 2).sum())
        if err < best_err * (1 - 1e-6) - 1e-15 * float((y ** 2).sum()):
            full = np.zeros(n)
            full[cols] = coef
            best, best_err = full, err
    return best, best_err


def _nnls(rows: list[tuple[list[float], float]], n: int, primary: int) -> list[float] | None:
    """Non-negative least squares in *relative* error (each row weighted by 1 / y: the planner
    is judged by relative error, and a few long steps must not decide the short ones), by trying
    feature subsets; then once more without the worst fifth of the rows (measurements taken
    while something else used the CPU).

    A subset of k features needs at least 2k observations (fewer: it would fit noise), and
    near-ties go to fewer features, then to the `primary` one (so a single observation gives
    the proportional model, y = c * x[primary])."""
    if not rows:
        return None
    x = np.array([r[0] for r in rows], dtype=np.float64)
    y = np.array([r[1] for r in rows], dtype=np.float64)
    w = 1.0 / np.maximum(y, max(float(y.max()), 1e-12) * 1e-6)
    xw, yw = x * w[:, None], y * w
    scale = np.maximum(np.abs(xw).max(axis=0), 1e-30)
    xs = xw / scale
    best, _ = _fit_subsets(xs, yw, n, primary, len(rows))
    if best is not None and len(rows) >= 10:
        resid = np.abs(xs @ best - yw)
        keep = resid <= np.quantile(resid, 0.8)
        trimmed, _ = _fit_subsets(xs[keep], yw[keep], n, primary, int(keep.sum()))
        best = trimmed if trimmed is not None else best
    return None if best is None else (best / scale).tolist()


class Fit:
    """y ~ coef . features over the last `window` observations, coefficients >= 0."""

    def __init__(self, names: tuple[str, ...], prior: list[float], window: int = 48, primary: int = 0):
        self.names, self.prior, self.primary = names, list(prior), primary
        self.rows: deque = deque(maxlen=window)
        self._coef: list[float] | None = None
        self.count = 0

    def add(self, features: list[float], y: float) -> None:
        if not (math.isfinite(y) and y >= 0):
            return
        self.rows.append((list(features), float(y)))
        self.count += 1
        self._coef = None

    @property
    def coef(self) -> list[float]:
        if self._coef is None:
            self._coef = _nnls(list(self.rows), len(self.names), self.primary) or self.prior
        return self._coef

    def __call__(self, features: list[float]) -> float:
        return float(sum(c * f for c, f in zip(self.coef, features)))

    def to_dict(self) -> dict:
        return {"n": self.count, **dict(zip(self.names, self.coef))}


def _size_class(nbytes: float) -> int:
    return int(math.log2(max(float(nbytes), 1.0)))


class TransferFit:
    """Seconds per message of B bytes: latency + B * s_per_byte, fitted near B.

    One line over every size misfits a shaped link: a message within the shaper's burst passes
    at line rate, a large one at the token rate plus TCP's recovery (the CPU network benchmark at
    1 Gbit/s: 1 MB messages moved at ~140 MB/s, 4 MB ones at ~105 MB/s, and a window filled by a
    run of 1 MB messages under-predicted the 4 MB ones by 15-30%). So messages are also kept per
    power-of-two size class (the last `keep` of each: a run of one size pushes no other out), and
    B's time comes from the line fitted to the classes within `near` of B's (about B/4 .. 8B) when
    they hold >= 3 messages; else from the line over all recent messages (`overall`, which also
    gives the latency and bandwidth the planner reports)."""

    def __init__(self, window: int = 48, keep: int = 8, near: int = 2):
        self.overall = Fit(("latency_s", "s_per_byte"), [1e-3, 1e-9], window, primary=1)  # 1 GB/s
        self.keep, self.near = keep, near
        self.by_class: dict[int, deque] = {}
        self._local: dict[int, list[float] | None] = {}  # size class -> its line (cache)

    @property
    def count(self) -> int:
        return self.overall.count

    @property
    def coef(self) -> list[float]:
        return self.overall.coef

    def add(self, nbytes: float, s: float) -> None:
        self.overall.add([1.0, float(nbytes)], s)
        if math.isfinite(s) and s >= 0 and nbytes > 0:
            rows = self.by_class.setdefault(_size_class(nbytes), deque(maxlen=self.keep))
            rows.append(([1.0, float(nbytes)], float(s)))
            self._local.clear()

    def __call__(self, nbytes: float) -> float:
        k = _size_class(nbytes)
        if k not in self._local:
            rows = [r for j in range(k - self.near, k + self.near + 1) for r in self.by_class.get(j, ())]
            self._local[k] = _nnls(rows, 2, 1) if len(rows) >= 3 else None
        lat, s_per_byte = self._local[k] or self.overall.coef
        return max(lat + s_per_byte * float(nbytes), 0.0)


class Ewma:
    def __init__(self, prior: float, alpha: float):
        self.value, self.alpha, self.count = prior, alpha, 0

    def add(self, x: float) -> None:
        if math.isfinite(x):
            self.value = x if self.count == 0 else (1 - self.alpha) * self.value + self.alpha * x
            self.count += 1


def edge_features(new_tokens: float, attn_work: float) -> list[float]:
    """Per-layer edge compute features of a step: [1, new tokens, sum new * (ctx + new / 2)]."""
    return [1.0, float(new_tokens), float(attn_work)]


def load_features(new_tokens: float, attn_work: float, rx_msgs: float = 0.0,
                  rx_bytes: float = 0.0) -> list[float]:
    """A load step's: edge_features + [messages, bytes] received while the edge computed, per
    measured layer (the messages after each stream's first, / (L - 1))."""
    return edge_features(new_tokens, attn_work) + [float(rx_msgs), float(rx_bytes)]


def cloud_features(tokens: float, tx_msgs: float = 0.0, tx_bytes: float = 0.0) -> list[float]:
    """Per-layer cloud prefill features: [1, n, n^2 / 2, messages, bytes sent per layer]."""
    return [1.0, float(tokens), prefill_attn_work(tokens, 0), float(tx_msgs), float(tx_bytes)]


def received_while_computing(stream_messages: list[list[dict]],
                             num_layers: int) -> tuple[float, float]:
    """(messages, raw bytes) per measured layer (layers 0..L-2) that arrived while the edge
    computed: every message after its stream's first (layer 0 waits for all the first ones)."""
    later = [m for msgs in stream_messages for m in msgs[1:]]
    per = max(1, num_layers - 1)
    return len(later) / per, sum(m["nbytes"] for m in later) / per


def sent_while_computing(messages: list[dict], num_layers: int) -> tuple[float, float]:
    """(messages, raw bytes) per measured cloud layer (layers 1..L-1) that the cloud sent while
    it computed a cold prompt: every message of the stream but the last."""
    early = messages[:-1]
    per = max(1, num_layers - 1)
    return len(early) / per, sum(m["nbytes"] for m in early) / per


def prefill_attn_work(new_tokens: int, context_before: int) -> float:
    return new_tokens * (context_before + new_tokens / 2.0)


@dataclass
class Decision:
    req_id: str
    prompt_id: str
    strategy: str
    layers_per_message: int
    predicted_s: float
    predictions: dict  # strategy -> predicted s
    load_tokens: int
    edge_tokens: int
    cloud_state: str  # warm | cold
    forced: bool
    costs: dict = field(default_factory=dict)
    measured_s: float | None = None  # filled in after its step ran
    measured_forward_s: float | None = None

    def status(self) -> dict:
        """What goes into the request's kv_transfer_params["edgeprompt"]."""
        return {"strategy": self.strategy, "layers_per_message": self.layers_per_message,
                "predicted_ttft_s": round(self.predicted_s, 6),
                "predictions_s": {k: round(v, 6) for k, v in self.predictions.items()},
                "cloud_state": self.cloud_state}


class Planner:
    def __init__(self, alpha: float = 0.3, window: int = 48):
        self._lock = threading.RLock()
        self.alpha = alpha
        self.window = window
        self.transfer = TransferFit(window)
        self.edge = Fit(("a0_s", "s_per_token", "s_per_attn", "rx_s_per_msg", "rx_s_per_byte"),
                        [0.0, 5e-6, 0.0, 0.0, 0.0], window, primary=1)
        self.edge_prefill = Fit(("a0_s", "s_per_token", "s_per_attn"), [0.0, 5e-6, 0.0], window,
                                primary=1)
        self.cloud = Fit(("s", "s_per_token", "s_per_attn", "tx_s_per_msg", "tx_s_per_byte"),
                         [0.0, 5e-6, 0.0, 0.0, 0.0], window, primary=1)
        # layer 0's cloud time: engine start + embedding + QKV projection (prior: 5 ms + a t_c)
        self.cloud_first = Fit(("s", "s_per_token"), [5e-3, 5e-6], window, primary=1)
        self.edge_pre = Fit(("s", "s_per_token"), [0.0, 0.0], window, primary=1)
        self.t_init = Ewma(2e-3, alpha)
        self.t_fixed = Ewma(0.0, alpha)
        self.decisions: Counter = Counter()
        self.records: deque[Decision] = deque(maxlen=256)
        self._pending: dict[str, Decision] = {}  # req -> decision, until its step was measured
        self._step_built: float | None = None
        self._step_forward: tuple[float, float] | None = None  # (start, end) of the last forward
        self._step_pre_tokens: int | None = None  # its new tokens, if its pre-layer-0 compute
        #                                             is in the overhead (forward start unknown)
        self._step_reqs: list[str] = []
        self.abs_rel_err = Ewma(0.0, alpha)
        self.measured = 0

    # ---------------- prediction ----------------
    def costs(self, num_layers: int, layer_bytes: float, load_tokens: int, edge_tokens: int,
              cold: bool) -> Costs:
        with self._lock:
            lat, s_per_byte = self.transfer.coef
            work = prefill_attn_work(edge_tokens, load_tokens)
            t_e = self.edge(load_features(edge_tokens, work))  # nothing arriving meanwhile
            rx_msg, rx_byte = self.edge.coef[3:5]
            n_all = load_tokens + edge_tokens
            prefill = self.edge_prefill if self.edge_prefill.count else self.edge
            t_e_re = prefill(edge_features(n_all, prefill_attn_work(n_all, 0)))
            t_c = self.cloud(cloud_features(load_tokens)) if cold else 0.0  # nothing sent meanwhile
            tx_msg, tx_byte = self.cloud.coef[3:5]
            t_c_first = max(self.cloud_first([1.0, load_tokens]), 0.0) if cold else None
            return Costs(num_layers=num_layers, layer_bytes=float(layer_bytes),
                         bandwidth=1.0 / max(s_per_byte, 1e-15), latency=lat, t_e=max(t_e, 0.0),
                         t_c=max(t_c, 0.0), t_init=self.t_init.value, t_c_first=t_c_first,
                         t_e_recompute=max(t_e_re, 0.0) if self._edge_count() else math.inf,
                         t_e_pre_recompute=max(self.edge_pre([1.0, n_all]), 0.0),
                         t_fixed=self.t_fixed.value, rx_msg=rx_msg, rx_byte=rx_byte,
                         tx_msg=tx_msg, tx_byte=tx_byte,
                         msg_s={n: self.transfer(n * layer_bytes) for n in range(1, num_layers + 1)})

    def _edge_count(self) -> int:
        return self.edge.count + self.edge_prefill.count

    def plan(self, req_id: str, prompt_id: str, *, num_layers: int, layer_bytes: float,
             load_tokens: int, edge_tokens: int, cold: bool, strategy: str = "auto",
             layers_per_message: int = 0, spent_s: float = 0.0, min_gain_s: float = 0.01,
             min_gain_rel: float = 0.05) -> Decision:
        """Picks (or, with a fixed strategy, only predicts) how to get this request's cloud KV.
        `spent_s`: time this request already spent on the way here (e.g. asking the cloud about
        the prompt's state); added to every prediction. Auto leaves the paper's layer-wise
        pipeline only for a predicted gain of at least max(min_gain_s, min_gain_rel * T)."""
        c = self.costs(num_layers, layer_bytes, load_tokens, edge_tokens, cold)
        if spent_s:
            c = replace(c, t_fixed=c.t_fixed + spent_s)
        preds = predict_all(c)
        if layers_per_message and 1 < layers_per_message < num_layers:
            preds["grouped"] = (pipelined_time(c, layers_per_message), layers_per_message)
        forced = strategy != "auto"
        if forced:
            if strategy == "recompute" and "recompute" not in preds:
                preds["recompute"] = (math.nan, 0)  # no edge measurement yet
            if strategy == "grouped" and "grouped" not in preds:
                strategy = "layerwise" if num_layers == 1 else "bulk"
            choice = strategy
        else:
            # Alternatives to the paper's layer-wise pipeline only once their inputs are measured.
            allowed = ["layerwise"]
            if self.transfer.count >= 2:
                allowed += ["grouped", "bulk"]
            if self._edge_count() >= 2 and "recompute" in preds:
                allowed.append("recompute")
            best = min((s for s in allowed if s in preds), key=lambda s: preds[s][0])
            base = preds["layerwise"][0]
            gain = base - preds[best][0]
            choice = best if gain >= max(min_gain_s, min_gain_rel * base) else "layerwise"
        t, g = preds[choice]
        d = Decision(req_id, prompt_id, choice, g, t, {k: v[0] for k, v in preds.items()},
                     load_tokens, edge_tokens, "cold" if cold else "warm", forced, asdict(c))
        with self._lock:
            self.decisions[choice] += 1
            self.records.append(d)
            self._pending[req_id] = d
        logger.info("planner: request %s, cloud prompt %s (%d tokens, %s), edge %d tokens: %s%s, "
                    "predicted TTFT %.1f ms [%s]; t_e %.2f ms, t_tr %.2f ms, t_c %.2f ms per layer",
                    req_id, prompt_id, load_tokens, d.cloud_state, edge_tokens, choice,
                    f" (g={g})" if choice == "grouped" else "", 1e3 * t,
                    ", ".join(f"{k} {1e3 * v[0]:.1f}" for k, v in preds.items()),
                    1e3 * c.t_e, 1e3 * c.t_msg(1), 1e3 * c.t_c)
        return d

    # ---------------- observations ----------------
    def observe_messages(self, messages: list[tuple[int, float]]) -> None:
        """(raw bytes, seconds from the pull's start to decoded and ready) per message."""
        with self._lock:
            for nbytes, s in messages:
                self.transfer.add(nbytes, s)

    def observe_stream_start(self, first_header_s: float, cloud_compute_s: float) -> None:
        with self._lock:
            self.t_init.add(max(0.0, first_header_s - cloud_compute_s))

    def observe_cloud(self, tokens: int, per_layer_s: list[float],
                      tx: tuple[float, float] = (0.0, 0.0)) -> None:
        """Cold prefill: compute_s of each layer from the headers. The cloud stamps a layer when
        its K, V are captured, at the start of the layer's attention: layer 0's is the prefill's
        start to there (engine start, embedding, layer 0's QKV projection: t_c_first, often well
        under a layer), each later one a whole layer (t_c). `tx`: (messages, bytes) it sent per
        layer meanwhile (sent_while_computing)."""
        if len(per_layer_s) < 2 or tokens <= 0:
            return
        mean = sum(per_layer_s[1:]) / (len(per_layer_s) - 1)
        with self._lock:
            self.cloud.add(cloud_features(tokens, *tx), mean)
            self.cloud_first.add([1.0, float(tokens)], per_layer_s[0])

    def observe_edge(self, new_tokens: int, attn_work: float, per_layer_s: float,
                     rx: tuple[float, float] = (0.0, 0.0), loaded: bool = True) -> None:
        """Per-layer edge compute of a step; `rx`: (messages, bytes) received per measured layer
        while it computed (received_while_computing); `loaded`: a step with cloud KV loaded
        (else a plain prefill: the recompute model)."""
        with self._lock:
            if loaded:
                self.edge.add(load_features(new_tokens, attn_work, *rx), per_layer_s)
            else:
                self.edge_prefill.add(edge_features(new_tokens, attn_work), per_layer_s)

    def observe_step(self, edge_compute: list | None, stream_messages: list[list[dict]],
                     work: tuple[int, float] | None, start: float | None, enter0: float | None,
                     end: float, num_layers: int, bytes_per_token: int,
                     stream_cold: list[bool] | None = None) -> None:
        """One forward step, measured by the worker side (plain data: it may come from another
        process, `step_observation`): `edge_compute` the load timeline's per-layer edge compute
        (None: no load this step), each LayerStream's `messages`, `work` the step's (new tokens,
        attention work) from the scheduler, perf_counter times (CLOCK_MONOTONIC: one clock for
        every process of the machine) of start_load_kv, layer 0's attention and the step's end;
        `stream_cold`: per stream, whether the planner expected the cloud to compute it."""
        loaded = edge_compute is not None
        # the forward from start_load_kv (just before the model runs): what runs before layer
        # 0's attention (embedding, layer 0's projections: proportional to the new tokens) is
        # compute, not the fixed per-step overhead. vLLM 0.32 calls start_load_kv only after the
        # forward in a step that loads nothing: that forward runs from layer 0's attention, and
        # its compute before layer 0 stays in the step's overhead (step_done takes it out)
        before = start is not None and (enter0 is None or start <= enter0)
        fwd_start = start if before else enter0
        if fwd_start is not None:
            pre_tokens = int(work[0]) if not before and work is not None and not loaded else None
            self.forward_done(fwd_start, end, pre_tokens)
        for i, msgs in enumerate(stream_messages):
            cold = bool(stream_cold[i]) if stream_cold and i < len(stream_cold) else False
            self.observe_messages([(m["nbytes"], m["ready_s"] - m["pull_s"]) for m in msgs])
            if msgs and msgs[0]["layers"][:1] == [0] and not cold:  # warm: the header is the RPC
                self.observe_stream_start(msgs[0]["header_s"], 0.0)
            # (headers of a warm prompt repeat the compute times of its original prefill)
            compute = [c for m in msgs for c in m["cloud_compute_s"]]
            if cold and len(compute) == num_layers and all(c > 0 for c in compute):
                self.observe_cloud(msgs[0]["nbytes"] // len(msgs[0]["layers"]) // bytes_per_token,
                                   compute, sent_while_computing(msgs, num_layers))
        if work is None:
            return
        new_tokens, attn_work = work
        if loaded:  # load step: the compute between layers, without the waits
            per = [x for x in edge_compute[:-1] if x is not None]
            if per and len(per) == num_layers - 1:
                rx = received_while_computing(stream_messages, num_layers)
                self.observe_edge(new_tokens, attn_work, sum(per) / len(per), rx)
            elif num_layers == 1 and edge_compute[0] is not None:
                self.observe_edge(new_tokens, attn_work, edge_compute[0])
        elif enter0 is not None:
            self.observe_edge(new_tokens, attn_work, (end - enter0) / num_layers, loaded=False)
            if start is not None and enter0 >= start:  # (a load step's also sets up its streams)
                with self._lock:
                    self.edge_pre.add([1.0, float(new_tokens)], enter0 - start)

    # The step clock (same process only): build_connector_meta -> forward -> next scheduler call.
    def step_built(self, req_ids) -> None:
        """`req_ids`: the step's requests (any iterable; only those with a pending decision are
        kept, and none is looked at while no decision is pending: the usual step)."""
        self.step_done()
        with self._lock:
            for r in self._step_reqs:  # never measured (its forward was not reported): drop
                self._pending.pop(r, None)
            self._step_built, self._step_forward = time.perf_counter(), None
            pending = self._pending
            self._step_reqs = [r for r in req_ids if r in pending] if pending else []

    def forward_done(self, start: float, end: float, pre_tokens: int | None = None) -> None:
        """`pre_tokens`: the step's new tokens when `start` is layer 0's attention, not the
        forward's start (its compute before layer 0 is then in the overhead)."""
        with self._lock:
            self._step_forward, self._step_pre_tokens = (start, end), pre_tokens

    def step_done(self) -> None:
        """The scheduler has the step's output (its first tokens sampled): close the decisions
        of that step. A no-op until the step's forward was reported."""
        now = time.perf_counter()
        with self._lock:
            built, fwd, reqs = self._step_built, self._step_forward, self._step_reqs
            if built is None or fwd is None:
                return
            self._step_built, self._step_forward, self._step_reqs = None, None, []
            overhead = (fwd[0] - built) + (now - fwd[1])
            pre_tokens, self._step_pre_tokens = self._step_pre_tokens, None
            if pre_tokens is None:
                if 0 <= overhead < 0.25:  # longer: the engine was idle, not busy
                    self.t_fixed.add(overhead)
            elif self.t_fixed.count:  # overhead = T_fixed + pre: the compute before layer 0
                pre = max(overhead - self.t_fixed.value, 0.0)
                if 0 <= overhead < max(0.25, fwd[1] - fwd[0]):  # (pre < the forward; else idle)
                    self.edge_pre.add([1.0, float(pre_tokens)], pre)
            for r in reqs:
                d = self._pending.pop(r, None)
                if d is None:
                    continue
                d.measured_forward_s = fwd[1] - fwd[0]
                d.measured_s = now - built
                self.measured += 1
                if d.predicted_s > 0 and math.isfinite(d.predicted_s):
                    self.abs_rel_err.add(abs(d.predicted_s - d.measured_s) / d.measured_s)

    def forget_link(self) -> None:
        """The route to the cloud changed: re-learn transfer and T_init from the next fetches
        (the edge and cloud compute estimates stay)."""
        with self._lock:
            self.transfer = TransferFit(self.window)
            self.t_init = Ewma(self.t_init.value, self.alpha)

    def forget(self, req_id: str) -> None:
        """The request finished; a decision still waiting for its step's report stays until then."""
        with self._lock:
            if req_id not in self._step_reqs:
                self._pending.pop(req_id, None)

    # ---------------- export ----------------
    def stats(self) -> dict:
        with self._lock:
            last = self.records[-1] if self.records else None
            lat, s_per_byte = self.transfer.coef
            return {
                "decisions": {s: self.decisions.get(s, 0) for s in STRATEGIES},
                "decisions_total": sum(self.decisions.values()),
                "measured_total": self.measured,
                "prediction_abs_rel_err_ewma": self.abs_rel_err.value,
                "bandwidth_bytes_per_s": 1.0 / max(s_per_byte, 1e-15),
                "latency_s": lat,
                "t_init_s": self.t_init.value,
                "t_fixed_s": self.t_fixed.value,
                "observations": {"messages": self.transfer.count, "edge_steps": self._edge_count(),
                                 "cloud_prefills": self.cloud.count},
                "edge_model": self.edge.to_dict(),
                "edge_prefill_model": self.edge_prefill.to_dict(),
                "edge_pre_model": self.edge_pre.to_dict(),
                "cloud_model": self.cloud.to_dict(), "cloud_first_model": self.cloud_first.to_dict(),
                "last": None if last is None else {
                    "strategy": last.strategy, "layers_per_message": last.layers_per_message,
                    "predicted_s": last.predicted_s, "measured_s": last.measured_s,
                    "load_tokens": last.load_tokens, "cloud_state": last.cloud_state},
            }


_PLANNER: Planner | None = None
_PLANNER_LOCK = threading.Lock()


def get_planner(alpha: float | None = None) -> Planner:
    """This process's planner (created on first use)."""
    global _PLANNER
    with _PLANNER_LOCK:
        if _PLANNER is None:
            _PLANNER = Planner(alpha if alpha is not None else 0.3)
        return _PLANNER


def reset_planner() -> None:
    """Forget every estimate (tests; a benchmark after it changed the link)."""
    global _PLANNER
    with _PLANNER_LOCK:
        alpha = _PLANNER.alpha if _PLANNER is not None else 0.3
        _PLANNER = Planner(alpha)


def planner_stats() -> dict:
    """A plain dict of the planner's counters and estimates (read by the serving layer)."""
    return get_planner().stats()


__all__ = ["Costs", "Decision", "Planner", "get_planner", "planner_stats", "reset_planner",
           "pipelined_time", "recompute_time", "cached_time", "predict_all", "closed_form_pipelined",
           "closed_form_eq12", "closed_form_eq13", "message_sizes"]


def step_observation(edge_compute, stream_messages, work, start, enter0, end, num_layers,
                     bytes_per_token, stream_cold=None) -> dict:
    """Planner.observe_step's arguments as plain data (travels worker -> scheduler)."""
    return {"edge_compute": edge_compute, "stream_messages": stream_messages, "work": work,
            "start": start, "enter0": enter0, "end": end, "num_layers": num_layers,
            "bytes_per_token": bytes_per_token, "stream_cold": stream_cold}
