"""The API server's copy of the cloud's public prompt catalog, and whether the cloud answers.

The edge's API server process (the `--middleware`) needs, per cloud prompt, what to prepend:
the chat system message, the text prefix, or the token ids. It asks the cloud actor for its
catalog (cloud -> edge, public) through the same audited client as the engine; the only
argument it sends is the model fingerprint digest.
"""

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.transport.client import CloudClient, CloudUnavailable

logger = get_logger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    prompt_id: str
    token_ids: tuple[int, ...]
    kind: str  # "system" (chat system message), "text" (text prefix), "tokens" (token ids only)
    content: str | None  # the system message or the text; None for "tokens"
    pinned: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "CatalogEntry":
        return cls(d["prompt_id"], tuple(int(t) for t in d["token_ids"]), d.get("kind", "tokens"),
                   d.get("content"), bool(d.get("pinned")))


class _CatalogClient(CloudClient):
    def catalog(self, timeout_s: float) -> list[dict]:
        return self._get(self._call("catalog", self._digest), timeout_s)


class CloudCatalog:
    """Thread-safe; refresh() blocks (run it off the event loop)."""

    def __init__(self, config: EdgePromptConfig, fingerprint: Callable[[], Fingerprint] | None = None,
                 connect: Callable[[], object] | None = None):
        """`fingerprint`: the edge model's (computed on first use); `connect` (tests): makes a
        client with .catalog(timeout_s), instead of finding the actor with Ray."""
        self.config = config
        self._connect = connect or (lambda: _CatalogClient.connect(
            dataclasses.replace(config, connect_timeout_s=config.health_timeout_s), fingerprint()))
        self._client = None
        self._entries: dict[str, CatalogEntry] = {}
        self._ok_at: float | None = None  # monotonic time of the last answer from the cloud
        self._failed_at: float | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def get(self, prompt_id: str) -> CatalogEntry | None:
        return self._entries.get(prompt_id)

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def loaded(self) -> bool:
        return self._ok_at is not None

    def age_s(self) -> float:
        return float("inf") if self._ok_at is None else time.monotonic() - self._ok_at

    def refresh(self, max_age_s: float = 0.0) -> None:
        """Fetches the catalog unless one newer than `max_age_s` is at hand; raises
        CloudUnavailable (again without asking, for `max_age_s` after a failure)."""
        with self._lock:
            now = time.monotonic()
            if self._ok_at is not None and now - self._ok_at < max_age_s and \
                    (self._failed_at is None or self._failed_at < self._ok_at):
                return
            if self._failed_at is not None and now - self._failed_at < max_age_s and \
                    (self._ok_at is None or self._ok_at < self._failed_at):
                raise CloudUnavailable(self._error)
            try:
                if self._client is None:
                    self._client = self._connect()
                raw = self._client.catalog(self.config.health_timeout_s)
            except Exception as e:
                self._client = None  # find the actor again next time (it may have been restarted)
                self._failed_at, self._error = time.monotonic(), f"{type(e).__name__}: {e}"
                logger.warning("cloud prompt catalog: the cloud does not answer: %s", self._error)
                raise CloudUnavailable(self._error) from e
            self._entries = {d["prompt_id"]: CatalogEntry.from_dict(d) for d in raw}
            self._ok_at = time.monotonic()

    def refresh_in_background(self, max_age_s: float = 0.0) -> None:
        def run():
            try:
                self.refresh(max_age_s)
            except CloudUnavailable:
                pass

        threading.Thread(target=run, daemon=True, name="ep-catalog").start()
