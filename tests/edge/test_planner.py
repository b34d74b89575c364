"""edge/planner.py: the communication model against its closed forms (DESIGN.md; paper Eq. 12/13),
the online estimates, and the strategy choice."""

import json
import math
import random
import time
from dataclasses import replace

import pytest

from edgeprompt_vllm.edge import planner as P
from edgeprompt_vllm.edge.planner import Costs, Planner


def costs(**kw) -> Costs:
    base = dict(num_layers=32, layer_bytes=1e6, bandwidth=1e8, latency=0.0, t_e=0.004,
                t_c=0.0, t_init=0.002)
    base.update(kw)
    return Costs(**base)


def rand_costs(rng: random.Random, cold: bool) -> Costs:
    L = rng.choice([1, 2, 4, 7, 16, 32, 80])
    t_tr = rng.uniform(1e-4, 2e-2)
    lat = rng.uniform(0, t_tr / 2)
    t_e = rng.uniform(1e-4, 2e-2)
    return costs(num_layers=L, latency=lat, bandwidth=1e6 / (t_tr - lat), layer_bytes=1e6, t_e=t_e,
                 t_c=rng.uniform(1e-5, max(t_tr, t_e)) if cold else 0.0,
                 t_init=rng.uniform(0, 0.01), t_c_first=rng.uniform(0, 0.02) if cold else None,
                 t_fixed=rng.uniform(0, 0.005))


def first_layer(c: Costs) -> float:
    """The paper's t_c after T_init: the cloud's time to the first layer (cold), 0 warm."""
    return c.t_c if c.t_c_first is None else c.t_c_first


@pytest.mark.parametrize("cold", [False, True])
def test_layerwise_recurrence_equals_the_pipelined_closed_form(cold):
    rng = random.Random(0 + cold)
    for _ in range(500):
        c = rand_costs(rng, cold)
        want = c.t_fixed + P.closed_form_pipelined(c.t_init, first_layer(c), c.t_msg(1), c.t_e, c.num_layers)
        assert P.pipelined_time(c, 1) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_eq12_communication_bound_and_eq13_compute_bound():
    rng = random.Random(1)
    for _ in range(300):
        c = rand_costs(rng, cold=rng.random() < 0.5)
        t_tr, t_c = c.t_msg(1), first_layer(c)
        T = P.pipelined_time(c, 1) - c.t_fixed
        if t_tr >= c.t_e:
            assert T == pytest.approx(P.closed_form_eq12(c.t_init, t_c, t_tr, c.t_e, c.num_layers))
        else:
            assert T == pytest.approx(P.closed_form_eq13(c.t_init, t_c, t_tr, c.t_e, c.num_layers))


def test_warm_drops_t_c_and_cached_drops_t_tr():
    cold = costs(t_c=0.003)  # no t_c_first: the first layer takes a whole t_c (the paper's form)
    warm = costs(t_c=0.0)
    L, t_tr = cold.num_layers, cold.t_msg(1)
    assert P.pipelined_time(warm) == pytest.approx(P.closed_form_pipelined(0.002, 0.0, t_tr, 0.004, L))
    assert P.pipelined_time(cold) - P.pipelined_time(warm) == pytest.approx(0.003)
    # link-bound (t_tr = 10 ms > t_c): only the first layer's cloud time shows
    assert P.pipelined_time(replace(cold, t_c_first=0.0007)) - P.pipelined_time(warm) == pytest.approx(0.0007)
    assert P.cached_time(warm) == pytest.approx(L * 0.004)


def test_cloud_bound_pipeline_generalises_the_closed_form():
    c = costs(t_c=0.02, t_e=0.004, t_c_first=0.005)  # the link waits for the cloud
    L, t_tr = c.num_layers, c.t_msg(1)
    want = c.t_init + c.t_c_first + t_tr + (L - 1) * max(c.t_c, t_tr, c.t_e) + c.t_e
    assert P.pipelined_time(c) == pytest.approx(want)
    # layer l is ready at t_init + t_c_first + l * t_c: the last one L - 1 whole layers later
    assert P.pipelined_time(c) == pytest.approx(c.t_init + c.t_c_first + (L - 1) * c.t_c + t_tr + c.t_e)


