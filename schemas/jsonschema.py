"""Export the JSON Schema files in ``schemas/json/`` that non-Python producers validate against.

``python -m schemas`` rewrites them; a unit test fails when they are out of date.
"""

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.events import ReleaseEvent
from schemas.scores import ScoreRecord

JSON_DIR = Path(__file__).parent / "json"
EXPORTED: dict[str, type[BaseModel]] = {
    "release_event.v1.json": ReleaseEvent,
    "score_record.v1.json": ScoreRecord,
}


def render(model: type[BaseModel]) -> str:
    """The schema text exactly as committed (validation mode: what a producer may send)."""
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path = JSON_DIR) -> list[Path]:
    """Write every schema file; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in EXPORTED.items():
        path = directory / name
        path.write_text(render(model))
        written.append(path)
    return written
