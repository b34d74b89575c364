"""config.py: one validated EdgePromptConfig from kv_connector_extra_config."""

import pytest

from edgeprompt_vllm.config import EdgePromptConfig


def test_defaults_and_round_trip():
    c = EdgePromptConfig.from_dict({"ray_address": "1.2.3.4:6379", "fetch_timeout_s": 5})
    assert c.namespace == "edgeprompt" and c.fetch_timeout_s == 5
    assert EdgePromptConfig.from_dict(c.to_dict()) == c
    assert EdgePromptConfig.from_dict(None) == EdgePromptConfig()


@pytest.mark.parametrize("raw, msg", [
    ({"fetch_timout_s": 1}, "unknown EdgePrompt option"),
    ({"fetch_timeout_s": 0}, "must be > 0"),
    ({"emulated_layer_delay_s": -1}, ">= 0"),
    ({"min_prefix_blocks": 0}, ">= 1"),
    ({"namespace": ""}, "non-empty"),
])
def test_bad_options_are_refused(raw, msg):
    with pytest.raises(ValueError, match=msg):
        EdgePromptConfig.from_dict(raw)
