"""The planner's online estimates of the model's inputs (planner_model.Costs): non-negative
least squares over recent measurements (`Fit`, `TransferFit`), EWMAs (`Ewma`) and the features
they are fitted on.

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
"""

import math
from collections import deque

import numpy as np


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
