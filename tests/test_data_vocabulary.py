"""Vocabulary: index 0 is padding, raw ids keep their type, save/load round trip."""

import json
import os

import numpy as np
import pytest

from tfx_xmatch.data import Vocabulary


def test_constructor_assigns_indices_from_one():
    vocab = Vocabulary(["b", "a", "c"])
    assert vocab.num_items == len(vocab) == 3
    np.testing.assert_array_equal(vocab.lookup(["b", "a", "c"]), [1, 2, 3])
    assert vocab.lookup(["a"]).dtype == np.int32
    np.testing.assert_array_equal(vocab.ids([3, 1]), ["c", "b"])
    assert vocab.index("c") == 3
    assert "a" in vocab and "z" not in vocab


def test_duplicates_are_rejected_with_the_id():
    with pytest.raises(ValueError, match=r"duplicate item id 'a' at indices 1 and 3"):
        Vocabulary(["a", "b", "a"])


def test_mixed_or_bad_id_types_are_rejected():
    with pytest.raises(TypeError, match="all str or all int"):
        Vocabulary([1, "1"])
    with pytest.raises(TypeError, match="float"):
        Vocabulary([1.5])
    with pytest.raises(TypeError, match="bool"):
        Vocabulary([True])


def test_unknown_id_raises_key_error_naming_it_unless_default():
    vocab = Vocabulary([10, 20])
    with pytest.raises(KeyError, match="unknown item id 30"):
        vocab.lookup([10, 30])
    with pytest.raises(KeyError, match=r"'10'.*integer ids"):
        vocab.lookup(["10"])
    np.testing.assert_array_equal(vocab.lookup([10, 30, 20], default=0), [1, 0, 2])


def test_lookup_accepts_numpy_arrays_and_scalars():
    vocab = Vocabulary([10, 20])
    np.testing.assert_array_equal(vocab.lookup(np.array([20, 10], dtype=np.int64)), [2, 1])
    assert int(vocab.lookup(np.int64(20))) == 2
    assert vocab.lookup(20).shape == ()


def test_ids_rejects_padding_and_out_of_range():
    vocab = Vocabulary([10, 20])
    assert vocab.ids([1, 2]).dtype == np.int64
    with pytest.raises(IndexError, match="0 is padding"):
        vocab.ids([0])
    with pytest.raises(IndexError, match="item index 3 is out of range 1..2"):
        vocab.ids([1, 3])


@pytest.mark.parametrize(
    "order, expected",
    [
        ("first_seen", ["c", "a", "b"]),
        ("frequency", ["a", "c", "b"]),
        ("sorted", ["a", "b", "c"]),
    ],
)
def test_build_orders(order, expected):
    vocab = Vocabulary.build(["c", "a", "b", "a", "a", "c"], order=order)
    assert list(vocab) == expected


def test_build_sorted_keeps_integer_id_i_at_index_i():
    vocab = Vocabulary.build([3, 1, 2, 3, 5, 4], order="sorted")
    np.testing.assert_array_equal(vocab.lookup([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5])


def test_build_min_count_and_bad_arguments():
    vocab = Vocabulary.build(["a", "b", "a", "c", "c"], min_count=2)
    assert list(vocab) == ["a", "c"]
    with pytest.raises(ValueError, match="'popular'"):
        Vocabulary.build(["a"], order="popular")
    with pytest.raises(ValueError, match="min_count must be at least 1, got 0"):
        Vocabulary.build(["a"], min_count=0)


@pytest.mark.parametrize("ids", [[5, 3, 9], ["x", "007", "7"], []])
def test_save_load_round_trip_keeps_type(tmp_path, ids):
    vocab = Vocabulary(ids)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.id_type == vocab.id_type
    assert json.loads(path.read_text())["id_type"] == vocab.id_type
    # Atomic write: nothing but the final file is left in the directory.
    assert os.listdir(tmp_path) == ["vocab.json"]


def test_int_and_str_vocabularies_differ():
    assert Vocabulary([1, 2]) != Vocabulary(["1", "2"])
    assert Vocabulary([1, 2]) != Vocabulary([2, 1])
    assert Vocabulary([1, 2]) == Vocabulary(np.array([1, 2]))


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"ids": [1]}))
    with pytest.raises(ValueError, match="not a tfx_xmatch vocabulary"):
        Vocabulary.load(path)
    wrong_type = {"format": "tfx_xmatch.Vocabulary", "version": 1, "id_type": "int", "ids": ["a"]}
    path.write_text(json.dumps(wrong_type))
    with pytest.raises(ValueError, match="'a' is not of declared id_type 'int'"):
        Vocabulary.load(path)


def test_load_names_the_file_for_every_bad_vocabulary(tmp_path):
    """Duplicate ids, ids past int64 and bytes that are not UTF-8 failed without the file's name
    (a raw OverflowError, a raw UnicodeDecodeError), and a wrong num_items was accepted."""
    path = tmp_path / "item_vocab.json"
    base = {"format": "tfx_xmatch.Vocabulary", "version": 1, "id_type": "int"}
    cases = [
        ({**base, "ids": [1, 2, 2]}, r"item_vocab.json: duplicate item id 2"),
        ({**base, "ids": [1, 2**64]}, r"item_vocab.json: id 18446744073709551616 is out of the int64 range"),
        ({**base, "num_items": 5, "ids": [1, 2, 3]}, r"item_vocab.json: num_items is 5 but it lists 3 ids"),
    ]
    for value, message in cases:
        path.write_text(json.dumps(value))
        with pytest.raises(ValueError, match=message):
            Vocabulary.load(path)
    path.write_bytes(b'{"ids": ["\xff"]}')
    with pytest.raises(ValueError, match=r"item_vocab.json: not valid UTF-8"):
        Vocabulary.load(path)
    good = Vocabulary(["a", "b"])
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good.to_json()).encode())  # a byte-order mark
    assert Vocabulary.load(path) == good


def test_string_ids_take_memory_by_their_own_length_not_the_longest():
    """ids were a fixed-width unicode array sized for the longest id: 50,000 items and one
    2,000-character id took 404 MB instead of 4 MB (and a trailing NUL was dropped)."""
    ids = ["x" * 2000] + [f"i{k}" for k in range(999)] + ["tail\x00"]
    vocab = Vocabulary(ids)
    every = vocab.ids(np.arange(1, vocab.num_items + 1))
    assert every.nbytes < 10 * len(ids)  # a pointer per id; 8 MB as a fixed-width array
    assert every.tolist() == ids and all(type(raw_id) is str for raw_id in every.tolist())
    assert vocab.ids([1001]).tolist() == ["tail\x00"] and vocab.ids(5) == "i3"
    assert Vocabulary.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