@pytest.mark.parametrize("g", [2, 4, 8, 32])
def test_grouped_messages_closed_form(g):
    for lat, t_e in [(0.02, 0.004), (0.0005, 0.03), (0.0, 0.0)]:
        c = costs(latency=lat, t_e=t_e)
        L, M = c.num_layers, c.num_layers // g
        t_m = lat + g * c.layer_bytes / c.bandwidth  # message time: g * bytes / bw + latency
        want = c.t_init + t_m + (M - 1) * max(t_m, g * t_e) + g * t_e
        assert P.pipelined_time(c, g) == pytest.approx(want)
    assert P.message_sizes(10, 4) == [4, 4, 2] and P.message_sizes(3, 8) == [3]


def test_bulk_is_one_message_and_recompute_is_the_edge_prefill():
    c = costs(latency=0.01, t_c=0.001, t_c_first=0.003, t_e_recompute=0.02, t_e_pre_recompute=0.004,
              t_fixed=0.001)
    L = c.num_layers
    bulk = c.t_fixed + c.t_init + c.t_c_first + (L - 1) * c.t_c + c.latency \
        + L * c.layer_bytes / c.bandwidth + L * c.t_e
    assert P.pipelined_time(c, L) == pytest.approx(bulk)
    assert P.recompute_time(c) == pytest.approx(c.t_fixed + 0.004 + L * 0.02)
    preds = P.predict_all(c)
    assert preds["bulk"] == (pytest.approx(bulk), L) and preds["recompute"][1] == 0
    assert preds["grouped"][1] in P.group_candidates(L)


def test_strategy_choice_follows_the_link():
    L = 32
    # fast, low-latency link, edge-bound: layer-wise hides the transfer; nothing beats it
    p = P.predict_all(costs(latency=1e-4, bandwidth=1e10, t_e=0.004, t_e_recompute=0.05))
    assert min(p, key=lambda s: p[s][0]) == "layerwise"
    # high round trip, small layers: latency dominates -> several layers per message
    p = P.predict_all(costs(latency=0.05, layer_bytes=1e4, t_e=0.002, t_e_recompute=0.05))
    best = min(p, key=lambda s: p[s][0])
    assert best in ("grouped", "bulk") and p[best][0] < 0.6 * p["layerwise"][0]
    # a link slower than the edge's own prefill: recompute
    p = P.predict_all(costs(bandwidth=1e6, t_e=0.004, t_e_recompute=0.01))
    assert min(p, key=lambda s: p[s][0]) == "recompute"
    assert len(P.predict_all(costs(num_layers=L))) == 3  # no recompute without an edge estimate


def test_estimator_recovers_latency_bandwidth_and_edge_compute():
    pl = Planner()
    rng = random.Random(3)
    lat, bw = 0.012, 2.5e8
    pl.observe_messages([(n, lat + n / bw * rng.uniform(0.98, 1.02))
                         for n in (rng.choice([2 ** 16, 2 ** 18, 2 ** 20, 2 ** 22]) for _ in range(40))])
    st = pl.stats()
    assert st["latency_s"] == pytest.approx(lat, rel=0.1)
    assert st["bandwidth_bytes_per_s"] == pytest.approx(bw, rel=0.05)
    a0, a1, a2 = 2e-4, 3e-6, 4e-10
    for _ in range(30):
        n, ctx = rng.randint(16, 2048), rng.randint(0, 4096)
        w = P.prefill_attn_work(n, ctx)
        pl.observe_edge(n, w, a0 + a1 * n + a2 * w)
    c = pl.costs(num_layers=4, layer_bytes=1e6, load_tokens=1024, edge_tokens=512, cold=False)
    assert c.t_e == pytest.approx(a0 + a1 * 512 + a2 * P.prefill_attn_work(512, 1024), rel=1e-6)
    assert c.t_e_recompute == pytest.approx(a0 + a1 * 1536 + a2 * P.prefill_attn_work(1536, 0), rel=1e-6)
    pl.observe_cloud(1024, [0.002] + [0.003] * 3)  # layer 0's KV after its projection only
    c = pl.costs(num_layers=4, layer_bytes=1e6, load_tokens=1024, edge_tokens=512, cold=True)
    assert c.t_c == pytest.approx(0.003) and c.t_c_first == pytest.approx(0.002)
    assert pl.costs(num_layers=4, layer_bytes=1e6, load_tokens=1024, edge_tokens=512,
                    cold=False).t_c_first is None


