"""`rag_mm.doc_encoder.encode_by_key`, the per-key cache behind `DocumentEncoder.encode_keys`
and `Rescorer.documents`: -1 gives zeros, a repeated key the same row, each distinct key is
computed once and encoded once per call, and the cache is emptied past its size.

Run: `.venv/bin/python -m pytest tests/test_encode_by_key.py -q`      (well under a second)
"""

import numpy as np
import torch

from rag_mm.doc_encoder import encode_by_key

DIM = 3


class Recorder:
    """Items are the keys themselves; a row is (key, key + 0.5, key + 0.25), never zero."""

    def __init__(self) -> None:
        self.computed: list[list[int]] = []
        self.encoded: list[list[int]] = []

    def compute(self, keys: list[int]) -> list[int]:
        self.computed.append(list(keys))
        return list(keys)

    def encode(self, items: list[int]) -> torch.Tensor:
        self.encoded.append(list(items))
        return torch.tensor(items, dtype=torch.float32)[:, None] + torch.tensor([0.0, 0.5, 0.25])


def test_minus_one_gives_zeros_and_a_repeated_key_the_same_row():
    calls, cache = Recorder(), {}
    keys = np.array([[3, -1, 3], [8, -1, 1]])
    out = encode_by_key(keys, torch.zeros(1, dtype=torch.float32), cache, 100, calls.compute,
                        calls.encode)
    assert out.shape == (2, 3, DIM) and out.dtype == torch.float32
    assert torch.equal(out[:, 1], torch.zeros(2, DIM))  # -1: exactly zero
    assert torch.equal(out[0, 0], out[0, 2])
    assert torch.equal(out[0, 0], torch.tensor([3, 3.5, 3.25]))
    assert torch.equal(out[1, 0], torch.tensor([8, 8.5, 8.25]))
    assert torch.equal(out[1, 2], torch.tensor([1, 1.5, 1.25]))
    # each distinct key once, ascending (-1 is looked up as key 0, then zeroed)
    assert calls.computed == [[0, 1, 3, 8]] and calls.encoded == [[0, 1, 3, 8]]
    assert sorted(cache) == [0, 1, 3, 8]


def test_cached_keys_are_not_computed_again_and_the_cache_is_emptied_past_its_size():
    calls, cache = Recorder(), {}
    like = torch.zeros(1)
    encode_by_key(np.array([1, 2]), like, cache, 4, calls.compute, calls.encode)
    encode_by_key(np.array([2, 1, 3]), like, cache, 4, calls.compute, calls.encode)
    assert calls.computed == [[1, 2], [3]] and calls.encoded[-1] == [1, 2, 3]
    assert sorted(cache) == [1, 2, 3]
    out = encode_by_key(np.array([5, 6]), like, cache, 4, calls.compute, calls.encode)  # 3 + 2 > 4
    assert sorted(cache) == [5, 6] and calls.computed[-1] == [5, 6]
    assert torch.equal(out[:, 0], torch.tensor([5.0, 6.0]))


def test_a_call_that_empties_the_cache_computes_its_cached_keys_again():
    """Keys 1 and 2 cached, then a call of 2, 3, 4, 5 (2 + 3 new > 4): the cache is emptied, so
    2 is computed again with the new ones (it was looked up after the emptying: KeyError)."""
    calls, cache = Recorder(), {}
    like = torch.zeros(1)
    encode_by_key(np.array([1, 2]), like, cache, 4, calls.compute, calls.encode)
    out = encode_by_key(np.array([5, 2, 3, 4]), like, cache, 4, calls.compute, calls.encode)
    assert calls.computed == [[1, 2], [2, 3, 4, 5]] and sorted(cache) == [2, 3, 4, 5]
    assert torch.equal(out[:, 0], torch.tensor([5.0, 2.0, 3.0, 4.0]))
