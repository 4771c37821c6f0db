"""Training datasets (src/datasets/parse.ts): CSV with a header (the `label` column, or the last) or JSON
lines `{"features":[...],"label":n}`, split as splitDataset splits them (Fisher-Yates from the last row down,
mulberry32 seeded with `split_seed >>> 0`). The hub checked the file on upload; this parses what it accepted."""
from __future__ import annotations

import csv
import json
import math
from typing import List, Tuple

import numpy as np

from .synthetic import Random


def parse_dataset(data: bytes, format: str) -> Tuple[np.ndarray, np.ndarray]:
    """(features [rows, columns] float32, labels [rows] float32)."""
    lines = [line for line in data.decode("utf-8").replace("\r\n", "\n").split("\n") if line.strip()]
    if format == "csv":
        header = [name.strip() for name in next(csv.reader([lines[0]]))]
        lowered = [name.lower() for name in header]
        label = lowered.index("label") if "label" in lowered else len(header) - 1
        rows = [[cell.strip() for cell in next(csv.reader([line]))] for line in lines[1:]]
        features = [[float(c) for i, c in enumerate(row) if i != label] for row in rows]
        labels = [float(row[label]) for row in rows]
    elif format == "jsonl":
        samples = [json.loads(line) for line in lines]
        features = [s["features"] for s in samples]
        labels = [s["label"] for s in samples]
    else:
        raise ValueError(f"unknown dataset format {format!r}")
    return np.asarray(features, dtype=np.float32), np.asarray(labels, dtype=np.float32)


def training_rows(rows: int, validation_fraction: float, split_seed: int) -> List[int]:
    """The row indexes of the training part, in shuffled order (the validation part is the first ones)."""
    order = list(range(rows))
    random = Random(split_seed)
    for i in range(rows - 1, 0, -1):
        j = math.floor(random.next() * (i + 1))
        order[i], order[j] = order[j], order[i]
    wanted = round_half_up(rows * validation_fraction)
    held = 0 if rows < 2 or validation_fraction == 0 else min(rows - 1, max(1, wanted))
    return order[held:]


def round_half_up(value: float) -> int:
    """JavaScript's Math.round (halves go up), not Python's round (halves go to even)."""
    return math.floor(value + 0.5)


class DatasetBatches:
    """Rows [start, end) of the training part, walked in passes reshuffled by Random(mixSeeds(split_seed, start))."""

    def __init__(self, data: bytes, spec: dict, loss: str) -> None:
        from .synthetic import mix_seeds

        features, labels = parse_dataset(data, spec["format"])
        train = training_rows(len(labels), spec["validation_fraction"], spec["split_seed"])
        self.features, self.labels = features[train], labels[train]
        start = min(spec["start"], len(train))
        count = max(1, min(spec["end"], len(train)) - start)
        self.order = list(range(start, start + count))
        self.random = Random(mix_seeds(spec["split_seed"], start))
        self.at = count
        self.loss = loss

    def next(self, size: int) -> Tuple[np.ndarray, np.ndarray]:
        picked = []
        for _ in range(size):
            if self.at >= len(self.order):
                for i in range(len(self.order) - 1, 0, -1):
                    j = math.floor(self.random.next() * (i + 1))
                    self.order[i], self.order[j] = self.order[j], self.order[i]
                self.at = 0
            picked.append(self.order[self.at])
            self.at += 1
        labels = self.labels[picked]
        return self.features[picked], labels if self.loss == "mse" else labels.astype(np.int64)
