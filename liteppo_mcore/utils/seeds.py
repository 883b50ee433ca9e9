"""One seed from several numbers (the run's seed, the step, the rank, the epoch, ...).

Every place that derives a random stream from a tuple of such numbers calls `mix_seed`, so that no two
tuples collide (as a sum or a product of them would: (step 1, rank 0) and (step 0, rank 1)) and the
streams of neighbouring tuples are independent.
"""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2**63) from the integers `parts` (order matters), through numpy's SeedSequence: the
    same parts give the same seed on every machine and in every run."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))