def test_planner_explores_nothing_before_it_measured_and_obeys_forced_strategies():
    pl = Planner()
    kw = dict(num_layers=4, layer_bytes=4e6, load_tokens=4096, edge_tokens=64, cold=False)
    assert pl.plan("r0", "p", **kw).strategy == "layerwise"  # priors only: the paper's default
    for s in ("grouped", "bulk", "recompute", "layerwise"):
        d = pl.plan(f"r-{s}", "p", strategy=s, **kw)
        assert d.strategy == s and d.forced
    assert pl.plan("r-g", "p", strategy="grouped", layers_per_message=2, **kw).layers_per_message == 2
    # a slow link, and the edge computes fast: recompute, and bulk is never better than layerwise
    pl.observe_messages([(n, 0.001 + n / 1e7) for n in (2 ** 18, 2 ** 20, 2 ** 22)])
    for n in (64, 512, 4160):
        pl.observe_edge(n, P.prefill_attn_work(n, 0), 2e-6 * n)
    d = pl.plan("r1", "p", **kw)
    assert d.strategy == "recompute" and d.layers_per_message == 0
    assert d.predicted_s == pytest.approx(min(d.predictions.values()))
    st = P.Planner.stats(pl)
    json.dumps(st)  # a plain dict, for /metrics
    assert st["decisions"]["recompute"] >= 2 and st["decisions_total"] == 7


def test_step_clock_measures_the_decision_and_the_fixed_overhead():
    pl = Planner(alpha=1.0)
    d = pl.plan("r", "p", num_layers=4, layer_bytes=1e5, load_tokens=128, edge_tokens=32, cold=False)
    pl.step_built(["r", "other"])
    t0 = time.perf_counter()
    time.sleep(0.02)
    pl.forward_done(t0, time.perf_counter())
    pl.step_done()
    assert d.measured_forward_s == pytest.approx(0.02, abs=0.015)
    assert d.measured_s >= d.measured_forward_s
    assert 0 <= pl.t_fixed.value < 0.01 and pl.stats()["measured_total"] == 1


def test_observe_step_reads_the_timeline_and_the_messages():
    pl = Planner()
    L, bpt = 4, 1024
    msgs = [{"layers": [l], "nbytes": 256 * bpt, "header_s": 0.004 + 0.002 * (l == 0) * 0,
             "pull_s": 0.004 + 0.01 * l, "ready_s": 0.014 + 0.01 * l,
             "cloud_compute_s": [0.003 if l else 0.008]} for l in range(L)]
    obs = P.step_observation([0.005] * L, [msgs], (512, P.prefill_attn_work(512, 256)), 0.0, 0.001,
                             0.1, L, bpt, [True])
    pl.observe_step(**json.loads(json.dumps(obs)))  # plain data: it travels between processes
    st = pl.stats()
    assert st["observations"] == {"messages": 4, "edge_steps": 1, "cloud_prefills": 1}
    assert pl.cloud.rows[-1][0][1] == 256  # tokens from bytes per layer
    # the cloud sent messages 0..2 while computing layers 1..3; the edge received 1..3 while
    # computing layers 0..2: one message of 256 KiB per measured layer, both ways
    assert pl.cloud.rows[-1][0][3:] == [1.0, 256 * bpt]
    assert pl.edge.rows[-1][0][3:] == [1.0, 256 * bpt]
    assert st["t_init_s"] == 2e-3  # a cold header waited for the cloud: not the RPC's time
    assert pl.cloud_first.rows[-1] == ([1.0, 256.0], 0.008)  # layer 0's compute: t_c_first
    pl.observe_step(**P.step_observation([0.005] * L, [msgs], None, 0.0, 0.001, 0.1, L, bpt, [False]))
    st = pl.stats()  # warm: the first header is the round trip; its stored compute times are old
    assert st["t_init_s"] == pytest.approx(0.004)  # (the first measurement replaces the prior)
    assert st["observations"]["cloud_prefills"] == 1


