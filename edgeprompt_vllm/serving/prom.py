"""Reading a server's /metrics (Prometheus text) back: for the demo and the tests."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str, prefix: str = "edgeprompt_", timeout: float = 10) -> list[tuple[str, dict, float]]:
    """-> [(sample name, labels, value)] of the metrics whose name starts with `prefix`."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith(prefix)]


def total(samples, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))
