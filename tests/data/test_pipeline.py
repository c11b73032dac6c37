"""The pipeline: batch layout, determinism, per-epoch shuffles, process sharding, exact resume, config checks."""

import numpy as np
import pytest

from minimax_jax.data.pipeline import DataConfig, make_dataset, state_from_json, state_to_json
from minimax_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
MARK = ord("[")  # starts every test document and appears nowhere else
DOCUMENTS = [f"[{i:03d}]" + "abcdefghijklmnopqrstuvwxyz"[: (7 * i) % 27] for i in range(60)]


def _dataset(config=None, *, documents=DOCUMENTS, seq_len=16, global_batch_size=4, **kwargs):
    return make_dataset(
        config or DataConfig(), BYTE, seq_len=seq_len, global_batch_size=global_batch_size, documents=documents,
        **kwargs,
    )  # fmt: skip


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def _documents_in_order(batches):
    """Rebuilds the documents a stream carried, checking each (input, target) pair continues its document."""
    documents, current = [], None
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            real = batch["loss_mask"][row] == 1
            for x, y in zip(batch["inputs"][row][real].tolist(), batch["targets"][row][real].tolist(), strict=True):
                if x == MARK:
                    if current is not None:
                        documents.append(bytes(current).decode())
                    current = [x, y]
                else:
                    assert current is not None and current[-1] == x, "a pair does not continue its document"
                    current.append(y)
    documents.append(bytes(current).decode())
    return documents


def test_batch_layout():
    batch = next(iter(_dataset(global_batch_size=6, seq_len=32, process_index=1, process_count=3)))
    assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    for name, array in batch.items():
        assert array.shape == (2, 32), name
        assert array.dtype == (np.float32 if name == "loss_mask" else np.int32), name
    # Inside a segment each target is the next input: next-token targets that stay within a document.
    same_segment = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, 1:] > 0)
    assert same_segment.any()
    np.testing.assert_array_equal(batch["targets"][:, :-1][same_segment], batch["inputs"][:, 1:][same_segment])


def test_default_corpus_runs():
    dataset = make_dataset(DataConfig(), BYTE, seq_len=128, global_batch_size=2)
    batch = next(iter(dataset))
    assert batch["inputs"].shape == (2, 128) and batch["loss_mask"].all()
    assert batch["inputs"].max() < BYTE.vocab_size


def test_one_epoch_carries_every_document_exactly_once_and_pads_the_last_batch():
    batches = list(_dataset(DataConfig(num_epochs=1, seed=7)))
    assert sorted(_documents_in_order(batches)) == sorted(DOCUMENTS)
    assert batches[-1]["loss_mask"][-1].sum() < batches[-1]["loss_mask"].shape[1]  # padded tail, not dropped
    assert all(b["loss_mask"].all() for b in batches[:-1])


def test_same_seed_same_batches_other_seed_other_batches():
    first = _take(iter(_dataset(DataConfig(seed=1))), 5)
    _assert_same_batches(_take(iter(_dataset(DataConfig(seed=1))), 5), first)
    other = _take(iter(_dataset(DataConfig(seed=2))), 5)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other, strict=True))


def test_each_epoch_is_a_different_permutation():
    batches = _take(iter(_dataset(DataConfig(seed=3))), 60)
    documents = _documents_in_order(batches)
    first, second = documents[: len(DOCUMENTS)], documents[len(DOCUMENTS) : 2 * len(DOCUMENTS)]
    assert sorted(first) == sorted(second) == sorted(DOCUMENTS)
    assert first != second and first != DOCUMENTS


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_complete(process_count):
    shards = []
    for process_index in range(process_count):
        batches = list(
            _dataset(DataConfig(num_epochs=1), global_batch_size=2 * process_count, process_index=process_index,
                     process_count=process_count)
        )  # fmt: skip
        assert all(b["inputs"].shape == (2, 16) for b in batches)
        shards.append(_documents_in_order(batches))
    everything = [d for shard in shards for d in shard]
    assert sorted(everything) == sorted(DOCUMENTS)  # complete, and no document twice
    assert all(len(shard) >= len(DOCUMENTS) // process_count for shard in shards)


@pytest.mark.parametrize(("read_threads", "prefetch_batches"), [(0, 0), (2, 2)])
def test_state_round_trip_resumes_exactly(read_threads, prefetch_batches):
    config = DataConfig(seed=5, read_threads=read_threads, prefetch_batches=prefetch_batches)
    dataset = _dataset(config, seq_len=24)
    iterator = iter(dataset)
    _take(iterator, 7)
    saved = state_to_json(iterator)
    following = _take(iterator, 9)
    resumed = iter(_dataset(config, seq_len=24))
    state_from_json(resumed, saved)
    _assert_same_batches(_take(resumed, 9), following)
    for it in (iterator, resumed):
        it.close()


def test_orbax_checkpoint_of_iterator_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    dataset = _dataset(DataConfig(seed=9, prefetch_batches=0))
    iterator = iter(dataset)
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        following = _take(iterator, 4)
        resumed = iter(dataset)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same_batches(_take(resumed, 4), following)


@pytest.mark.parametrize(
    ("config_kwargs", "message"),
    [
        ({"seed": -1}, "seed"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"text_field": ""}, "text_field"),
        ({"text_separator": ""}, "text_separator"),
        ({"read_threads": -1}, "read_threads"),
    ],
)
def test_config_validation(config_kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**config_kwargs)


def test_config_accepts_a_single_source_string():
    assert DataConfig(sources="data/*.jsonl").sources == ("data/*.jsonl",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_batch_size": 5, "process_count": 2}, "multiple of process_count"),
        ({"process_index": 2, "process_count": 2}, "process_index"),
        ({"seq_len": 0}, "seq_len"),
        ({"documents": ["[a]"], "process_index": 1, "process_count": 2}, "no documents"),
    ],
)
def test_make_dataset_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dataset(**kwargs)


def test_sources_are_read_from_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "[x]hello"}\n{"text": "[y]world"}\n')
    config = DataConfig(sources=(str(tmp_path / "*.jsonl"),), num_epochs=1)
    batches = list(make_dataset(config, BYTE, seq_len=8, global_batch_size=1))
    assert sorted(_documents_in_order(batches)) == ["[x]hello", "[y]world"]


def test_hugging_face_tokenizer_documents_end_with_eos(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir), eos_token="</s>")
    documents = ["the cat sat", "a dog sat on the mat", "the mat"]
    config = DataConfig(num_epochs=1, shuffle=False)
    batch = next(iter(make_dataset(config, tokenizer, seq_len=16, global_batch_size=1, documents=documents)))
    real = batch["loss_mask"][0] == 1
    assert real.sum() == sum(len(d.split()) for d in documents)  # n words + EOS -> n pairs per document
    last_of_segment = np.r_[batch["segment_ids"][0][1:] != batch["segment_ids"][0][:-1], True] & real
    np.testing.assert_array_equal(batch["targets"][0][last_of_segment], [tokenizer.eos_id] * len(documents))
    second_document_inputs = batch["inputs"][0][batch["segment_ids"][0] == 2]
    assert tokenizer.decode(second_document_inputs) == "a dog sat on the mat"  # its EOS is only a target