def test_global_planner_and_stats():
    P.reset_planner()
    a = P.get_planner()
    assert P.get_planner() is a
    s = P.planner_stats()
    assert set(s["decisions"]) == set(P.STRATEGIES) and math.isfinite(s["latency_s"])


def test_one_observation_gives_the_proportional_model():
    pl = Planner()
    pl.observe_edge(1000, P.prefill_attn_work(1000, 500), 0.01)  # 10 us per token
    c = pl.costs(num_layers=4, layer_bytes=1e6, load_tokens=500, edge_tokens=100, cold=False)
    assert c.t_e == pytest.approx(0.001)
    pl.observe_messages([(1 << 20, 0.01)])
    assert pl.stats()["bandwidth_bytes_per_s"] == pytest.approx((1 << 20) / 0.01)


def test_auto_leaves_layerwise_only_for_a_real_gain():
    pl = Planner()
    pl.observe_messages([(n, 0.002 + n / 1e9) for n in (2 ** 16, 2 ** 20, 2 ** 22)])
    for n in (64, 512, 2048):
        pl.observe_edge(n, P.prefill_attn_work(n, 0), 1e-6 * n)
    kw = dict(num_layers=4, layer_bytes=64 * 1024, load_tokens=64, edge_tokens=32, cold=False)
    d = pl.plan("r", "p", min_gain_s=0.05, **kw)  # recompute predicted faster, by < 50 ms
    assert d.predictions["recompute"] < d.predictions["layerwise"] and d.strategy == "layerwise"
    assert pl.plan("r2", "p", min_gain_s=0.0, min_gain_rel=0.0, **kw).strategy != "layerwise"


def test_cold_prediction_puts_layer_l_at_the_cumulative_header_times():
    """The cloud stamps each layer when its K, V are captured (start of the layer's attention):
    layer 0 after the engine start and its projection, each later layer one whole layer on.
    A cloud-bound bulk fetch then waits exactly for the sum of the stamps."""
    pl = Planner()
    L, n = 8, 1024
    trace = [0.007] + [0.033] * (L - 1)  # as measured: layer 0 far under a whole layer
    for _ in range(3):
        pl.observe_cloud(n, trace)
    c = pl.costs(num_layers=L, layer_bytes=1e6, load_tokens=n, edge_tokens=512, cold=True)
    assert c.t_c == pytest.approx(0.033) and c.t_c_first == pytest.approx(0.007)
    want = c.t_fixed + c.t_init + sum(trace) + c.t_msg(L) + L * c.t_e
    assert P.pipelined_time(c, L) == pytest.approx(want)
    # layer-wise, link and edge faster than the cloud: the last layer leaves at the last stamp
    fast = replace(c, latency=0.0, bandwidth=1e12, t_e=0.001)
    assert P.pipelined_time(fast, 1) == pytest.approx(
        fast.t_fixed + fast.t_init + sum(trace) + fast.t_msg(1) + fast.t_e)


def test_cloud_first_layer_scales_with_the_prompt():
    pl = Planner()
    c0, c1 = 0.003, 4e-6  # engine start + per token (embedding, layer 0's QKV)
    for n in (256, 1024, 4096, 256, 1024, 4096):
        pl.observe_cloud(n, [c0 + c1 * n] + [1e-5 * n] * 7)
    for n in (512, 2048, 8192):
        c = pl.costs(num_layers=8, layer_bytes=1e6, load_tokens=n, edge_tokens=64, cold=True)
        assert c.t_c_first == pytest.approx(c0 + c1 * n, rel=1e-6)
        assert c.t_c == pytest.approx(1e-5 * n, rel=1e-6)


