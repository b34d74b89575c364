"""A record of every call the edge sends toward the cloud (DESIGN.md invariant 1, the audit).

Each call is one JSON line: the method, its arguments, and the hex of their pickled bytes
(what Ray serialises for the task). Tests scan it for edge token ids and edge text.
"""

import json
import os
import pickle
import threading
import time


class AuditLog:
    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()

    def record(self, method: str, args: tuple) -> None:
        if not self.path:
            return
        line = json.dumps({"t": time.time(), "pid": os.getpid(), "method": method,
                           "args": [repr(a) for a in args],
                           "pickled_hex": pickle.dumps((method, args)).hex()})
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
