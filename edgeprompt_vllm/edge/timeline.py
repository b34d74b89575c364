"""The per-layer timeline of one load step: cloud compute, transfer, wait, edge compute.

All times are seconds from start_load_kv. For the planner (DESIGN.md, the communication
model) and the benchmarks: T = T_init + t_c + t_tr + (L - 1) * max(t_tr, t_e) + t_e.
"""

import json
import os
import time


class Timeline:
    def __init__(self, num_layers: int, specs, streams):
        self.t0 = time.perf_counter()
        self.num_layers = num_layers
        self.specs, self.streams = specs, streams
        self.enter_s = [None] * num_layers  # wait_for_layer_load(l) called
        self.leave_s = [None] * num_layers  # layer l written, its attention may run
        self.end_s: float | None = None  # forward done (wait_for_save)

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def enter(self, layer: int) -> None:
        self.enter_s[layer] = self._now()

    def leave(self, layer: int) -> None:
        self.leave_s[layer] = self._now()

    def _offset(self, stream) -> float:
        """A stream's times count from its own start: add this to put them on our clock."""
        return getattr(stream, "t_start", self.t0) - self.t0

    def record(self) -> dict:
        layers = []
        for l in range(self.num_layers):
            nxt = self.enter_s[l + 1] if l + 1 < self.num_layers else self.end_s
            tm = [(s.timings.get(l, {}), self._offset(s)) for s in self.streams]
            layers.append({
                "layer": l,
                "cloud_compute_s": max((t.get("cloud_compute_s", 0.0) for t, _ in tm), default=0.0),
                "arrived_s": max((t.get("data_s", float("nan")) + o for t, o in tm), default=None),
                "ready_s": max((t.get("ready_s", float("nan")) + o for t, o in tm), default=None),
                "nbytes": sum(t.get("nbytes", 0) for t, _ in tm),
                "enter_s": self.enter_s[l], "leave_s": self.leave_s[l],
                "wait_s": None if self.enter_s[l] is None else self.leave_s[l] - self.enter_s[l],
                "edge_compute_s": None if nxt is None or self.leave_s[l] is None else nxt - self.leave_s[l],
            })
        messages = []  # per message on the link (transport/client.py), in this timeline's clock
        for s in self.streams:
            off = self._offset(s)
            for m in list(getattr(s, "messages", [])):
                messages.append({"prompt_id": s.prompt_id, "layers": m["layers"], "nbytes": m["nbytes"],
                                 "wire_nbytes": m["wire_nbytes"], "header_s": m["header_s"] + off,
                                 "pull_s": m["pull_s"] + off, "ready_s": m["ready_s"] + off})
        return {"pid": os.getpid(), "t_total_s": self.end_s,
                "loads": [{"prompt_id": s.prompt_id, "tokens": s.end - s.start} for s in self.specs],
                "total_wait_s": sum(x["wait_s"] or 0.0 for x in layers), "layers": layers,
                "messages": messages}

    def finish(self, path: str | None) -> dict:
        self.end_s = self._now()
        rec = self.record()
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec
