"""Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011), written in
tensor operations: a counter-based generator, a pure function of (counter, key), so the same integers come out
on every device, for every batch and every number of ranks, with no generator state and no host involved.

Integers are held as int64 tensors with values in [0, 2³²); the 32 x 32 → 64-bit products are taken in 16-bit
halves so that nothing overflows int64.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

MASK = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the Weyl key increments
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a·b, a a 32-bit constant, b int64 in [0, 2³²)."""
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    low = al * bl
    mid = ah * bl + al * bh
    lo_sum = low + ((mid & 0xFFFF) << 16)
    return (ah * bh + (mid >> 16) + (lo_sum >> 32)) & MASK, lo_sum & MASK


def philox4x32(counter: torch.Tensor, key: torch.Tensor | tuple[int, int], rounds: int = ROUNDS) -> torch.Tensor:
    """Philox-4x32 of counters (..., 4) under keys (..., 2) (broadcast; or one key as two Python ints, which the
    kernels take as arguments), int64 words in [0, 2³²) → (..., 4)."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1) if isinstance(key, torch.Tensor) else key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK, (k1 + PHILOX_W[1]) & MASK
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), -1)


def stream_key(*parts: Any) -> tuple[int, int]:
    """A 64-bit key (two 32-bit words) from a stable hash of JSON-able parts: the evaluation seed, the image's
    index in its dataset and a salt (the perturbation, ε, a restart's number)."""
    digest = hashlib.sha256(json.dumps(list(parts), default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def index_vector(indices: list[int], device: torch.device | str) -> torch.Tensor:
    """Dataset indices as an int64 tensor on ``device``: made there (``arange``) when they run in order, as the
    evaluation's batches do, so that nothing is copied from the host; copied otherwise."""
    first = indices[0] if indices else 0
    if list(indices) == list(range(first, first + len(indices))):
        return torch.arange(first, first + len(indices), dtype=torch.int64, device=device)
    return torch.as_tensor(indices, dtype=torch.int64, device=device)


def image_keys(seed: int, indices: list[int], device: torch.device | str, *salt: Any) -> torch.Tensor:
    """(B, 2) keys of the images' streams: Philox of the counter (index, 0, 0, 0) under the key of (seed, salt).
    An image's stream depends on the evaluation seed, the salt and its index in the dataset only, so its numbers
    do not depend on the batch it is in, the number of ranks or the device."""
    counter = torch.zeros(len(indices), 4, dtype=torch.int64, device=device)
    counter[:, 0] = index_vector(indices, device)
    return philox4x32(counter, stream_key(seed, *salt))[:, :2]


def random_words(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) int64 words in [0, 2³²): stream b under key ``keys[b]`` (B, 2), its counters 0, 1, 2, … (four words
    each), on ``keys``' device."""
    blocks = (n + 3) // 4
    counter = torch.zeros(blocks, 4, dtype=torch.int64, device=keys.device)
    counter[:, 0] = torch.arange(blocks, device=keys.device)
    words = philox4x32(counter.unsqueeze(0), keys.unsqueeze(1))  # (B, blocks, 4)
    return words.flatten(1)[:, :n]


def uniform(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) from the top 24 bits of each word (exact in float32: k / 2²⁴)."""
    return (words >> 8).to(dtype) * (1.0 / (1 << 24))


def normal(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers by Box–Muller, one from each word and its partner in the same 4-word block
    (words 0 and 1, 2 and 3 of a block give the cosine and the sine branch): r = √(−2 ln u₁), u₁ ∈ (0, 1].
    log and cos may round differently in the last bit on another device."""
    n = words.shape[-1]
    pad = (-n) % 2
    if pad:
        words = torch.cat([words, words[..., -1:]], -1)
    u1 = ((words[..., 0::2] >> 8).to(torch.float64) + 1.0) * (1.0 / (1 << 24))  # (0, 1]
    u2 = (words[..., 1::2] >> 8).to(torch.float64) * (1.0 / (1 << 24))
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).flatten(-2)
    return z[..., :n].to(dtype)
