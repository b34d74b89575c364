"""Cloud prompts and block-aligned prefix matching, shared by the cloud and the edge.

A cloud prompt is public: its id and token ids travel cloud -> edge (the registry). Only its
block-aligned prefix is shipped as KV; a partial tail block is computed on the edge. Matching
keys prefixes by our own hash of the token ids (not vLLM's block hashes: their seed differs
between processes and versions, docs/vllm-api.md §5).
"""

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_prompt_id(prompt_id: str) -> str:
    if not isinstance(prompt_id, str) or not _ID.match(prompt_id):
        raise ValueError(f"invalid cloud prompt id {prompt_id!r} (letters, digits, _.:- ; <= 128)")
    return prompt_id


def tokens_hash(token_ids: Sequence[int]) -> str:
    """A stable hash of token ids (the same in every process and version)."""
    return hashlib.blake2b(b",".join(b"%d" % t for t in token_ids), digest_size=16).hexdigest()


def aligned_len(num_tokens: int, block_size: int) -> int:
    return num_tokens // block_size * block_size


@dataclass(frozen=True)
class CloudPrompt:
    prompt_id: str
    token_ids: tuple[int, ...]
    pinned: bool = False  # registered from a config: never evicted in the cloud

    def __post_init__(self):
        check_prompt_id(self.prompt_id)
        if not self.token_ids:
            raise ValueError(f"cloud prompt {self.prompt_id!r} has no tokens")

    def shipped_len(self, block_size: int) -> int:
        """Tokens whose KV the cloud ships: the block-aligned prefix."""
        return aligned_len(len(self.token_ids), block_size)

    def to_dict(self) -> dict:
        return {"prompt_id": self.prompt_id, "token_ids": list(self.token_ids), "pinned": self.pinned}

    @classmethod
    def from_dict(cls, d: dict) -> "CloudPrompt":
        return cls(d["prompt_id"], tuple(int(t) for t in d["token_ids"]), bool(d.get("pinned")))


@dataclass(frozen=True)
class Match:
    prompt: CloudPrompt
    num_tokens: int  # block-aligned tokens of the request covered by the cloud prompt's KV


class PromptRegistry:
    """Registered cloud prompts; the longest block-aligned prefix match of a request."""

    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._prompts: dict[str, CloudPrompt] = {}
        self._by_len: dict[int, dict[str, str]] = {}  # shipped len -> {tokens hash: prompt id}

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)

    def ids(self) -> list[str]:
        return list(self._prompts)

    def get(self, prompt_id: str) -> CloudPrompt:
        try:
            return self._prompts[prompt_id]
        except KeyError:
            raise KeyError(f"unknown cloud prompt {prompt_id!r}; registered: {self.ids()}") from None

    def add(self, prompt: CloudPrompt) -> None:
        old = self._prompts.get(prompt.prompt_id)
        if old is not None and old.token_ids != prompt.token_ids:
            raise ValueError(f"cloud prompt {prompt.prompt_id!r} is already registered with other tokens")
        self.remove(prompt.prompt_id)
        self._prompts[prompt.prompt_id] = prompt
        n = prompt.shipped_len(self.block_size)
        if n:
            self._by_len.setdefault(n, {})[tokens_hash(prompt.token_ids[:n])] = prompt.prompt_id

    def remove(self, prompt_id: str) -> None:
        prompt = self._prompts.pop(prompt_id, None)
        if prompt is None:
            return
        n = prompt.shipped_len(self.block_size)
        by_hash = self._by_len.get(n, {})
        by_hash.pop(tokens_hash(prompt.token_ids[:n]), None)
        if not by_hash:
            self._by_len.pop(n, None)

    def loadable_len(self, prompt: CloudPrompt, request_len: int) -> int:
        """Aligned tokens to load; at least one request token is left to compute (for logits)."""
        return min(prompt.shipped_len(self.block_size), aligned_len(request_len - 1, self.block_size))

    def match(self, token_ids: Sequence[int], prompt_id: str | None = None) -> Match | None:
        """The cloud prompt covering the longest block-aligned prefix of `token_ids`.

        With `prompt_id` (the request's `kv_transfer_params["cloud_prompt"]`), only that prompt,
        and it may cover part of itself; it must still equal the request's leading tokens.
        """
        if prompt_id is not None:
            prompt = self.get(prompt_id)
            n = self.loadable_len(prompt, len(token_ids))
            if n and tuple(token_ids[:n]) == prompt.token_ids[:n]:
                return Match(prompt, n)
            return None
        limit = aligned_len(len(token_ids) - 1, self.block_size)
        for n in sorted((n for n in self._by_len if n <= limit), reverse=True):
            pid = self._by_len[n].get(tokens_hash(token_ids[:n]))
            if pid is not None and tuple(token_ids[:n]) == self._prompts[pid].token_ids[:n]:
                return Match(self._prompts[pid], n)
        return None
