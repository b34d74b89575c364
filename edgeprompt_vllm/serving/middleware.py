"""The OpenAI API side of an edge:

    vllm serve ... --middleware edgeprompt_vllm.serving.middleware.EdgePromptMiddleware

A pure ASGI middleware (vLLM's documented `--middleware` option, 0.26 to 0.32). For POST
/v1/completions and /v1/chat/completions whose body has `kv_transfer_params`, it:

1. validates them: an object with `cloud_prompt` (a registered name) and optionally `strategy`
   (the planner's transfer strategy); anything else -> 400;
2. resolves the name in the cloud's catalog (serving/catalog.py) -> unknown: 400; the cloud
   unreachable: 503 with `on_cloud_unavailable: "error"`, else the last catalog seen is used and
   the engine recomputes the cloud prompt if its KV cannot be fetched;
3. prepends the cloud prompt, so the client never sends it:
   - /v1/chat/completions, a chat system prompt: inserts it as the first (system) message;
   - /v1/completions, a text prompt: `prompt` becomes cloud text + prompt (vLLM tokenizes the
     concatenation exactly as stock vLLM would); a token-id prompt: cloud token ids + prompt;
4. passes the request on with `kv_transfer_params={"cloud_prompt": NAME}`; the connector then
   loads the cloud KV for those leading tokens.

Everything else (other routes, requests without kv_transfer_params, full prompts that contain a
registered cloud prompt, which the connector recognises by its tokens) passes through untouched;
vLLM's own checks (e.g. prompt longer than max_model_len: 400) run on the rewritten request.
"""

import asyncio
import hashlib
import json
import os
import secrets

from starlette.datastructures import Headers

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.prompts import check_prompt_id
from edgeprompt_vllm.serving.catalog import CatalogEntry, CloudCatalog
from edgeprompt_vllm.transport.client import CloudUnavailable

logger = get_logger(__name__)

ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
# The request's kv_transfer_params keys the connector reads: cloud_prompt (and its older alias
# cloud_prompt_id), strategy (the planner's transfer strategy, edge/planner.py).
PARAM_KEYS = ("cloud_prompt", "cloud_prompt_id", "strategy")
FRESH_S = 1.0  # "error" policy: a catalog older than this is refreshed before a request uses it


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> bytes:
        kind = {400: "BadRequestError", 503: "ServiceUnavailableError"}.get(self.status, "Error")
        return json.dumps({"error": {"message": self.message, "type": kind, "param": self.param,
                                     "code": self.status}}).encode()


def _bad(message: str, param: str = "kv_transfer_params") -> ApiError:
    return ApiError(400, message, param)


# ---------------- pure request rewriting (unit-tested without a server) ----------------
def requested_cloud_prompt(req: dict) -> str | None:
    """The validated cloud prompt name of a request body, or None; raises ApiError(400)."""
    if "kv_transfer_params" not in req or req["kv_transfer_params"] is None:
        return None
    params = req["kv_transfer_params"]
    if not isinstance(params, dict):
        raise _bad("kv_transfer_params must be a JSON object such as {\"cloud_prompt\": \"NAME\"}, "
                   f"not {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise _bad(f"unknown key(s) {unknown} in kv_transfer_params; EdgePrompt accepts "
                   "{\"cloud_prompt\": \"NAME\"} (and \"strategy\")")
    if "strategy" in params:
        _check_strategy(params["strategy"])
    name = params.get("cloud_prompt", params.get("cloud_prompt_id"))
    if "cloud_prompt" in params and "cloud_prompt_id" in params and \
            params["cloud_prompt"] != params["cloud_prompt_id"]:
        raise _bad("kv_transfer_params has both cloud_prompt and cloud_prompt_id, and they differ; "
                   "send cloud_prompt only", "kv_transfer_params.cloud_prompt")
    if name is None:
        return None
    if not isinstance(name, str):
        raise _bad("kv_transfer_params.cloud_prompt must be a string (the name of a registered "
                   f"cloud prompt), not {json.dumps(name)}", "kv_transfer_params.cloud_prompt")
    try:
        check_prompt_id(name)
    except ValueError:
        raise _bad(f"kv_transfer_params.cloud_prompt {name!r} is not a valid cloud prompt name "
                   "(letters, digits and _.:-, at most 128)", "kv_transfer_params.cloud_prompt") from None
    return name


def _check_strategy(strategy) -> None:
    from edgeprompt_vllm import config

    allowed = getattr(config, "STRATEGIES", None)
    if not isinstance(strategy, str) or (allowed is not None and strategy not in allowed):
        raise _bad(f"kv_transfer_params.strategy must be one of {list(allowed or [])}, not "
                   f"{json.dumps(strategy)}", "kv_transfer_params.strategy")


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def prepend_to_prompt(entry: CatalogEntry, prompt):
    """/v1/completions: the cloud prompt before the client's prompt (text, ids, or a batch)."""
    if isinstance(prompt, str):
        if entry.kind == "text":
            return entry.content + prompt
        if entry.kind == "system":
            raise _bad(f"cloud prompt {entry.prompt_id!r} is a chat system prompt: use it with "
                       "/v1/chat/completions", "kv_transfer_params.cloud_prompt")
        raise _bad(f"cloud prompt {entry.prompt_id!r} was registered as token ids: send `prompt` "
                   "as token ids to use it", "prompt")
    if _is_ids(prompt):
        return list(entry.token_ids) + prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return [prepend_to_prompt(entry, p) for p in prompt]
    raise _bad("with a cloud_prompt, `prompt` must be a string, a list of token ids, or a list "
               "of those", "prompt")


