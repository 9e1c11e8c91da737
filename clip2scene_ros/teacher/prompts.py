"""Prompt-template sets as data: ``config/prompts/NAME.yaml``.

A template is a sentence with one ``{}`` where the class name goes ("a photo of a {}."). A set is
stored as YAML, either a mapping ``{name: ..., templates: [...]}`` or a bare list of strings, so
that a new set for a new domain is a file, not a code change.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import read_yaml
from ..errors import ConfigError
from ..vocabulary import config_dir

#: The set CLIP2Scene uses (80 CLIP ImageNet templates + 5 scene templates).
DEFAULT_PROMPTS = "maskclip_85"

# Any replacement field other than the bare "{}" (named, indexed or with a format spec) would
# make str.format fail or misbehave on class names, so it is refused at load.
_FIELD = re.compile(r"\{[^{}]*\}")


def prompts_dir() -> Path:
    return config_dir() / "prompts"


def builtin_prompt_names() -> list[str]:
    return sorted(p.stem for p in prompts_dir().glob("*.yaml"))


def resolve_prompts(name_or_path: str | Path) -> Path:
    """A built-in set's file, or ``name_or_path`` itself when it names a file."""
    text = str(name_or_path)
    path = Path(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or path.suffix in (".yaml", ".yml") or (
        "/" in text or "\\" in text
    )
    if path.is_file() or looks_like_path:
        if not path.is_file():
            raise ConfigError("prompts", f"prompt file {text!r} does not exist")
        return path
    builtin = prompts_dir() / f"{text}.yaml"
    if not builtin.is_file():
        raise ConfigError("prompts", f"no built-in prompt set {text!r}; shipped: "
                          f"{builtin_prompt_names()}, or give a path to a YAML file")
    return builtin


def validate_templates(templates: object, source: str | None = None) -> tuple[str, ...]:
    """Check a list of templates: non-empty strings, each with exactly one ``{}``."""
    if not isinstance(templates, list | tuple) or not templates:
        raise ConfigError("templates", "must be a non-empty list of strings", source)
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise ConfigError(f"templates[{i}]", f"must be a string, got {template!r}", source)
        fields = _FIELD.findall(template)
        if fields != ["{}"]:
            raise ConfigError(f"templates[{i}]", "must contain exactly one '{}' and no other "
                              f"braces, got {template!r}", source)
    return tuple(templates)


def load_prompts(name_or_path: str | Path = DEFAULT_PROMPTS) -> tuple[str, ...]:
    """Templates of a built-in set (``"maskclip_85"``, ``"single"``) or of a YAML file."""
    path = resolve_prompts(name_or_path)
    data = read_yaml(path)
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"name", "description", "templates"})
        if unknown:
            raise ConfigError(str(unknown[0]), "unknown key; expected name, description, "
                              "templates", str(path))
        data = data.get("templates")
    return validate_templates(data, str(path))


def prompts_name(name_or_path: str | Path) -> str:
    """The name recorded in provenance: the set's ``name`` key, else the file's stem."""
    path = resolve_prompts(name_or_path)
    data = read_yaml(path)
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return data["name"]
    return path.stem
