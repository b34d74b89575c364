"""The cloud prompt registry on disk: one small YAML file per cloud prompt (configs/cloud_prompts/).

    name: travel-agent          # the id clients send: kv_transfer_params={"cloud_prompt": NAME}
    system: |                   # a chat system message (use with /v1/chat/completions) ...
      You are a travel agent ...
    # text: "..."               # ... or a plain text prefix (use with /v1/completions)
    pinned: true                # optional (default false): never evicted from the cloud's KV store
    description: "..."          # optional, for people

Exactly one of `system` and `text`. Every problem of every file is reported at once, each naming
its file and field, before anything is started.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

from edgeprompt_vllm.prompts import check_prompt_id

KINDS = ("system", "text")
_KEYS = {"name", "system", "text", "pinned", "description"}


class PromptFileError(ValueError):
    """One or more registry files are invalid; the message lists every problem."""


@dataclass(frozen=True)
class PromptSpec:
    name: str
    kind: str  # "system": a chat system message; "text": a plain text prefix
    content: str
    pinned: bool = False
    description: str = ""
    path: str = ""

    def register(self, actor, prefill: bool = True):
        """-> the ObjectRef of the actor's registration (and, with `prefill`, its prefill)."""
        if self.kind == "system":
            return actor.register_chat_system.remote(self.name, self.content, pinned=self.pinned,
                                                     prefill=prefill)
        return actor.register_prompt.remote(self.name, text=self.content, pinned=self.pinned,
                                            prefill=prefill)


def _check(raw, path: str) -> tuple[PromptSpec | None, list[str]]:
    errors: list[str] = []
    if not isinstance(raw, dict):
        return None, [f"{path}: expected a mapping with 'name' and 'system' or 'text', "
                      f"got {type(raw).__name__}"]
    for key in sorted(set(map(str, raw)) - _KEYS):
        errors.append(f"{path}: unknown field {key!r} (allowed: {', '.join(sorted(_KEYS))})")
    name = raw.get("name")
    if name is None:
        errors.append(f"{path}: field 'name' is missing")
    else:
        try:
            check_prompt_id(name)
        except ValueError:
            errors.append(f"{path}: field 'name': {name!r} is not a valid name (1 to 128 of "
                          "letters, digits and _.:-, starting with a letter or digit)")
    given = [k for k in KINDS if raw.get(k) is not None]
    if len(given) != 1:
        errors.append(f"{path}: give exactly one of 'system' (a chat system message) and 'text' "
                      f"(a plain text prefix); found {' and '.join(given) or 'neither'}")
    for k in given:
        if not isinstance(raw[k], str):
            errors.append(f"{path}: field {k!r} must be a string, not {type(raw[k]).__name__}")
        elif not raw[k].strip():
            errors.append(f"{path}: field {k!r} is empty")
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        errors.append(f"{path}: field 'pinned' must be true or false, not {pinned!r}")
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        errors.append(f"{path}: field 'description' must be a string")
    if errors:
        return None, errors
    kind = given[0]
    return PromptSpec(name, kind, raw[kind], pinned, desc, path), []


def load_prompt_file(path: str | Path) -> PromptSpec:
    specs = load_prompt_files([path])
    return specs[0]


def load_prompt_files(paths) -> list[PromptSpec]:
    specs, errors, seen = [], [], {}
    for p in map(Path, paths):
        try:
            raw = yaml.safe_load(p.read_text())
        except OSError as e:
            errors.append(f"{p}: cannot read: {e.strerror or e}")
            continue
        except yaml.YAMLError as e:
            errors.append(f"{p}: not valid YAML: {str(e).splitlines()[0]}")
            continue
        spec, errs = _check(raw, str(p))
        errors += errs
        if spec is None:
            continue
        if spec.name in seen:
            errors.append(f"{p}: name {spec.name!r} is already used by {seen[spec.name]}")
            continue
        seen[spec.name] = str(p)
        specs.append(spec)
    if errors:
        raise PromptFileError("invalid cloud prompt registry:\n  " + "\n  ".join(errors))
    return specs


def load_registry(path: str | Path) -> list[PromptSpec]:
    """A directory of *.yaml / *.yml files (sorted by name), or one file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PromptFileError(f"invalid cloud prompt registry: {path} has no *.yaml files")
        return load_prompt_files(files)
    if not path.exists():
        raise PromptFileError(f"invalid cloud prompt registry: {path} does not exist")
    return load_prompt_files([path])


def default_registry_dir() -> Path:
    """configs/cloud_prompts/ as installed (edgeprompt_vllm.configs)."""
    from importlib import resources

    return Path(str(resources.files("edgeprompt_vllm.configs") / "cloud_prompts"))
