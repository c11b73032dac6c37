"""Packing: exact rows on a hand-built example, nothing lost, no target across documents, exact resume."""

import json

import grain
import numpy as np
import pytest

from minimax_jax.data.packing import PackedIterDataset


def _packed(documents, seq_len):
    source = grain.MapDataset.source([np.asarray(d, dtype=np.int32) for d in documents])
    return PackedIterDataset(source.to_iter_dataset(grain.ReadOptions(num_threads=0)), seq_len=seq_len)


def test_hand_built_rows():
    rows = list(_packed([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]], seq_len=4))
    assert len(rows) == 2
    first, second = rows
    np.testing.assert_array_equal(first["inputs"], [10, 11, 20, 30])
    np.testing.assert_array_equal(first["targets"], [11, 12, 21, 31])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 2, 3])
    np.testing.assert_array_equal(first["positions"], [0, 1, 0, 0])
    np.testing.assert_array_equal(first["loss_mask"], [1, 1, 1, 1])
    # The third document continues as a new segment with positions from 0; the single-token one has no pair.
    np.testing.assert_array_equal(second["inputs"], [31, 32, 33, 0])
    np.testing.assert_array_equal(second["targets"], [32, 33, 34, 0])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 1, 0])
    np.testing.assert_array_equal(second["positions"], [0, 1, 2, 0])
    np.testing.assert_array_equal(second["loss_mask"], [1, 1, 1, 0])
    for row in rows:
        assert {k: v.dtype for k, v in row.items()} == {
            "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
            "loss_mask": np.float32,
        }  # fmt: skip


def _random_documents(seed, count=40):
    rng = np.random.default_rng(seed)
    # Token values encode (document, index) so any pair can be traced back to its document.
    return [1000 * (d + 1) + np.arange(rng.integers(1, 30)) for d in range(count)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_every_pair_is_kept_in_order_and_never_crosses_documents(seq_len):
    documents = _random_documents(seed=seq_len)
    rows = list(_packed(documents, seq_len))
    pairs = []
    for row in rows:
        real = row["loss_mask"] == 1
        np.testing.assert_array_equal(real, row["segment_ids"] > 0)
        assert np.all(row["positions"] < seq_len)
        assert np.all(row["inputs"][~real] == 0) and np.all(row["targets"][~real] == 0)
        # Within a segment: one document, consecutive tokens, positions counting from 0.
        for segment in np.unique(row["segment_ids"][real]):
            where = row["segment_ids"] == segment
            inputs, targets = row["inputs"][where], row["targets"][where]
            np.testing.assert_array_equal(targets, inputs + 1)
            assert len(set(inputs // 1000)) == 1
            np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
        pairs.extend(zip(row["inputs"][real].tolist(), row["targets"][real].tolist(), strict=True))
    expected = [(int(a), int(b)) for d in documents for a, b in zip(d[:-1], d[1:], strict=True)]
    assert pairs == expected
    # Only the last row may hold padding.
    assert all(row["loss_mask"].all() for row in rows[:-1])


def test_state_json_round_trip_at_every_row():
    dataset = _packed(_random_documents(seed=3), seq_len=8)
    reference = list(dataset)
    iterator = iter(dataset)
    for step in range(len(reference)):
        state = json.loads(json.dumps(iterator.get_state()))
        resumed = iter(dataset)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - step
        for got, want in zip(rest, reference[step:], strict=True):
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
        next(iterator)


def test_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        _packed([[1, 2]], seq_len=0)
