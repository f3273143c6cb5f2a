"""The numpy key index and string interner against plain dicts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import features.interning as interning
from features.interning import StringInterner, hash_strings
from features.keyindex import KeyIndex


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), key_range=st.integers(1, 5_000))
def test_key_index_matches_a_dict(seed, key_range):
    rng = np.random.default_rng(seed)
    index, ref, n = KeyIndex(), {}, 0
    for step in range(40):
        keys = np.unique(rng.integers(-key_range, key_range, int(rng.integers(0, 300))))
        rows = index.lookup(keys)
        assert rows.tolist() == [ref.get(k, -1) for k in keys.tolist()]
        new = keys[rows < 0]
        perm = rng.permutation(len(new))  # inserts need not be sorted
        index.insert(new[perm], np.arange(n, n + len(new))[perm])
        ref.update({k: n + j for j, k in enumerate(new.tolist())})
        n += len(new)
        if step % 10 == 9 and ref:  # evict a third, renumber the rest
            live = sorted(ref.values())
            keep = np.array([r for r in live if rng.random() > 0.33], dtype=np.int64)
            old_to_new = np.full(n, -1, np.int64)
            old_to_new[keep] = np.arange(len(keep))
            index.remap(old_to_new)
            ref = {k: int(old_to_new[r]) for k, r in ref.items() if old_to_new[r] >= 0}
            n = len(keep)
    assert len(index) == len(ref)


def test_key_index_insert_takes_keys_in_any_order():
    index = KeyIndex()
    index.insert(np.array([30, 10, 20]), np.array([0, 1, 2]))
    assert index.lookup(np.array([10, 20, 30, 40])).tolist() == [1, 2, 0, -1]


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.text(max_size=70), max_size=30), max_size=8))
def test_interner_codes_are_first_seen_and_stable(batches):
    interner, ref = StringInterner(), {}
    for words in batches:
        codes = interner.intern(np.asarray(words, dtype=object))
        for w in words:
            ref.setdefault(w, len(ref))
        assert codes.tolist() == [ref[w] for w in words]
    assert interner.values.tolist() == list(ref)
    blob, offsets = interner.utf8()
    assert [bytes(blob[a:b]).decode("utf-8", "surrogatepass") for a, b in
            zip(offsets[:-1].tolist(), offsets[1:].tolist())] == list(ref)
    resumed = StringInterner(list(ref))
    assert resumed.intern(np.asarray(list(ref), dtype=object)).tolist() == list(range(len(ref)))


def test_interner_survives_hash_collisions(monkeypatch):
    monkeypatch.setattr(interning, "hash_strings", lambda v: np.zeros(len(v), np.uint64))
    interner = StringInterner()
    assert interner.intern(np.array(["a", "b", "a"], dtype=object)).tolist() == [0, 1, 0]
    assert interner.intern(np.array(["c", "b"], dtype=object)).tolist() == [2, 1]


def test_hash_is_the_same_on_the_ascii_and_general_paths():
    words = ["", "a", "a\x00", "a\x00\x00", "x" * 64, "user_12345", "zz"]
    fast = hash_strings(np.asarray(words, dtype=object))
    general = hash_strings(np.asarray(["é", *words], dtype=object))[1:]
    assert fast.tolist() == general.tolist()
    assert len(set(fast.tolist())) == len(words)
