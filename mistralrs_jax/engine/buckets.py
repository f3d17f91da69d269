"""Shape buckets: every padded size a compiled step can see is one of a short sorted list."""
from __future__ import annotations

import bisect
from collections.abc import Sequence


def round_up_to_bucket(buckets: Sequence[int], value: int, what: str = "size") -> int:
    """The smallest bucket >= `value`; ValueError past the largest."""
    index = bisect.bisect_left(buckets, value)
    if index == len(buckets):
        raise ValueError(f"{what} {value} exceeds the largest bucket {buckets[-1]}")
    return buckets[index]
