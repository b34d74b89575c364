"""The cloud prompt registry on disk (configs/cloud_prompts/): YAML validated with clear errors."""

import pytest

from edgeprompt_vllm.cloud.prompt_files import (
    PromptFileError,
    default_registry_dir,
    load_registry,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_the_shipped_registry_is_valid():
    specs = {s.name: s for s in load_registry(default_registry_dir())}
    assert specs["travel-agent"].kind == "system" and specs["travel-agent"].pinned
    assert specs["lisbon-guide"].kind == "text" and not specs["lisbon-guide"].pinned
    assert all(len(s.content) > 500 for s in specs.values())  # longer than a few KV blocks


def test_a_directory_loads_sorted_and_a_single_file_too(tmp_path):
    write(tmp_path, "b.yaml", "name: b\ntext: 'hello '\n")
    write(tmp_path, "a.yml", "name: a\nsystem: Be brief.\npinned: true\ndescription: x\n")
    write(tmp_path, "notes.txt", "ignored")
    specs = load_registry(tmp_path)
    assert [(s.name, s.kind, s.content, s.pinned) for s in specs] == [
        ("a", "system", "Be brief.", True), ("b", "text", "hello ", False)]
    assert load_registry(tmp_path / "b.yaml")[0].name == "b"


@pytest.mark.parametrize("body, msg", [
    ("name: x\ntext: hi\ncolor: red\n", "x.yaml: unknown field 'color'"),
    ("text: hi\n", "x.yaml: field 'name' is missing"),
    ("name: 'bad name!'\ntext: hi\n", "x.yaml: field 'name': 'bad name!' is not a valid name"),
    ("name: x\n", "found neither"),
    ("name: x\ntext: a\nsystem: b\n", "found system and text"),
    ("name: x\ntext: '   '\n", "x.yaml: field 'text' is empty"),
    ("name: x\nsystem: [1, 2]\n", "field 'system' must be a string, not list"),
    ("name: x\ntext: hi\npinned: maybe\n", "field 'pinned' must be true or false"),
    ("- just\n- a list\n", "x.yaml: expected a mapping"),
    ("name: x\ntext: [unclosed\n", "x.yaml: not valid YAML"),
])
def test_bad_files_name_the_file_and_field(tmp_path, body, msg):
    write(tmp_path, "x.yaml", body)
    with pytest.raises(PromptFileError, match="invalid cloud prompt registry") as err:
        load_registry(tmp_path)
    assert msg in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    write(tmp_path, "a.yaml", "name: same\ntext: one\n")
    write(tmp_path, "b.yaml", "name: same\ntext: two\n")
    write(tmp_path, "c.yaml", "name: c\ntext: x\nextra: 1\n")
    with pytest.raises(PromptFileError) as err:
        load_registry(tmp_path)
    msg = str(err.value)
    assert "b.yaml: name 'same' is already used by" in msg and "c.yaml: unknown field 'extra'" in msg


def test_empty_or_missing_registry(tmp_path):
    with pytest.raises(PromptFileError, match="has no"):
        load_registry(tmp_path)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_registry(tmp_path / "nope")
