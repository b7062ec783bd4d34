"""Writing a benchmark's results: one JSON file, its folder made if needed."""

import json
from pathlib import Path


def write_json(path: str | Path, result) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
