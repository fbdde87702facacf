"""JSON Schemas of the contracts, for integrators who don't use Python.

    python -m protocols.schemas docs/schemas     # regenerate (a test checks they are current)
"""

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from protocols.bundle import Manifest
from protocols.messages import ErrorReport, FrameHeader, Result, Status

CONTRACTS: dict[str, type[BaseModel]] = {
    "bundle-manifest": Manifest,
    "frame-header": FrameHeader,
    "result": Result,
    "status": Status,
    "error": ErrorReport,
}


def schema_text(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(mode="validation"), indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in CONTRACTS.items():
        path = folder / f"{name}.schema.json"
        path.write_text(schema_text(model))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(written_path)
