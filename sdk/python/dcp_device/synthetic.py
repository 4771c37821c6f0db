"""The seeded synthetic task of src/sdk/trainer/synthetic.ts and random.ts, reproduced exactly (the server
validates rounds on samples of the same task): mulberry32, Box-Muller, mixSeeds, float32 where Node stores
Float32Array."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import numpy as np

_M32 = 0xFFFFFFFF
SALT_CENTERS, SALT_STREAMS, SALT_VALIDATION = 0x43454E54, 0x5354524D, 0x56414C49


def _imul(a: int, b: int) -> int:
    return (a * b) & _M32


class Random:
    """mulberry32 on uint32 (JavaScript's int32 ops agree modulo 2^32)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _M32
        self.spare = math.nan

    def next(self) -> float:
        self.state = (self.state + 0x6D2B79F5) & _M32
        t = self.state
        t = _imul(t ^ (t >> 15), t | 1)
        t ^= (t + _imul(t ^ (t >> 7), t | 61)) & _M32
        return ((t ^ (t >> 14)) & _M32) / 4294967296

    def int(self, n: int) -> int:
        return math.floor(self.next() * n)

    def normal(self) -> float:
        if not math.isnan(self.spare):
            spare, self.spare = self.spare, math.nan
            return spare
        radius = math.sqrt(-2 * math.log(1 - self.next()))
        angle = 2 * math.pi * self.next()
        self.spare = radius * math.sin(angle)
        return radius * math.cos(angle)


def mix_seeds(*seeds: int) -> int:
    h = 0x811C9DC5
    for seed in seeds:
        if not isinstance(seed, int) or abs(seed) > 2**53 - 1:
            raise ValueError(f"a seed must be a safe integer, got {seed}")
        for word in (seed & _M32, (seed >> 32) & _M32):
            h = _imul(h ^ word, 0x9E3779B1)
            h ^= h >> 16
    h = _imul(h ^ (h >> 16), 0x85EBCA6B)
    h = _imul(h ^ (h >> 13), 0xC2B2AE35)
    return (h ^ (h >> 16)) & _M32


Sample = Tuple[np.ndarray, np.ndarray]
Draw = Callable[[int, Random], Sample]
_f32 = np.float32


class SyntheticTask:
    """`sample(count, stream_seed)`: x [count, inputs] float32, and labels: class indices (int64) for
    classification, targets [count, outputs] float32 for regression."""

    def __init__(self, inputs: int, outputs: int, seed: int, kind: str, clusters_per_class: int = 1, separation: float = 4) -> None:
        if inputs < 1 or outputs < 1:
            raise ValueError(f"a synthetic task needs positive input and output sizes, got {inputs} and {outputs}")
        if kind == "classification" and outputs < 2:
            raise ValueError("a classification task needs 2 classes or more")
        self.kind, self.inputs, self.outputs, self.seed = kind, inputs, outputs, seed
        self._draw = _clusters(inputs, outputs, clusters_per_class, seed, separation) if kind == "classification" else _linear_map(inputs, outputs, seed)

    def sample(self, count: int, stream_seed: int) -> Sample:
        return self._draw(count, Random(mix_seeds(self.seed, SALT_STREAMS, stream_seed)))

    def validation_set(self, count: int) -> Sample:
        return self._draw(count, Random(mix_seeds(self.seed, SALT_VALIDATION)))


def _clusters(inputs: int, classes: int, modes: int, seed: int, separation: float) -> Draw:
    centers = _class_centers(inputs, classes * modes, separation, Random(mix_seeds(seed, SALT_CENTERS)))

    def draw(count: int, random: Random) -> Sample:
        x = np.empty((count, inputs), dtype=np.float32)
        labels = np.empty(count, dtype=np.int64)
        for i in range(count):
            label = random.int(classes)
            labels[i] = label
            c = label * modes + (random.int(modes) if modes > 1 else 0)
            for j in range(inputs):
                x[i, j] = float(centers[c, j]) + random.normal()
        return x, labels

    return draw


def _class_centers(inputs: int, classes: int, separation: float, random: Random) -> np.ndarray:
    spread = (1.5 * separation) / math.sqrt(2 * inputs)
    attempt = 1
    while True:
        centers = np.array([spread * random.normal() for _ in range(classes * inputs)], dtype=np.float32).reshape(classes, inputs)
        if _min_distance(centers) >= separation:
            return centers
        if attempt % 10 == 0:
            spread *= 1.25
        attempt += 1


def _min_distance(centers: np.ndarray) -> float:
    values = centers.astype(np.float64)
    best = math.inf
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            best = min(best, math.sqrt(sum((values[a, j] - values[b, j]) ** 2 for j in range(values.shape[1]))))
    return best


def _linear_map(inputs: int, outputs: int, seed: int) -> Draw:
    random = Random(mix_seeds(seed, SALT_CENTERS))
    weights = np.array([random.normal() / math.sqrt(inputs) for _ in range(inputs * outputs)], dtype=np.float32).astype(np.float64).reshape(inputs, outputs)
    bias = np.array([0.5 * random.normal() for _ in range(outputs)], dtype=np.float32).astype(np.float64)

    def draw(count: int, random: Random) -> Sample:
        x = np.array([random.normal() for _ in range(count * inputs)], dtype=np.float32).reshape(count, inputs)
        xd = x.astype(np.float64)
        targets = np.empty((count, outputs), dtype=np.float32)
        for i in range(count):
            for k in range(outputs):
                total = float(bias[k])
                for j in range(inputs):
                    total += float(xd[i, j]) * float(weights[j, k])
                targets[i, k] = total
        return x, targets

    return draw
