"""prompts.py: block-aligned longest-prefix matching, used by the edge scheduler and the cloud."""

import pytest

from edgeprompt_vllm.prompts import CloudPrompt, PromptRegistry, check_prompt_id

BS = 4


def reg(*prompts):
    r = PromptRegistry(BS)
    for pid, toks in prompts:
        r.add(CloudPrompt(pid, tuple(toks)))
    return r


def test_longest_aligned_prefix_wins():
    r = reg(("short", range(8)), ("long", range(13)))  # long ships 12 tokens, short 8
    m = r.match(list(range(13)) + [99, 98])
    assert (m.prompt.prompt_id, m.num_tokens) == ("long", 12)
    m = r.match(list(range(10)) + [50] * 5)  # diverges at 10: only `short` (8) matches
    assert (m.prompt.prompt_id, m.num_tokens) == ("short", 8)


def test_at_least_one_request_token_is_left_to_compute():
    r = reg(("p", range(8)))
    assert r.match(list(range(8))) is None  # loading all 8 would leave nothing for the logits
    assert r.match(list(range(9))).num_tokens == 8


def test_no_match_and_short_prompt():
    r = reg(("p", range(8)), ("tiny", [7, 7]))  # tiny ships nothing
    assert r.match([1, 2, 3, 4, 5, 6, 7, 8, 9]) is None
    assert r.match([7, 7, 7]) is None


def test_explicit_prompt_id_must_equal_request_prefix():
    r = reg(("p", range(12)))
    assert r.match(list(range(7)) + [5], prompt_id="p").num_tokens == 4  # a partial, aligned cover
    assert r.match([0, 1, 2, 9, 9, 9, 9], prompt_id="p") is None  # same id, other tokens
    with pytest.raises(KeyError, match="unknown cloud prompt"):
        r.match(list(range(20)), prompt_id="nope")


def test_reregister_and_remove():
    r = reg(("p", range(8)))
    r.add(CloudPrompt("p", tuple(range(8))))  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        r.add(CloudPrompt("p", (1, 2, 3, 4)))
    r.remove("p")
    assert r.match(list(range(9))) is None and len(r) == 0


@pytest.mark.parametrize("bad", ["", "a b", "x" * 200, "../etc", 5])
def test_prompt_ids_are_checked(bad):
    with pytest.raises(ValueError):
        check_prompt_id(bad)
