"""A torch-profiler window on a running `vllm serve`: where a serving step's time goes.

The server is started with vLLM's profiler configured (`server_flags`); `profiled` then brackets
a piece of load with POST /start_profile and /stop_profile. On stop, vLLM's workers write their
traces and a table of every op and kernel sorted by device time (CPU time on a CPU) into the
folder, named `profiler_out_<rank>.txt` (vLLM 0.26) or `<worker>.profiler_out.txt` (0.32);
the table's head goes into the result. vLLM hashes the profiler config into its compile cache
key, so a profiled server compiles afresh on its first start.
"""

import json
import time
from pathlib import Path

TABLE_ROWS = 30  # kernels / ops kept in the result


def server_flags(profile_dir: Path) -> list[str]:
    """`vllm serve` flags: the torch profiler, traces and tables into profile_dir, no Python
    stacks (smaller traces), the engine only (not the API server's own process)."""
    config = {"profiler": "torch", "torch_profiler_dir": str(profile_dir),
              "torch_profiler_with_stack": False, "ignore_frontend": True}
    return ["--profiler-config", json.dumps(config)]


def table_head(text: str, rows: int = TABLE_ROWS) -> list[str]:
    """The table's title lines and its first `rows` rows (torch's key_averages().table())."""
    lines = [line for line in text.splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "}]
    start = rules[1] + 1 if len(rules) >= 2 else 0  # rows follow the rule under the header
    return lines[:start] + lines[start:start + rows]


def profiled(base_url: str, profile_dir: Path, work, timeout_s: float = 900.0) -> dict:
    """Runs work() between /start_profile and /stop_profile; -> {"table": head lines, "file",
    "stop_s": seconds the stop took (traces are written then)}. Raises if no table appears."""
    import httpx

    profile_dir = Path(profile_dir)
    before = {p: p.stat().st_mtime for p in profile_dir.glob("*profiler_out*.txt")}
    httpx.post(base_url + "/start_profile", timeout=timeout_s).raise_for_status()
    try:
        result = work()
    finally:
        t0 = time.perf_counter()
        httpx.post(base_url + "/stop_profile", timeout=timeout_s).raise_for_status()
        stop_s = time.perf_counter() - t0
    deadline = time.monotonic() + 60  # the workers may still be writing when stop returns
    while not (fresh := [p for p in profile_dir.glob("*profiler_out*.txt")
                         if before.get(p) != p.stat().st_mtime]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the profiler wrote no table into {profile_dir}")
        time.sleep(0.5)
    table = max(fresh, key=lambda p: p.stat().st_mtime)
    return {"result": result, "file": str(table), "stop_s": stop_s,
            "table": table_head(table.read_text(errors="replace"))}