def _plain_step(pl: Planner, new_tokens: int, pre_s: float, per_layer_s: float, L: int = 4) -> None:
    """A step without a load: start_load_kv, `pre_s` of compute to layer 0's attention, L layers."""
    start = time.perf_counter()
    pl.observe_step(None, [], (new_tokens, P.prefill_attn_work(new_tokens, 0)), start, start + pre_s,
                    start + pre_s + L * per_layer_s, L, 1024)


def test_recompute_pays_the_edge_compute_before_layer_0():
    pl = Planner()
    p0, p1, a1 = 2e-4, 6e-6, 5e-5
    for n in (768, 1536, 4608, 768, 1536, 4608):
        _plain_step(pl, n, p0 + p1 * n, a1 * n)
    c = pl.costs(num_layers=4, layer_bytes=1e6, load_tokens=4096, edge_tokens=512, cold=False)
    assert c.t_e_pre_recompute == pytest.approx(p0 + p1 * 4608, rel=1e-6)
    assert c.t_e_recompute == pytest.approx(a1 * 4608, rel=1e-6)
    assert P.recompute_time(c) == pytest.approx(c.t_fixed + p0 + p1 * 4608 + 4 * a1 * 4608, rel=1e-6)
    assert pl.stats()["edge_pre_model"]["n"] == 6
    # a load step's start_load_kv also opens its streams: no pre-layer-0 observation from it
    pl.observe_step([0.001] * 4, [], (512, P.prefill_attn_work(512, 4096)), 0.0, 0.01, 0.02, 4, 1024)
    assert pl.edge_pre.count == 6


def recompute_step_built() -> tuple[Planner, "P.Decision"]:
    """A fresh planner with one request planned as a recompute of 4096 + 512 tokens, its step
    built (the step's observations follow)."""
    pl = Planner(alpha=1.0)
    d = pl.plan("r", "p", num_layers=4, layer_bytes=1e5, load_tokens=4096, edge_tokens=512,
                cold=False, strategy="recompute")
    pl.step_built(["r"])
    return pl, d


def test_fixed_overhead_leaves_out_the_compute_before_layer_0():
    """A step without a load: its forward runs from start_load_kv, so the embedding and layer 0's
    projections (30 ms here) are compute, not the per-step overhead the other strategies pay."""
    pl, d = recompute_step_built()
    start = time.perf_counter()
    time.sleep(0.03)
    enter0 = time.perf_counter()
    time.sleep(0.01)
    pl.observe_step(None, [], (4608, P.prefill_attn_work(4608, 0)), start, enter0, time.perf_counter(),
                    4, 1024)
    pl.step_done()
    assert d.measured_forward_s >= 0.04 and d.measured_s >= d.measured_forward_s
    assert 0 <= pl.t_fixed.value < 0.02
    assert pl.costs(num_layers=4, layer_bytes=1e5, load_tokens=4096, edge_tokens=512,
                    cold=False).t_e_pre_recompute >= 0.03


def test_start_load_kv_after_the_forward_is_not_the_forward_start():
    """vLLM 0.32 calls start_load_kv only after the forward in a step that loads nothing: the
    forward then runs from layer 0's attention, and the per-step overhead stays small (taking
    start_load_kv as the forward's start made every such forward 0 s and the overhead all of it)."""
    pl, d = recompute_step_built()
    enter0 = time.perf_counter()
    time.sleep(0.04)
    end = time.perf_counter()
    pl.observe_step(None, [], (4608, P.prefill_attn_work(4608, 0)), end, enter0, end, 4, 1024)
    pl.step_done()
    assert d.measured_forward_s >= 0.04
    assert 0 <= pl.t_fixed.value < 0.02
    assert pl.edge_pre.count == 0  # no T_fixed measured yet: the overhead cannot be taken apart


