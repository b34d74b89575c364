"""The truncated ShareGPT V3 file: every complete record, then a clean stop."""

from edgeprompt_vllm.data.sharegpt import iter_records, iter_texts, load_summary


def test_complete_records_are_kept_and_the_cut_is_reported():
    summary = load_summary()
    assert summary.truncated  # the packaged file ends inside a record
    assert summary.complete_records > 10_000
    records = list(iter_records())
    assert len(records) == summary.complete_records
    assert all("conversations" in r and "id" in r for r in records)


def test_limits():
    assert len(list(iter_records(limit=5))) == 5
    texts = list(iter_texts(limit_chars=10_000))
    assert 10_000 <= sum(map(len, texts)) < 10_000 + max(map(len, texts)) + 1
