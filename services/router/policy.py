"""Loads route policies from a YAML file, refusing an invalid file whole with messages that name route and field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas import PolicySet
from shared.codec import problems
from shared.errors import PolicyError


def parse(text: str, source: str = "<policy>") -> PolicySet:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: expected a mapping with 'models' and 'routes', got {type(raw).__name__}")
    try:
        return PolicySet.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {problem}" for problem in problems(exc)]
        raise PolicyError("invalid policy, nothing applied:\n  " + "\n  ".join(lines)) from None


def load(path: str | Path) -> PolicySet:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    return parse(text, str(path))