# ---------------- the host cost of moving messages while computing ----------------
def test_receiving_while_computing_stretches_the_pipeline_not_bulk():
    """Messages after the first arrive while the edge computes and slow it down (t_rx); bulk's one
    message is in before layer 0. Edge-bound: T = T_init + t_tr + L * t_e + t_rx(g)."""
    L, b = 8, 2.0 ** 18
    c = costs(num_layers=L, layer_bytes=b, latency=1e-4, bandwidth=1e10, t_e=0.015, rx_msg=0.004,
              rx_byte=1e-9, t_fixed=0.002)
    clean = replace(c, rx_msg=0.0, rx_byte=0.0)
    assert c.t_rx(1) == pytest.approx((L - 1) * (0.004 + b * 1e-9))
    assert c.t_rx(2) == pytest.approx(3 * 0.004 + 6 * b * 1e-9)  # 3 later messages of 2 layers
    assert c.t_rx(L) == 0.0
    for g in (1, 2, 4):
        want = c.t_fixed + c.t_init + c.t_msg(g) + L * c.t_e + c.t_rx(g)
        assert P.pipelined_time(c, g) == pytest.approx(want)
        assert P.pipelined_time(c, g) > P.pipelined_time(clean, g)
    assert P.pipelined_time(c, L) == pytest.approx(c.t_fixed + c.t_init + c.t_msg(L) + L * c.t_e)
    # link-bound (t_tr 26 ms > t_e + one message's receive, 19.3 ms): hidden in the waits (Eq. 12)
    slow = replace(c, bandwidth=1e7)
    assert P.pipelined_time(slow, 1) == pytest.approx(
        slow.t_fixed + P.closed_form_eq12(slow.t_init, 0.0, slow.t_msg(1), slow.t_e, L))
    # with the receive, bulk beats layer-wise on a fast link; without it, it could not
    assert P.pipelined_time(c, L) < P.pipelined_time(c, 1)
    assert P.pipelined_time(clean, L) > P.pipelined_time(clean, 1)


def test_sending_while_computing_stretches_a_cold_cloud():
    """A cold prompt: the cloud sends every message but the last while it computes."""
    L, b = 8, 2.0 ** 20
    c = costs(num_layers=L, layer_bytes=b, t_c=0.03, t_c_first=0.004, tx_msg=0.0025, tx_byte=1.5e-9,
              latency=0.0, bandwidth=1e12, t_e=0.001)
    assert c.t_c_at(1) == pytest.approx(0.03 + 0.0025 + b * 1.5e-9)  # one message per layer
    assert c.t_c_at(2) == pytest.approx(0.03 + (3 * 0.0025 + 6 * b * 1.5e-9) / 7)
    assert c.t_c_at(L) == 0.03 and replace(c, t_c=0.0).t_c_at(1) == 0.0  # bulk; warm
    # cloud-bound: the last layer leaves after T_init + t_c_first + (L - 1) * t_c_at(g)
    assert P.pipelined_time(c, 1) == pytest.approx(
        c.t_init + c.t_c_first + (L - 1) * c.t_c_at(1) + c.t_msg(1) + c.t_e)
    assert P.pipelined_time(c, L) == pytest.approx(
        c.t_init + c.t_c_first + (L - 1) * c.t_c + c.t_msg(L) + L * c.t_e)


def _load_step(n: int, g: int, L: int, bpt: int, edge_n: int, t_e_clean, rx, cloud=None) -> dict:
    """One load step as the worker reports it: messages of g layers, the edge's compute per layer
    (clean + what receiving the later messages cost it) and, cold, the cloud's per-layer times."""
    sizes = P.message_sizes(L, g)
    per_layer = t_e_clean + (rx[0] * (len(sizes) - 1) + rx[1] * (L - sizes[0]) * n * bpt) / (L - 1)
    if cloud is not None:
        c_first, t_c, tx = cloud
        c_layer = t_c + (tx[0] * (len(sizes) - 1) + tx[1] * (L - sizes[-1]) * n * bpt) / (L - 1)
        times = [c_first] + [c_layer] * (L - 1)
    else:
        times = [0.0] * L
    msgs, layer = [], 0
    for k in sizes:
        msgs.append({"layers": list(range(layer, layer + k)), "nbytes": k * n * bpt,
                     "header_s": 0.001, "pull_s": 0.001 + 0.002 * layer,
                     "ready_s": 0.002 + 0.002 * layer,
                     "cloud_compute_s": times[layer:layer + k]})
        layer += k
    return P.step_observation([per_layer] * L, [msgs],
                              (edge_n, P.prefill_attn_work(edge_n, n)), 0.0, 0.001, 0.5, L, bpt,
                              [cloud is not None])


