"""Prompt K/V on the runners that do not own the streams (later pipeline stages).

Owns: `CondLRU` (the condition keys a later stage holds for one stream, most recent last; the
first stage keeps a mirror fed the same rows in the same order, so it knows without asking
which text embeddings it must send downstream) and `ConditionKV` (a later stage's prompt K/V
for its layers, projected once per condition key and shared between streams by key).
Does not own: text encoding or blends (the first stage's StreamStates), the messages.
"""

from __future__ import annotations

import torch

from streamdiff.model.causal_wan import CrossKV


class CondLRU:
    CAPACITY = 8  # > the chunks of one stream in flight (lanes x stride) for any sane setting

    def __init__(self):
        self.keys: list[tuple] = []
        self.evicted: list[tuple] = []

    def use(self, key: tuple) -> bool:
        """Mark `key` used; True if it was held already. Keys pushed out land in `evicted`."""
        self.evicted = []
        if key in self.keys:
            self.keys.remove(key)
            self.keys.append(key)
            return True
        self.keys.append(key)
        while len(self.keys) > self.CAPACITY:
            self.evicted.append(self.keys.pop(0))
        return False


class ConditionKV:
    """Per stream its recent condition keys; per key the projected K/V and a reference count."""

    def __init__(self):
        self.by_stream: dict[str, CondLRU] = {}
        self.by_key: dict[tuple, tuple[CrossKV, int]] = {}

    def get(self, model, stream_id: str, key: tuple, embs: dict[tuple, torch.Tensor], device, stage: int) -> CrossKV:
        """The prompt K/V for a row's condition `key` (rows of one stream carry the condition
        their chunk entered with, so each stream keeps its few most recent ones)."""
        lru = self.by_stream.setdefault(stream_id, CondLRU())
        if lru.use(key):
            return self.by_key[key][0]
        for old in lru.evicted:
            self._unref(old)
        entry = self.by_key.get(key)
        if entry is None:
            if key not in embs:
                raise RuntimeError(f"stage {stage}: no text embedding for condition {key!r} of stream {stream_id!r}")
            entry = (model.prompt_kv(embs[key].to(device)), 0)
        self.by_key[key] = (entry[0], entry[1] + 1)
        return entry[0]

    def release(self, stream_id: str) -> None:
        lru = self.by_stream.pop(stream_id, None)
        if lru is not None:
            for key in lru.keys:
                self._unref(key)

    def clear(self) -> None:
        self.by_stream.clear()
        self.by_key.clear()

    def _unref(self, key: tuple) -> None:
        kv, refs = self.by_key[key]
        if refs <= 1:
            del self.by_key[key]
        else:
            self.by_key[key] = (kv, refs - 1)


__all__ = ["CondLRU", "ConditionKV"]
