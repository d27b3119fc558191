"""Token-sequence arithmetic both prefix caches share: the longest common prefix of two
sequences, and how many distinct prefixes a set of sequences holds (the nodes of a trie).

Why its own module: the snapshot store, the block store and the replay tooling all compare token
sequences, and none of them should import another's cache to do it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def unique_in_trie(sequences: Sequence[np.ndarray]) -> int:
    """Nodes of a trie holding `sequences`: total length less the prefixes neighbours share."""
    if len(sequences) < 2:
        return sum(len(s) for s in sequences)
    ordered = sorted(tuple(int(t) for t in s) for s in sequences)
    total = len(ordered[0])
    for prev, s in zip(ordered, ordered[1:]):
        shared = common_prefix_len(np.asarray(prev), np.asarray(s))
        total += len(s) - shared
    return total
