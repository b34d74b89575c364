"""OpenAI-client calls of the reliability tests, and the checks against stock vLLM."""

import itertools

import openai
from reliability.stack import MARKER

ATOL = 1e-4  # fp32 logprob tolerance (tests/edge/tolerance.py)
_n = itertools.count()


def client(server, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=timeout,
                         max_retries=0)


def edge_text(topic: str = "question") -> str:
    """A private edge prompt: unique, and carrying the marker the privacy audit looks for."""
    return f"\n{MARKER}-{next(_n)} My private {topic}: which detail matters most?\nAnswer:"


def complete(c, model, prompt, cloud=None, max_tokens=12, **kw):
    extra = dict(kw.pop("extra_body", {}))
    if cloud is not None:
        extra["kv_transfer_params"] = {"cloud_prompt": cloud}
    return c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                logprobs=1, extra_body=extra or None, **kw)


def status(resp) -> dict | None:
    return ((resp.model_extra or {}).get("kv_transfer_params") or {}).get("edgeprompt")


def assert_same_as_stock(edge_resp, stock_resp) -> None:
    e, s = edge_resp.choices[0].logprobs, stock_resp.choices[0].logprobs
    assert e.tokens == s.tokens, f"greedy tokens differ:\n{e.tokens}\n{s.tokens}"
    gap = max(abs(a - b) for a, b in zip(e.token_logprobs, s.token_logprobs))
    assert gap <= ATOL, f"logprob gap {gap}"


def stock_reference(stack, cloud_name: str, prompt: str, max_tokens: int = 12):
    """Stock vLLM on the concatenated prompt (cloud text + edge prompt)."""
    text = cloud_text(stack, cloud_name)
    return complete(client(stack.stock), stack.stock.model, text + prompt, max_tokens=max_tokens)


def cloud_text(stack, name: str) -> str:
    import yaml

    return yaml.safe_load((stack.registry_dir / f"{name}.yaml").read_text())["text"]
