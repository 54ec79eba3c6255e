"""Who runs in the next engine step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a row limit (`max_num_seqs`):
  1. running sequences first, decodes before unfinished prompts (a long prompt is
     prefilled a chunk per step, interleaved with everyone's next token);
  2. then waiting sequences, first come first served, each starting from the longest
     prefix of its tokens already in the prefix cache.
When the pool has no page for a running sequence, the most recently admitted running
sequence is preempted: its pages are released and it waits again at the front of the
queue, to be recomputed from its tokens (the same tokens come out: greedy rows by
definition, sampled rows because their keys depend on their seed and position only).
"""

from __future__ import annotations

import collections

from llm.serve.pages import OutOfPages, PagePool, page_keys
from llm.serve.request import Sequence, Status


class Scheduler:
  def __init__(self, pool: PagePool, max_num_batched_tokens: int, max_num_seqs: int,
               prefix_caching: bool = True):
    self.pool = pool
    self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
    self.prefix_caching = prefix_caching
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []
    self.preemptions = 0
    self._admissions = 0

  def add(self, seq: Sequence) -> None:
    self.waiting.append(seq)

  def schedule(self, lookahead=None) -> list[tuple[Sequence, int]]:
    """(sequence, tokens to run) for the next step; at most one entry per sequence.
    `lookahead(seq, budget)` (speculative decoding): how many draft tokens a decoding
    sequence carries after its pending one, at most `budget`; they count in its tokens."""
    budget = self.max_num_batched_tokens
    batch: list[tuple[Sequence, int]] = []
    for seq in sorted(self.running, key=lambda s: (s.remaining_prefill > 1, s.admitted)):
      if budget == 0:
        break
      if seq.status is not Status.RUNNING:  # preempted below, for an older one
        continue
      n = min(seq.remaining_prefill, budget)
      if lookahead is not None and seq.remaining_prefill == 1 and budget > 1:
        drafts = lookahead(seq, budget - 1)
        # drafts take free pages only: they never preempt anyone
        if self._pages_needed(seq, 1 + drafts) - self._pages_needed(seq, 1) <= self.pool.available:
          n += drafts
      if not self._grow(seq, n, batch):
        continue  # it was preempted itself
      batch.append((seq, n))
      budget -= n
    while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
      seq = self.waiting[0]
      if not seq.pages:
        self._reuse_prefix(seq)
      n = min(seq.remaining_prefill, budget)
      try:
        seq.pages += self.pool.allocate(self._pages_needed(seq, n))
      except OutOfPages:  # it waits for pages (running sequences finish or are preempted),
        self._unreuse(seq)  # holding none: waiting sequences holding cached pages could
        break  # leave nothing for anyone once the running ones are gone
      self.waiting.popleft()
      self.admit(seq)
      batch.append((seq, n))
      budget -= n
    return batch

  def admit(self, seq: Sequence) -> None:
    """Makes `seq` (holding its pages) a running sequence, the newest."""
    seq.status = Status.RUNNING
    self._admissions += 1
    seq.admitted = self._admissions
    self.running.append(seq)

  def _pages_needed(self, seq: Sequence, n: int) -> int:
    return max(-(-(seq.computed + n) // self.pool.page_size) - len(seq.pages), 0)

  def _grow(self, seq: Sequence, n: int, batch) -> bool:
    """Gives `seq` the pages its next `n` tokens need, preempting the newest running
    sequences (never one already in this step's batch) until they fit; False when `seq`
    itself had to go."""
    need = self._pages_needed(seq, n)
    while need > self.pool.available:
      scheduled = {id(s) for s, _ in batch}
      victims = [s for s in self.running if id(s) not in scheduled]
      victim = max(victims, key=lambda s: s.admitted)
      self.preempt(victim)
      if victim is seq:
        return False
    seq.pages += self.pool.allocate(need)
    return True

  def _reuse_prefix(self, seq: Sequence) -> None:
    """Starts `seq` from the cached pages of its longest cached prefix (keeping at least
    its last token to run, whose logits are needed)."""
    if not self.prefix_caching:
      return
    hits = self.pool.lookup(self._keys(seq, len(seq.tokens) // self.pool.page_size))
    if hits and len(hits) * self.pool.page_size >= len(seq.tokens):
      self.pool.release(hits[-1:])  # recomputed into a page of its own, not written shared
      hits = hits[:-1]
    seq.pages, seq.computed, seq.committed_pages = hits, len(hits) * self.pool.page_size, len(hits)
    seq.draft_computed = seq.computed  # a draft model's K/V sit in the same pages

  def _unreuse(self, seq: Sequence) -> None:
    """Lets a waiting sequence's reused prefix pages go (they stay cached)."""
    self.pool.release(seq.pages)
    seq.pages, seq.computed, seq.committed_pages, seq.draft_computed = [], 0, 0, 0

  def preempt(self, seq: Sequence) -> None:
    """Frees a running sequence's pages; it waits at the front, to be recomputed."""
    self.running.remove(seq)
    self.pool.release(seq.pages)
    seq.pages, seq.computed, seq.committed_pages, seq.draft_computed = [], 0, 0, 0
    seq.status = Status.WAITING
    self.waiting.appendleft(seq)
    self.preemptions += 1

  def commit_full_pages(self, seq: Sequence) -> None:
    """Offers the sequence's newly full pages to the prefix cache."""
    full = seq.computed // self.pool.page_size
    if not self.prefix_caching or full <= seq.committed_pages:
      return
    keys = self._keys(seq, full)
    for i in range(seq.committed_pages, full):
      seq.pages[i] = self.pool.commit(seq.pages[i], keys[i])
    seq.committed_pages = full

  def _keys(self, seq: Sequence, n_pages: int) -> list[bytes]:
    """The prefix keys of the sequence's first `n_pages` full pages, the chain extended
    from where it was left (its tokens only grow, preempted or not)."""
    n = self.pool.page_size
    have = len(seq.page_keys)
    if n_pages > have:
      # an adapter's K/V differ from the base's: its chain starts from its own root
      root = f"adapter:{seq.adapter}".encode() if seq.adapter else b""
      seq.page_keys += page_keys(seq.tokens[have * n:n_pages * n], n,
                                 seq.page_keys[-1] if have else root)
    return seq.page_keys[:n_pages]

  def finish(self, seq: Sequence, reason: str) -> None:
    """Ends a sequence wherever it is; its pages are released at once."""
    if seq.status is Status.RUNNING:
      self.running.remove(seq)
    elif seq.status is Status.WAITING and seq in self.waiting:
      self.waiting.remove(seq)
    if seq.pages:
      self.pool.release(seq.pages)
    seq.pages = []
    seq.status, seq.finish_reason = Status.FINISHED, reason
