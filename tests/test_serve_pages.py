"""KV page bookkeeping (llm.serve.pages): chained prefix keys, sharing, LRU eviction, and
no page lost or leaked over a random workload."""

import random

import pytest

from llm.serve.pages import NULL_PAGE, OutOfPages, PagePool, page_keys


def test_keys_name_the_whole_prefix():
  a = page_keys([1, 2, 3, 4, 5, 6, 7], 2)
  assert len(a) == 3  # the partial last page has no key
  assert page_keys([1, 2, 3, 4], 2) == a[:2]
  b = page_keys([9, 2, 3, 4], 2)
  assert b[0] != a[0] and b[1] != a[1]  # same tokens in page 1, another prefix


def test_shared_prefix_pages_and_lru_eviction():
  pool = PagePool(num_pages=5, page_size=2)
  keys = page_keys([1, 2, 3, 4], 2)
  first = pool.allocate(2)
  assert NULL_PAGE not in first
  assert [pool.commit(p, k) for p, k in zip(first, keys)] == first
  assert pool.lookup(keys) == first  # a second holder shares both pages
  assert pool.hit_rate == 1.0 and [pool.refcount(p) for p in first] == [2, 2]
  pool.release(first)
  pool.release(first)  # both holders done: the pages stay cached, evictable
  assert pool.used == 0 and pool.available == 4 and pool.cached == 2
  other = pool.allocate(2)  # the free pages go first
  assert not set(other) & set(first) and pool.cached == 2
  pool.release(pool.lookup(keys[:1]))  # page of keys[0] released last: most recent
  taken = pool.allocate(1)  # evicts the least recently released: keys[1]'s page
  assert taken == [first[1]] and pool.evictions == 1
  assert pool.lookup(keys) == [first[0]]  # keys[1] is no longer cached
  assert pool.queried_tokens == 4 + 2 + 4 and pool.hit_tokens == 4 + 2 + 2
  with pytest.raises(OutOfPages, match="1 page"):
    pool.allocate(1)
  pool.check()


def test_committing_a_duplicate_keeps_the_cached_page():
  pool = PagePool(num_pages=4, page_size=2)
  (key,) = page_keys([5, 6], 2)
  a, b = pool.allocate(2)
  assert pool.commit(a, key) == a
  assert pool.commit(b, key) == a  # b is freed, a shared
  assert pool.refcount(a) == 2 and pool.refcount(b) == 0 and pool.available == 2
  pool.check()


def test_reset_cache_frees_unheld_pages_and_keeps_held_ones():
  pool = PagePool(num_pages=4, page_size=2)
  keys = page_keys([1, 2, 3, 4], 2)
  held, loose = pool.allocate(2)
  pool.commit(held, keys[0])
  pool.commit(loose, keys[1])
  pool.release([loose])  # cached, evictable
  assert pool.reset_cache() == 2
  assert pool.cached == 0 and pool.lookup(keys) == [] and pool.refcount(held) == 1
  pool.release([held])  # uncached now: straight back to free
  assert pool.available == 3
  pool.check()


def test_random_workload_loses_and_leaks_no_page():
  rng = random.Random(0)
  pool = PagePool(num_pages=24, page_size=4)
  system = [rng.randrange(100) for _ in range(9)]  # a shared prompt prefix
  running: dict[int, list[int]] = {}
  for step in range(400):
    if running and (rng.random() < 0.4 or pool.available < 6):
      pool.release(running.pop(rng.choice(list(running))))
    else:
      tokens = (system if rng.random() < 0.6 else []) + [
          rng.randrange(100) for _ in range(rng.randrange(1, 14))]
      keys = page_keys(tokens, pool.page_size)
      pages = pool.lookup(keys)
      try:
        pages += pool.allocate(-(-len(tokens) // pool.page_size) - len(pages))
      except OutOfPages:
        pool.release(pages)
        continue
      # full pages are offered to the cache (those found there already are kept as is)
      pages = [pool.commit(p, k) for p, k in zip(pages, keys)] + pages[len(keys):]
      running[step] = pages
    pool.check()
  for pages in running.values():
    pool.release(pages)
  pool.check()
  assert pool.used == 0 and pool.available == pool.num_pages - 1  # free or evictable
  assert pool.hit_tokens > 0
