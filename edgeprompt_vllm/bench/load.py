"""An interactive load against an OpenAI-compatible server: Poisson arrivals, streamed
/v1/completions through the `openai` client, and the latency metrics of `vllm bench serve`.

Per request: TTFT (send -> first streamed chunk), TPOT ((latency - TTFT) / (output tokens - 1)),
ITL (gaps between consecutive streamed chunks), end-to-end latency; the output token count is
the server's `usage.completion_tokens`. Per run: output tokens / (first send -> last answer).
"""

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    ok: bool = False
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(
    client, model: str, prompt: list[int], max_tokens: int, extra_body: dict | None = None
) -> Result:
    r = Result()
    t0 = time.perf_counter()
    last = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **(extra_body or {})},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if last is None:
                    r.ttft_s = now - t0
                else:
                    r.itl_s.append(now - last)
                last = now
            if chunk.usage is not None:
                r.output_tokens = chunk.usage.completion_tokens
        r.latency_s = time.perf_counter() - t0
        r.ok = last is not None and r.output_tokens > 0
        if not r.ok:
            r.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 (a failed request is counted, not raised)
        r.error = f"{type(e).__name__}: {e}"[:300]
    return r


def fresh_connections_client():
    """An HTTP client that opens a connection per request. A pooled keep-alive connection that
    idled past the server's keep-alive timeout (uvicorn: 5 s, e.g. across a pause between rates)
    can be closed by the server just as it is reused: the request then fails with a connection
    error that says nothing about the server (seen once in ~4000 requests on the H100). Without
    retries (a retry would hide real failures), not pooling removes the race; a localhost
    connect costs well under a millisecond."""
    import httpx

    return httpx.AsyncClient(timeout=3600,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))


def poisson_offsets(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times (s) of n requests at `rate` per second; the first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


async def run_load(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    max_tokens: int | list[int],
    rate: float,
    extra_body: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[Result], float]:
    """-> (results in send order, seconds from the first send to the last answer)."""
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="EMPTY", timeout=3600, max_retries=0,
                         http_client=fresh_connections_client())
    offsets = (
        poisson_offsets(len(prompts), rate, seed)
        if rate != float("inf")
        else np.zeros(len(prompts))
    )
    bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=not progress, leave=False)

    lens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

    async def send(prompt, at, t_start, m):
        await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
        res = await one_request(client, model, prompt, m, extra_body)
        bar.update(1)
        return res

    t_start = time.perf_counter()
    try:
        results = await asyncio.gather(
            *(send(p, at, t_start, m) for p, at, m in zip(prompts, offsets, lens))
        )
    finally:
        bar.close()
        await client.close()
    return list(results), time.perf_counter() - t_start


def _pct(values, ms: bool = True) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values) * (1e3 if ms else 1)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
    }


def p99_ci95(values, ms: bool = True, resamples: int = 1000) -> list[float] | None:
    """A 95% bootstrap interval of the 99th percentile: with 200 requests p99 is about the
    second-slowest one, and the interval says how far another run's could land."""
    if len(values) < 2:
        return None
    a = np.asarray(values) * (1e3 if ms else 1)
    rng = np.random.default_rng(0)
    p99s = np.percentile(rng.choice(a, size=(resamples, len(a))), 99, axis=1)
    lo, hi = np.percentile(p99s, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(results: list[Result], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration_s,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / duration_s if duration_s > 0 else 0.0,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": _pct([r.ttft_s for r in ok]),
        "tpot_ms": {**_pct(tpot), "p99_ci95": p99_ci95(tpot)},
        "itl_ms": _pct([x for r in ok for x in r.itl_s]),
        "e2el_ms": _pct([r.latency_s for r in ok]),
    }


def sustainable_rate(points: list[dict], slo_ms: float) -> dict:
    """The highest request rate whose p99 TPOT stays within `slo_ms` with no failed request,
    every lower rate also passing. points: [{"rate", "tpot_ms": {"p99"}, "failed"}].
    "rate": the highest tested rate that passes (0 if none); "interpolated": where p99 TPOT
    crosses the SLO between it and the next rate (linear); "censored": every rate passed."""
    pts = sorted(points, key=lambda p: p["rate"])

    def passes(p):
        t = p["tpot_ms"]["p99"]
        return p["failed"] == 0 and t is not None and t <= slo_ms

    best, nxt = None, None
    for p in pts:
        if not passes(p):
            nxt = p
            break
        best = p
    rate = best["rate"] if best else 0.0
    interp = rate
    if best and nxt and nxt["tpot_ms"]["p99"] is not None and nxt["failed"] == 0:
        t0, t1 = best["tpot_ms"]["p99"], nxt["tpot_ms"]["p99"]
        if t1 > t0:
            interp = best["rate"] + (slo_ms - t0) * (nxt["rate"] - best["rate"]) / (t1 - t0)
    return {
        "slo_p99_tpot_ms": slo_ms,
        "rate": rate,
        "interpolated": interp,
        "censored": bool(pts) and nxt is None,
    }
