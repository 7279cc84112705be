"""Writes the JSON Schema files under schemas/json from the pydantic models: `python -m schemas.export`."""

from __future__ import annotations

import json
from pathlib import Path

from schemas import EXPORTED

JSON_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    """File name → the exact text that file must hold."""
    return {
        f"{model.__name__}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for model in EXPORTED
    }


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (JSON_DIR / name).write_text(text)
        print(f"wrote {JSON_DIR / name}")


if __name__ == "__main__":
    main()
