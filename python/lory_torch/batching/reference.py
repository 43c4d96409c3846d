"""The traversal written plainly in Python: the yardstick of the tests and the baseline of the
benchmark for torch.ops.lory.similarity_order (no near-duplicate removal, no short-chain merging)."""
from __future__ import annotations

import numpy as np


def similarity_order(ids, sims, max_chain_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy max-similarity walk over a kNN graph: start at the unvisited doc of minimum degree
    (out + in edges; ties to the lower id), step to the unvisited neighbour of highest similarity
    (ties to the lower id), jump to the next start when stuck or when the chain holds max_chain_len
    docs. Returns (order, chain_offsets)."""
    ids_l, sims_l = np.asarray(ids).tolist(), np.asarray(sims).tolist()
    n = len(ids_l)
    deg = [0] * n
    for r in range(n):
        for t in ids_l[r]:
            if t < 0:
                break
            deg[r] += 1
            deg[t] += 1
    seen = [False] * n
    order, chains = [], [0]
    for s in sorted(range(n), key=lambda d: (deg[d], d)):
        if seen[s]:
            continue
        c, length = s, 1
        seen[c] = True
        order.append(c)
        while not max_chain_len or length < max_chain_len:
            best, bs = -1, None
            for t, v in zip(ids_l[c], sims_l[c]):
                if t < 0:
                    break
                if not seen[t] and (best < 0 or v > bs or (v == bs and t < best)):
                    best, bs = t, v
            if best < 0:
                break
            c = best
            seen[c] = True
            order.append(c)
            length += 1
        chains.append(len(order))
    return np.array(order, dtype=np.int64), np.array(chains, dtype=np.int64)
