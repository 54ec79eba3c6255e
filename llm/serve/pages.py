"""KV pages: which fixed-size pages of the preallocated KV pool each sequence holds, and
which full pages are shared as a cached prefix.

The pool is `num_pages` pages of `page_size` token slots (K and V for every layer live
in device arrays indexed by page id; this module only does the bookkeeping). Page 0 is
reserved: page tables are padded with it, so a kernel may read it but nothing is ever
written there for a sequence.

Prefix caching (as vLLM does): a full page is keyed by a hash chained over the previous
page's key and its own tokens, so a key names the whole prefix up to the page's end.
Pages with the same key are shared read-only; each holder adds a reference. A cached
page whose last holder lets go stays cached, evictable: it is reused, least recently
released first, only when no free page is left. Hits and queries are counted in tokens.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable, Sequence

import numpy as np

NULL_PAGE = 0  # the padding page of every page table


class OutOfPages(RuntimeError):
  """No page is free or evictable (the scheduler preempts a sequence and tries again)."""


def page_keys(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
  """Chained keys of the full pages of `tokens` (a partial last page has none)."""
  keys = []
  for start in range(0, len(tokens) - page_size + 1, page_size):
    page = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
    parent = hashlib.blake2b(parent + page, digest_size=16).digest()
    keys.append(parent)
  return keys


class PagePool:
  """Reference-counted pages with a prefix cache (see the module docstring)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is reserved)")
    if page_size < 1:
      raise ValueError(f"page_size={page_size} must be >= 1")
    self.num_pages, self.page_size = num_pages, page_size
    self._refs = np.zeros(num_pages, np.int32)
    self._free = collections.deque(range(1, num_pages))  # never held, or released uncached
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self._page_of: dict[bytes, int] = {}  # prefix key -> cached page
    self._key_of: dict[int, bytes] = {}
    self.hit_tokens = 0
    self.queried_tokens = 0
    self.evictions = 0

  # ------------------------------------------------------------------ counts

  @property
  def available(self) -> int:
    """Pages that an allocation can take now: free ones plus evictable cached ones."""
    return len(self._free) + len(self._evictable)

  @property
  def used(self) -> int:
    """Pages held by at least one sequence."""
    return int((self._refs > 0).sum())

  @property
  def cached(self) -> int:
    return len(self._page_of)

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

  def refcount(self, page: int) -> int:
    return int(self._refs[page])

  # ------------------------------------------------------------------ holding pages

  def allocate(self, n: int = 1) -> list[int]:
    """`n` pages for one holder, fresh (uncached); evicts the least recently released
    cached pages when no free one is left. OutOfPages (taking nothing) if too few."""
    if n > self.available:
      raise OutOfPages(f"{n} page(s) wanted, {self.available} of {self.num_pages - 1} available")
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:
        page, _ = self._evictable.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        self.evictions += 1
      self._refs[page] = 1
      pages.append(page)
    return pages

  def retain(self, page: int) -> None:
    """One more holder of a page already held or cached."""
    if page == NULL_PAGE:
      raise ValueError("page 0 is reserved")
    if self._refs[page] == 0:
      if page not in self._evictable:
        raise ValueError(f"page {page} is free: allocate it instead")
      del self._evictable[page]
    self._refs[page] += 1

  def release(self, pages: Iterable[int]) -> None:
    """Each holder lets go of its pages once; a page nobody holds becomes free, or
    evictable if it is cached (most recently released last)."""
    for page in pages:
      if page == NULL_PAGE or self._refs[page] <= 0:
        raise ValueError(f"page {page} is not held")
      self._refs[page] -= 1
      if self._refs[page] == 0:
        if page in self._key_of:
          self._evictable[page] = None
        else:
          self._free.append(page)

  # ------------------------------------------------------------------ the prefix cache

  def lookup(self, keys: Sequence[bytes]) -> list[int]:
    """The cached pages of the longest prefix of `keys`, each retained for the caller;
    counts len(keys) pages queried and the hits, in tokens."""
    pages = []
    for key in keys:
      page = self._page_of.get(key)
      if page is None:
        break
      self.retain(page)
      pages.append(page)
    self.queried_tokens += len(keys) * self.page_size
    self.hit_tokens += len(pages) * self.page_size
    return pages

  def commit(self, page: int, key: bytes) -> int:
    """Offers a held page, now full, to the cache under `key`. Returns the page the
    holder should keep: `page`, or an already cached page of the same key (then `page`
    is released and that one retained, so identical prefixes share one page)."""
    if self._refs[page] <= 0:
      raise ValueError(f"page {page} is not held")
    other = self._page_of.get(key)
    if other == page:
      return page
    if other is not None:
      self.retain(other)
      self.release([page])
      return other
    if page in self._key_of:  # already cached under another prefix: leave it
      return page
    self._page_of[key] = page
    self._key_of[page] = key
    return page

  def reset_cache(self) -> int:
    """Forgets every cached prefix (new weights make them stale): unheld cached pages
    become free, held ones stay with their holders, uncached. Returns how many were
    dropped."""
    dropped = len(self._page_of)
    self._free.extend(self._evictable)
    self._evictable.clear()
    self._page_of.clear()
    self._key_of.clear()
    return dropped

  def check(self) -> None:
    """Asserts the bookkeeping is consistent (tests, and debugging)."""
    held = {p for p in range(1, self.num_pages) if self._refs[p] > 0}
    free, evictable = set(self._free), set(self._evictable)
    assert not held & free and not held & evictable and not free & evictable
    assert held | free | evictable == set(range(1, self.num_pages)), "a page is lost"
    assert evictable <= set(self._key_of) and set(self._key_of) == set(self._page_of.values())
