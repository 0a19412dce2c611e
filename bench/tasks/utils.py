"""Loaders for the offline Shakespeare tasks: read the jsonl next to this file (no hub, no cwd dependence)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(task: str) -> datasets.DatasetDict:
    splits = {}
    for split in ("train", "test"):
        path = HERE / f"{task}.{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rebuild it with `python -m bench.tasks.build_local`")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def load_nextline(**kwargs) -> datasets.DatasetDict:  # lm-eval passes the task metadata as kwargs
    return _load("shakespeare_nextline")


def load_cloze(**kwargs) -> datasets.DatasetDict:
    return _load("shakespeare_cloze")


def load_order(**kwargs) -> datasets.DatasetDict:
    return _load("shakespeare_order")