def test_estimator_separates_compute_from_moving_the_messages():
    """From load steps of every strategy, the planner learns the edge's clean compute and the
    receive cost, the cloud's clean compute and the send cost; bulk is predicted clean."""
    L, bpt = 8, 1024
    a0, a1, a2 = 2e-3, 1e-5, 1e-8  # edge: s, s per token, s per attention unit
    rx = (0.004, 0.25e-9)  # s per message, s per byte received while computing
    b0, b1, b2, tx = 3e-3, 2e-5, 1e-8, (0.0025, 1.5e-9)  # cloud, and its sending
    te = lambda n, e: a0 + a1 * e + a2 * P.prefill_attn_work(e, n)
    tc = lambda n: b0 + b1 * n + b2 * P.prefill_attn_work(n, 0)
    pl = Planner()
    for n in (256, 1024, 4096):
        for e in (256, 512):
            for g in (1, 2, 8):
                pl.observe_step(**_load_step(n, g, L, bpt, e, te(n, e), rx, (0.004, tc(n), tx)))
    st = pl.stats()
    assert st["edge_model"]["rx_s_per_msg"] == pytest.approx(rx[0], rel=1e-4)
    assert st["edge_model"]["rx_s_per_byte"] == pytest.approx(rx[1], rel=1e-4)
    assert st["cloud_model"]["tx_s_per_msg"] == pytest.approx(tx[0], rel=1e-4)
    assert st["cloud_model"]["s"] == pytest.approx(b0, rel=1e-4)  # the per-layer intercept
    n = 2048
    c = pl.costs(num_layers=L, layer_bytes=n * bpt, load_tokens=n, edge_tokens=512, cold=True)
    assert c.t_e == pytest.approx(te(n, 512), rel=1e-4)  # clean: nothing arriving
    assert c.t_c == pytest.approx(tc(n), rel=1e-4)  # clean: nothing sent
    assert c.rx_msg == pytest.approx(rx[0], rel=1e-4)
    assert c.tx_byte == pytest.approx(tx[1], rel=1e-4)
    assert P.pipelined_time(c, L) == pytest.approx(
        c.t_fixed + c.t_init + c.t_c_first + (L - 1) * tc(n) + c.t_msg(L) + L * te(n, 512),
        rel=1e-4)


def test_recompute_has_its_own_prefill_fit():
    """A step without a load runs full causal attention over all n tokens (a2' n^2 / 2): learned
    apart from the load steps (attention over cached KV costs less per unit on the CPU), so
    neither bends the other. Until a prefill is measured, the load steps' fit stands in."""
    pl = Planner()
    load = (2e-3, 1e-5, 1e-8)  # a0, per token, per attention unit
    pre = (5e-3, 1.3e-5, 2e-8)
    f = lambda a, e, w: a[0] + a[1] * e + a[2] * w
    for n in (256, 1024, 4096):
        for e in (256, 512):
            w = P.prefill_attn_work(e, n)
            pl.observe_edge(e, w, f(load, e, w), loaded=True)
    c = pl.costs(num_layers=8, layer_bytes=1e6, load_tokens=4096, edge_tokens=512, cold=False)
    w_all = P.prefill_attn_work(4608, 0)
    assert c.t_e_recompute == pytest.approx(f(load, 4608, w_all), rel=1e-6)  # stand-in
    for n in (768, 1536, 4608, 768, 1536, 4608):
        w = P.prefill_attn_work(n, 0)
        pl.observe_edge(n, w, f(pre, n, w), loaded=False)
    c = pl.costs(num_layers=8, layer_bytes=1e6, load_tokens=4096, edge_tokens=512, cold=False)
    assert c.t_e_recompute == pytest.approx(f(pre, 4608, w_all), rel=1e-6)
    assert c.t_e == pytest.approx(f(load, 512, P.prefill_attn_work(512, 4096)), rel=1e-6)
    assert pl.stats()["observations"]["edge_steps"] == 12


