"""The communication-model planner (DESIGN.md, "The communication model"; paper §2.3).

It predicts each strategy's time to first token for a request and picks the fastest:
  planner_model.py  the model: T of layerwise, grouped, bulk and recompute from per-layer costs
                    (`Costs`), the paper's closed forms
  planner_fit.py    the online estimates of those costs from what the edge measures (what is
                    learned, and how)
Here: the `Planner`, which turns its estimates into `Costs`, decides (`plan`) and takes the
worker side's measurements (`observe_step`). The predicted time to first token is T_fixed + T.
Decisions and predictions are logged at INFO and counted in `planner_stats()` (a plain dict, for
the serving layer's /metrics). Every name of the model and the estimates is importable from here.

One planner per process (`get_planner()`): the scheduler side asks it, the worker side feeds it.
"""

import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace

from edgeprompt_vllm.edge.planner_fit import (  # noqa: F401 (re-exported)
    Ewma,
    Fit,
    TransferFit,
    _fit_subsets,
    _nnls,
    _size_class,
    cloud_features,
    edge_features,
    load_features,
    prefill_attn_work,
    received_while_computing,
    sent_while_computing,
)
from edgeprompt_vllm.edge.planner_model import (  # noqa: F401 (re-exported)
    FETCH_STRATEGIES,
    STRATEGIES,
    Costs,
    cached_time,
    closed_form_eq12,
    closed_form_eq13,
    closed_form_pipelined,
    group_candidates,
    message_sizes,
    pipelined_time,
    predict_all,
    recompute_time,
)
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


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
