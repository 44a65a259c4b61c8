"""Which window fills row r of step s: pure functions of (seed, s, r), computed per index.

`permute(i, n, key)` is a keyed pseudo-random permutation of range(n) evaluated at i (a Feistel network
over the next power of four, cycle-walked back into range), so an epoch visits every window once in a
shuffled order without ever holding the order in memory. `Mixture` decides which source each row of a
global batch reads, exactly in proportion to the weights over every block of steps.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _round_keys(key) -> np.ndarray:
    return np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << shift) | right


def permute(index, n: int, key) -> np.ndarray:
    """The image of `index` (int or int array, each in [0, n)) under the permutation of range(n) keyed by
    `key` (a tuple of non-negative ints)."""
    if n <= 0:
        raise ValueError(f"cannot permute an empty range (n={n})")
    idx = np.asarray(index, dtype=np.uint64)
    if n == 1:
        return np.zeros(idx.shape, np.int64)
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    keys = _round_keys(key)
    with np.errstate(over="ignore"):
        out = _feistel(idx.reshape(-1), half_bits, keys)
        outside = out >= np.uint64(n)
        while outside.any():        # cycle-walk: the domain is < 4n, so a few rounds at most on average
            out[outside] = _feistel(out[outside], half_bits, keys)
            outside = out >= np.uint64(n)
    return out.astype(np.int64).reshape(idx.shape)


def apportion(weights, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each within 1 of weight * total (largest remainders)."""
    w = np.asarray(weights, np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def exact_block_steps(weights, global_batch: int, limit: int = 1000) -> int:
    """The fewest steps over which every weight times the rows is a whole number (up to `limit`; at the
    limit the counts are apportioned, within one row of exact)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    for steps in range(1, limit + 1):
        rows = w * steps * global_batch
        if np.allclose(rows, np.round(rows), atol=1e-9, rtol=0):
            return steps
    return limit


class Mixture:
    """Row r of step s -> (source, that source's sample number). Blocks of `block_steps` steps hold exactly
    `counts[k]` rows of source k; the rows of a block are shuffled by a keyed permutation, and a source's
    sample numbers run on from block to block, so each source keeps its own epoch."""

    def __init__(self, weights, global_batch: int, seed: int, block_steps: int = 0):
        self.global_batch, self.seed = global_batch, seed
        self.block_steps = block_steps or exact_block_steps(weights, global_batch)
        self.block_rows = self.block_steps * global_batch
        self.counts = apportion(weights, self.block_rows)
        self._cached = (-1, None, None)

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each row of block b, its sample number within the block for its source)."""
        if self._cached[0] != b:
            sources = np.repeat(np.arange(len(self.counts)), self.counts)
            sources = sources[permute(np.arange(self.block_rows), self.block_rows, (self.seed, 2, b))]
            rank = np.zeros(self.block_rows, np.int64)
            for k in range(len(self.counts)):
                mine = sources == k
                rank[mine] = np.arange(int(mine.sum()))
            self._cached = (b, sources, rank)
        return self._cached[1], self._cached[2]

    def rows(self, step: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number in that source) of the given rows of step `step`."""
        g = step * self.global_batch + np.asarray(rows, np.int64)
        blocks, within = np.divmod(g, self.block_rows)
        source = np.empty(len(g), np.int64)
        sample = np.empty(len(g), np.int64)
        for b in np.unique(blocks):
            sel = blocks == b
            src, rank = self._block(int(b))
            source[sel] = src[within[sel]]
            sample[sel] = int(b) * self.counts[source[sel]] + rank[within[sel]]
        return source, sample

    def samples_before(self, step: int) -> np.ndarray:
        """Samples each source has served in steps [0, step)."""
        full, part = divmod(step * self.global_batch, self.block_rows)
        src, _ = self._block(full)
        return full * self.counts + np.bincount(src[:part], minlength=len(self.counts))