def test_pre_layer0_compute_comes_out_of_the_overhead_when_start_load_kv_is_late():
    """vLLM 0.32: a step without a load calls start_load_kv after its forward, so its overhead
    (build -> layer 0's attention, forward end -> next call) holds its compute before layer 0.
    Once T_fixed is known (a load step), that part is the edge's pre-layer-0 compute: recompute
    pays it, T_fixed (every strategy pays it) does not get it."""
    pl = Planner(alpha=1.0)
    L, bpt = 4, 1024
    pl.step_built(["load"])
    start = time.perf_counter()  # a load step: start_load_kv before the forward
    time.sleep(0.005)
    obs = _load_step(128, 1, L, bpt, 64, 0.001, (0.0, 0.0))
    obs.update(start=start, enter0=start + 0.001, end=time.perf_counter())
    pl.observe_step(**obs)
    pl.step_done()
    t_fixed = pl.t_fixed.value
    assert pl.t_fixed.count == 1 and 0 <= t_fixed < 0.01
    pl.step_built(["recompute"])
    time.sleep(0.04)  # input preparation + embedding + layer 0's projections
    enter0 = time.perf_counter()
    time.sleep(0.02)  # layers 0..L-1
    end = time.perf_counter()
    pl.observe_step(None, [], (4608, P.prefill_attn_work(4608, 0)), end, enter0, end, L, bpt)
    pl.step_done()
    assert pl.t_fixed.value == t_fixed and pl.t_fixed.count == 1
    assert pl.edge_pre.count == 1 and pl.edge_pre.rows[-1][0] == [1.0, 4608.0]
    assert 0.035 <= pl.edge_pre.rows[-1][1] < 0.04 + 0.02  # the 40 ms, less T_fixed
    c = pl.costs(num_layers=L, layer_bytes=1e5, load_tokens=4096, edge_tokens=512, cold=False)
    assert c.t_e_pre_recompute == pytest.approx(pl.edge_pre.rows[-1][1], rel=1e-6)


def test_transfer_fit_follows_the_size_asked_about():
    """A link whose small messages pass at line rate (a shaper's burst) and large ones at the
    token rate: one line over all sizes misfits both; the fit near each size does not."""
    from edgeprompt_vllm.edge.planner import TransferFit

    def link(nbytes):  # 1 ms + 500 KB free, then 100 MB/s
        return 1e-3 + max(0.0, nbytes - 500e3) / 100e6

    fit = TransferFit(window=48)
    for _ in range(3):
        fit.add(4e6, link(4e6))
    for _ in range(40):  # a run of small messages fills the overall window
        for b in (100e3, 250e3, 500e3):
            fit.add(b, link(b))
    lat, s_per_byte = fit.coef
    overall = lat + s_per_byte * 4e6
    assert abs(overall / link(4e6) - 1) > 0.3  # the line over the run misses the large message
    assert fit(4e6) == pytest.approx(link(4e6), rel=0.05)
    assert fit(250e3) == pytest.approx(link(250e3), rel=0.05)
    assert fit(64e6) == pytest.approx(lat + s_per_byte * 64e6)  # nothing near it: the overall line


def test_costs_use_the_per_size_message_times():
    c = Costs(num_layers=4, layer_bytes=1e6, bandwidth=1e9, latency=1e-3, t_e=0.0)
    slow = replace(c, msg_s={1: 0.05, 2: 0.06, 4: 0.07})
    assert c.t_msg(1) == pytest.approx(2e-3) and slow.t_msg(1) == 0.05
    assert P.pipelined_time(slow, 4) == pytest.approx(0.07)  # one message, nothing else
    assert P.pipelined_time(slow, 1) == pytest.approx(4 * 0.05)  # the link is the bottleneck