def prepend_to_messages(entry: CatalogEntry, messages):
    """/v1/chat/completions: the cloud prompt as the system message."""
    if entry.kind != "system":
        raise _bad(f"cloud prompt {entry.prompt_id!r} is not a chat system prompt: use it with "
                   "/v1/completions", "kv_transfer_params.cloud_prompt")
    if not isinstance(messages, list) or not messages:
        raise _bad("with a cloud_prompt, `messages` must be a non-empty list", "messages")
    first = messages[0]
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        if first.get("role") == "system" and first.get("content") == entry.content:
            return messages  # the client sent the cloud prompt itself: nothing to add
        raise _bad(f"the request already has a {first.get('role')} message; cloud prompt "
                   f"{entry.prompt_id!r} is the system message: leave yours out", "messages")
    return [{"role": "system", "content": entry.content}, *messages]


def rewrite(route: str, req: dict, entry: CatalogEntry) -> dict:
    req = dict(req)
    if route == "completions":
        if req.get("prompt_embeds") is not None:
            raise _bad("cloud_prompt cannot be combined with prompt_embeds", "prompt_embeds")
        req["prompt"] = prepend_to_prompt(entry, req.get("prompt"))
    else:
        req["messages"] = prepend_to_messages(entry, req.get("messages"))
    params = {k: v for k, v in req["kv_transfer_params"].items() if k != "cloud_prompt_id"}
    req["kv_transfer_params"] = {**params, "cloud_prompt": entry.prompt_id}
    return req


# ---------------- the ASGI middleware ----------------
class EdgePromptMiddleware:
    def __init__(self, app, catalog: CloudCatalog | None = None,
                 config: EdgePromptConfig | None = None):
        self.app = app
        self.catalog, self.config = catalog, config  # tests inject both; vllm serve: from the app
        self._setup_done = catalog is not None
        self._api_keys: list[bytes] = []  # vLLM's --api-key: unauthenticated requests pass untouched

    # -- setup from the vLLM app: its kv-transfer config and model --
    def _setup(self, app) -> None:
        if self._setup_done:
            return
        state = getattr(app, "state", None)
        vllm_config = getattr(state, "vllm_config", None)
        if vllm_config is None:
            return  # not ready yet (no app state): pass through, try again next request
        self._setup_done = True
        args = getattr(state, "args", None)
        keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
        self._api_keys = [hashlib.sha256(k.encode()).digest() for k in keys]
        kvt = vllm_config.kv_transfer_config
        if kvt is None or kvt.kv_connector != "EdgePromptConnector":
            logger.warning("EdgePromptMiddleware: no EdgePromptConnector in --kv-transfer-config; "
                           "cloud prompts are disabled in the API")
            return
        from edgeprompt_vllm.edge.connector import edge_fingerprint

        self.config = EdgePromptConfig.from_dict(kvt.kv_connector_extra_config)
        self.catalog = CloudCatalog(self.config, lambda: edge_fingerprint(vllm_config))
        self.catalog.refresh_in_background()
        logger.info("EdgePromptMiddleware: cloud prompts from actor %r in namespace %r (%s); "
                    "on an unreachable cloud: %s", self.config.actor_name, self.config.namespace,
                    self.config.ray_address or "auto", self.config.on_cloud_unavailable)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self._setup(scope.get("app"))
            return await self.app(scope, receive, send)
        route = _route(scope)
        if route is None:
            return await self.app(scope, receive, send)
        self._setup(scope.get("app"))
        if self.catalog is None or not self._authorized(scope):
            # (vLLM's authentication runs inside this middleware: let it answer 401 first)
            return await self.app(scope, receive, send)
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        try:
            new_body = await self._rewrite(route, body)
        except ApiError as e:
            return await _respond(send, e.status, e.body())
        if new_body is not None:
            body = new_body
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope) -> bool:
        """The same check as vLLM's AuthenticationMiddleware (Authorization: Bearer KEY)."""
        if not self._api_keys:
            return True
        value = Headers(scope=scope).get("authorization") or ""
        scheme, _, token = value.partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and any(
            [secrets.compare_digest(digest, k) for k in self._api_keys])

    async def _rewrite(self, route: str, body: bytes) -> bytes | None:
        try:
            req = json.loads(body)
        except ValueError:
            return None  # not JSON: vLLM answers it
        if not isinstance(req, dict):
            return None
        name = requested_cloud_prompt(req)
        if name is None:
            return None
        entry = await self._resolve(name)
        return json.dumps(rewrite(route, req, entry)).encode()

    async def _resolve(self, name: str) -> CatalogEntry:
        cat, policy = self.catalog, self.config.on_cloud_unavailable
        entry = cat.get(name)
        if entry is None or (policy == "error" and cat.age_s() > FRESH_S):
            try:
                await asyncio.to_thread(cat.refresh, FRESH_S if entry is not None else 0.0)
            except CloudUnavailable as e:
                if policy == "error" or entry is None:
                    raise ApiError(503, f"the EdgePrompt cloud is unreachable, so cloud prompt "
                                   f"{name!r} cannot be served now ({e}); retry later") from None
                # "recompute": the engine computes the cloud prompt itself (the last catalog
                # has its text and tokens)
            entry = cat.get(name)
            if entry is None:
                known = ", ".join(cat.names()) or "(none)"
                raise _bad(f"unknown cloud prompt {name!r}; registered: {known}",
                           "kv_transfer_params.cloud_prompt")
        elif cat.age_s() > FRESH_S:
            cat.refresh_in_background(FRESH_S)
        return entry


def _route(scope) -> str | None:
    if scope["type"] != "http" or scope.get("method") != "POST":
        return None
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return ROUTES.get(path.rstrip("/") or path)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"", True
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: http.disconnect

    return replay


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
