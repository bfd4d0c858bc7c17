"""DARE (Yu et al., 2024): drop each task-vector entry with probability p and rescale the rest by 1 / (1 - p),
then combine the sparse task vectors linearly (task arithmetic) or by TIES' sign election.

The drop mask is a function of (seed, model, tensor name, entry index) alone, computed by a counter-based hash:
the same seed gives the same merge on any machine, whether a tensor is merged whole or a block of rows at a time.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import Field

from regmean.methods.base import TensorInputs, TensorStep
from regmean.methods.task_arithmetic import TaskVectorMethod
from regmean.methods.ties import elect_and_average, task_vector
from regmean.recipe_model import RecipeModel

LOW32 = 0xFFFFFFFF


class DareOptions(RecipeModel):
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0)
    """p: the probability that a task-vector entry is dropped."""
    combine: Literal["linear", "ties"] = "linear"
    """linear: W_base + scaling * sum_i w_i tau_i; ties: sign election and mean of the agreeing entries."""
    scaling: float = 1.0
    seed: int = Field(0, ge=0)
    """The drop masks' seed (recorded in the model card): the same seed gives the same output."""


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow (by 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & LOW32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (xor-shift-multiply), elementwise on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, model: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys for the drop mask of one model's tensor."""
    digest = hashlib.blake2b(f"{seed}:{model}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def keep_mask(key: tuple[int, int], start: int, count: int, drop_rate: float) -> torch.Tensor:
    """Which of the entries start .. start + count - 1 (flat indices of the whole tensor) are kept: those whose
    hash, as a fraction of 2^32, is at least `drop_rate`. The index's high word and the second key are mixed into
    a salt once per 2^32 entries, so each entry costs one round of the hash."""
    threshold = math.ceil(drop_rate * 2**32)
    pieces, stop = [], start + count
    while start < stop:
        high, low = start >> 32, start & LOW32
        end = min(stop, (high + 1) << 32)
        salt = int(hash32(torch.tensor([(high & LOW32) ^ key[1]], dtype=torch.int64))[0]) ^ key[0]
        pieces.append(hash32(torch.arange(low, low + end - start, dtype=torch.int64) ^ salt) >= threshold)
        start = end
    return pieces[0] if len(pieces) == 1 else torch.cat([torch.zeros(0, dtype=torch.bool), *pieces])


MASK_CHUNK = 1 << 20
"""Entries hashed at a time: the int64 temporaries of the hash (about 50 bytes per entry) stay small."""


def drop_and_rescale(task_vector: torch.Tensor, key: tuple[int, int], start: int, drop_rate: float) -> torch.Tensor:
    """The task vector with the dropped entries zeroed and the kept ones divided by 1 - drop_rate."""
    flat = (task_vector / (1.0 - drop_rate)).reshape(-1)
    for first in range(0, flat.numel(), MASK_CHUNK):
        piece = flat[first : first + MASK_CHUNK]
        piece.masked_fill_(~keep_mask(key, start + first, piece.numel(), drop_rate), 0.0)
    return flat.reshape(task_vector.shape)


class Dare(TaskVectorMethod):
    name = "dare"
    title = "DARE"
    citations = (
        "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
        "ICML 2024 (arXiv:2311.03099).",
    )
    options = DareOptions
    per_model_options = frozenset({"drop_rate"})

    def merge_task_vectors(self, step: TensorStep, data: TensorInputs) -> torch.Tensor:
        opts = self.settings
        shape = self.inputs.models[0].shapes[step.key]
        start = 0 if step.rows is None else step.rows[0] * math.prod(shape[1:])
        sparse = [
            drop_and_rescale(task_vector(t, data.base), stream_key(opts.seed, k, step.key), start, own.drop_rate)
            for k, (t, own) in enumerate(zip(data.tensors, self.model_settings, strict=True))
        ]
        if opts.combine == "ties":
            merged = elect_and_average(sparse, self.weights)
        else:
            w = self.weights.to(torch.float64).tolist()
            merged = sum(wi * tv for wi, tv in zip(w, sparse, strict=True))
        return data.base.to(merged.dtype) + opts.scaling * merged
