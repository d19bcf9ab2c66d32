"""A worker's archive cache: by sha256, least recently used evicted first, bounded by a budget that can change."""

from __future__ import annotations

import hashlib

import pytest

from partita.errors import WorkerError
from partita.runtime.archives import ArchiveCache


def blob(n: int, fill: int) -> tuple[bytes, str]:
    data = bytes([fill]) * n
    return data, hashlib.sha256(data).hexdigest()


def test_archives_are_kept_by_digest_and_the_least_recently_used_goes_first():
    budget = {"bytes": 300}
    cache = ArchiveCache(lambda: budget["bytes"])
    (a, sa), (b, sb), (c, sc) = blob(100, 1), blob(100, 2), blob(100, 3)
    assert cache.put(a, sa) and cache.put(b, sb) and cache.put(c, sc)
    assert cache.get(sa) == a  # a is now the most recently used
    d, sd = blob(100, 4)
    assert cache.put(d, sd)
    assert cache.get(sb) is None and cache.digests() == [sc, sa, sd]  # b was the least recently used
    budget["bytes"] = 150  # a stage was loaded: the cache shrinks to what is left
    cache.shrink()
    assert cache.digests() == [sd] and cache.size_bytes == 100


def test_an_archive_larger_than_the_budget_is_not_kept_and_a_wrong_digest_is_refused():
    cache = ArchiveCache(lambda: 50)
    big, digest = blob(100, 7)
    assert cache.put(big, digest) is False and cache.get(digest) is None
    small, _ = blob(10, 8)
    with pytest.raises(WorkerError, match="sha256 mismatch"):
        cache.put(small, "0" * 64)
    assert cache.digests() == []
