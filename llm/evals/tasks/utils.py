"""The shipped tasks' data: the JSONL beside this file, read without the datasets hub (lm-eval's custom_dataset)."""

import json
from pathlib import Path


def load(file: str, **_):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / file).read_text().splitlines()]
    return {"test": datasets.Dataset.from_list(rows)}
