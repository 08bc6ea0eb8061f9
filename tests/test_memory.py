"""demo.memory: the glibc arena cap and periodic trim of a long-running app."""

from __future__ import annotations

from demo.memory import MemoryKeeper, _libc


def test_trims_every_nth_call_where_glibc_is():
    keeper = MemoryKeeper(every=3)
    trimmed = [keeper.tick() for _ in range(7)]
    if _libc() is None:
        assert trimmed == [False] * 7  # no glibc: nothing to do
    else:
        assert trimmed == [False, False, True, False, False, True, False]
