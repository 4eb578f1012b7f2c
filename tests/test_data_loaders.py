"""Loaders: small hand-written files, malformed input, side info, registry, and the real data."""

import functools
import logging
import os
import pathlib
import pickle
import re
import sys
import types

import numpy as np
import pytest

from tfx_xmatch.data import (
    DATASETS,
    DataFormatError,
    load_dataset,
    load_movielens_side_info,
    load_pairs,
    load_rating_log,
    load_sequences,
    load_tfds_movielens_1m,
)
from tfx_xmatch.data.loaders import load_table


def write(path: pathlib.Path, text: str, encoding: str = "utf-8") -> pathlib.Path:
    path.write_text(text, encoding=encoding)
    return path


def as_lists(dataset):
    return [sequence.tolist() for sequence in dataset.sequences]


# ----------------------------------------------------------------------------- pairs


def test_load_pairs_groups_blocks_in_first_appearance_order(tmp_path):
    path = write(tmp_path / "pairs.txt", "2 3\n2 1\n1 2\n2 2\n\n1 3\n")
    dataset = load_pairs(path)
    assert dataset.name == "pairs"
    assert dataset.user_ids.tolist() == [2, 1]
    # Integer ids 1..3 keep item i at index i.
    assert as_lists(dataset) == [[3, 1, 2], [2, 3]]
    assert dataset.num_items == 3 and dataset.num_interactions == 5
    assert dataset.timestamps is None
    assert dataset.sequences[0].dtype == np.int32
    assert dataset.skipped_lines == 0


def test_load_pairs_accepts_tabs_and_string_ids(tmp_path):
    path = write(tmp_path / "pairs.tsv", "u1\tbook\nu1\tpen\nu2\tbook\n")
    dataset = load_pairs(path, name="shop")
    assert dataset.name == "shop"
    assert dataset.user_ids.tolist() == ["u1", "u2"]
    assert dataset.item_vocab.id_type == "str"
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == ["book", "pen"]


def test_fields_are_separated_by_ascii_spaces_and_tabs_only(tmp_path):
    """str.split() also split at U+00A0, U+3000 and U+0085: "x\u00a0y" loaded as two items from a
    sequences file (and from a space-separated rating log), while the pairs loader refused the line."""
    ids = ["x\u00a0y", "p\u3000q", "c\x85d"]
    sequences = load_sequences(write(tmp_path / "seq.txt", "u\u00a01  " + " \t".join(ids) + " z \n"))
    assert sequences.user_ids.tolist() == ["u\u00a01"]
    assert sequences.item_vocab.ids(sequences.sequences[0]).tolist() == [*ids, "z"]
    pairs = load_pairs(write(tmp_path / "pairs.txt", "".join(f"u\u00a01 {item}\n" for item in [*ids, "z"])))
    assert list(pairs.item_vocab) == list(sequences.item_vocab)
    assert pairs.user_ids.tolist() == ["u\u00a01"]
    log = load_rating_log(write(tmp_path / "log.txt", "".join(f"u1 {item} 5 {t}\n" for t, item in enumerate(ids))))
    assert list(log.item_vocab) == ids
    # A line holding only a non-ASCII space is a one-field line, not a blank one.
    with pytest.raises(DataFormatError, match=r"pairs.txt:2: expected 'user item', got '\\xa0'"):
        load_pairs(write(tmp_path / "pairs.txt", "u1 a\n\u00a0\n"))


def test_integer_ids_not_dense_are_indexed_in_ascending_order(tmp_path):
    path = write(tmp_path / "pairs.txt", "1 30\n1 10\n2 20\n")
    dataset = load_pairs(path)
    assert list(dataset.item_vocab) == [10, 20, 30]
    assert as_lists(dataset) == [[3, 1], [2]]


def test_leading_zero_ids_stay_strings(tmp_path):
    path = write(tmp_path / "pairs.txt", "1 007\n1 7\n")
    dataset = load_pairs(path)
    assert dataset.item_vocab.id_type == "str"
    assert dataset.num_items == 2


def test_malformed_pair_line_reports_path_and_line(tmp_path):
    path = write(tmp_path / "pairs.txt", "1 1\n1 2\nabc\n")
    with pytest.raises(DataFormatError) as info:
        load_pairs(path)
    assert info.value.path == str(path)
    assert info.value.line_number == 3
    assert str(info.value) == f"{path}:3: expected 'user item', got 'abc'"
    assert isinstance(info.value, ValueError)


def test_data_format_error_pickles():
    error = pickle.loads(pickle.dumps(DataFormatError("f.txt", 4, "bad")))
    assert (error.path, error.line_number, str(error)) == ("f.txt", 4, "f.txt:4: bad")


def test_skip_bad_lines_counts_and_warns(tmp_path, caplog):
    path = write(tmp_path / "pairs.txt", "1 1\nabc\n1 2 3\n2 5\n")
    with caplog.at_level(logging.WARNING, logger="tfx_xmatch.data.loaders"):
        dataset = load_pairs(path, skip_bad_lines=True)
    assert dataset.skipped_lines == 2
    assert as_lists(dataset) == [[1], [2]]
    assert "skipped 2 malformed line(s)" in caplog.text
    assert f"{path}:2: expected 'user item', got 'abc'" in caplog.text


def test_a_stray_non_integer_id_among_integers_is_warned_about(tmp_path, caplog):
    path = write(tmp_path / "pairs.txt", "1 3\n1 1\n2 12a\n2 2\n3 1\n")
    with caplog.at_level(logging.WARNING, logger="tfx_xmatch.data.loaders"):
        dataset = load_pairs(path)
    # Every item id is now a string, indexed in order of first appearance: "3" is index 1.
    assert dataset.item_vocab.ids([1, 2, 3, 4]).tolist() == ["3", "1", "12a", "2"]
    assert "item ids are read as strings" in caplog.text and "1 of 4 are not canonical integers, the first '12a'" \
        in caplog.text
    assert "user ids" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tfx_xmatch.data.loaders"):
        load_pairs(write(tmp_path / "names.txt", "u1 apple\nu1 pear\nu2 7\n"))
    assert caplog.text == ""  # string ids by design: nothing to warn about
    # A header line loaded as data: the warning names it for what it most likely is.
    with caplog.at_level(logging.WARNING, logger="tfx_xmatch.data.loaders"):
        load_pairs(write(tmp_path / "header.txt", "user item\n1 1\n1 2\n2 3\n3 4\n"))
    assert "the first 'item' (the first line of the file, a header? drop it)" in caplog.text
    assert "the first 'user' (the first line of the file, a header? drop it)" in caplog.text


def test_a_header_line_is_suggested_only_where_a_file_can_have_one(tmp_path, caplog):
    """Any first odd id that was the first id seen got "(the first line of the file, a header?)": a
    pairs file starting "u1 -5", a Parquet column [-5, 5, 7] (Parquet has no header line), and a
    CSV file, whose header line is read as one."""
    def warning(load, path, **options):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tfx_xmatch.data.loaders"):
            load(path, **options)
        return caplog.text

    text = warning(load_pairs, write(tmp_path / "negative.txt", "1 -5\n1 5\n1 7\n"))
    assert "the first '-5' (ids are integers only when all are digits without a sign or leading zeros" in text
    assert "header" not in text
    assert "header" not in warning(load_table, write(tmp_path / "events.csv", "user,item\n1,x\n1,5\n1,7\n"))
    assert "header" not in warning(load_rating_log, write(tmp_path / "log.txt", "u i r t\n1 x 5 1\n1 5 4 2\n1 7 3 3\n"),
                                   has_header=True)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pa.table({"user": [1, 1, 1], "item": ["x", "5", "7"]}), tmp_path / "events.parquet")
    text = warning(load_table, tmp_path / "events.parquet")
    assert "the first 'x' (a typo?" in text and "header" not in text
    parquet.write_table(pa.table({"user": [1, 1, 1], "item": pa.array([-5, 5, 7], pa.int64())}),
                        tmp_path / "ints.parquet")
    text = warning(load_table, tmp_path / "ints.parquet")
    assert "the first '-5' (ids are integers only" in text and "header" not in text


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file_has_no_interactions(tmp_path, text):
    path = write(tmp_path / "empty.txt", text)
    with pytest.raises(DataFormatError, match="file has no interactions") as info:
        load_pairs(path)
    assert info.value.line_number is None


def test_only_bad_lines_skipped_still_has_no_interactions(tmp_path):
    path = write(tmp_path / "bad.txt", "abc\ndef\n")
    with pytest.raises(DataFormatError, match=r"no interactions \(2 malformed line\(s\) skipped\)"):
        load_pairs(path, skip_bad_lines=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_pairs(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- sequences


def test_load_sequences(tmp_path):
    path = write(tmp_path / "seq.txt", "1 1 2 3\n2 2 4\n1 5\n")
    dataset = load_sequences(path)
    assert dataset.user_ids.tolist() == [1, 2]
    assert as_lists(dataset) == [[1, 2, 3, 5], [2, 4]]
    assert dataset.num_items == 5


def test_sequence_line_without_items_is_malformed(tmp_path):
    path = write(tmp_path / "seq.txt", "1 1 2\n2\n3 3 1\n")
    with pytest.raises(DataFormatError) as info:
        load_sequences(path)
    assert info.value.line_number == 2
    assert "no items" in str(info.value)
    dataset = load_sequences(path, skip_bad_lines=True)
    assert dataset.skipped_lines == 1
    assert dataset.user_ids.tolist() == [1, 3]


# ----------------------------------------------------------------------------- rating logs


def test_rating_log_tab_sorts_by_time_stably(tmp_path):
    path = write(
        tmp_path / "u.data",
        "1\t10\t5\t300\n2\t20\t3\t100\n1\t20\t4\t100\n1\t30\t1\t300\n1\t40\t2\t200\n",
    )
    dataset = load_rating_log(path)
    assert dataset.user_ids.tolist() == [1, 2]
    ids = [dataset.item_vocab.ids(sequence).tolist() for sequence in dataset.sequences]
    # Ties at t=300 keep file order (10 before 30).
    assert ids == [[20, 40, 10, 30], [20]]
    assert [times.tolist() for times in dataset.timestamps] == [[100, 200, 300, 300], [100]]
    assert dataset.timestamps[0].dtype == np.int64


def test_rating_log_double_colon_and_min_rating(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::10::5::3\n1::20::2::1\n2::10::4::2\n")
    dataset = load_rating_log(path, min_rating=4)
    assert dataset.num_interactions == 2
    assert dataset.item_vocab.ids(np.concatenate(dataset.sequences)).tolist() == [10, 10]


def test_rating_log_csv_with_header_and_half_stars(tmp_path):
    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n7,3,3.5,20\n7,1,4.0,10\n")
    dataset = load_rating_log(path, has_header=True)
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == [1, 3]


def test_rating_log_custom_columns_without_timestamp(tmp_path):
    path = write(tmp_path / "log.txt", "a x 1\na y 2\n")
    dataset = load_rating_log(path, columns=("user", "item", None))
    assert dataset.timestamps is None
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == ["x", "y"]
    with pytest.raises(ValueError, match="columns must include 'item'"):
        load_rating_log(path, columns=("user", "rating", "timestamp"))
    with pytest.raises(ValueError, match="min_rating=3 needs a 'rating' column"):
        load_rating_log(path, columns=("user", "item", None), min_rating=3)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t5\tyesterday", "timestamp 'yesterday' is not an integer"),
        ("1\t2\tgood\t100", "rating 'good' is not a number"),
        ("1\t2\t5", "expected 4 tab-separated fields 'user item rating timestamp', got"),
    ],
)
def test_rating_log_bad_fields_name_the_field(tmp_path, line, message):
    path = write(tmp_path / "u.data", f"1\t1\t5\t50\n{line}\n")
    with pytest.raises(DataFormatError, match=message) as info:
        load_rating_log(path)
    assert info.value.line_number == 2
    assert load_rating_log(path, skip_bad_lines=True).skipped_lines == 1


def test_rating_log_all_filtered_out(tmp_path):
    path = write(tmp_path / "u.data", "1\t1\t1\t50\n")
    with pytest.raises(DataFormatError, match="no interactions rated at least 4"):
        load_rating_log(path, min_rating=4)


# ----------------------------------------------------------------------------- side info


def make_ml1m_dir(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir()
    write(directory / "ml-1m.txt", "1 1\n1 2\n2 2\n2 3\n")
    write(
        directory / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
        "5::Père (1995)::Comedy\n",
        encoding="latin-1",
    )
    write(directory / "users.dat", "10::F::1::10::48067\n20::M::56::16::70072\n")
    # Remapped item 1 is movie 5, item 2 is movie 1 (Toy Story), item 3 is not in movies.dat.
    write(directory / "sas_to_original_items.txt", "1 5\n2 1\n3 999\n")
    write(directory / "sas_to_original_users.txt", "1 20\n2 10\n")
    return directory


def test_ml1m_side_info_remaps_ids(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    dataset = load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)
    genres = dataset.feature_vocabs["genres"]
    assert genres == ["Adventure", "Animation", "Children's", "Comedy", "Fantasy"]
    matrix = dataset.item_features["genres"]
    assert matrix.shape == (4, 5) and matrix.dtype == np.float32
    assert matrix[0].sum() == 0 and matrix[3].sum() == 0
    assert [genres[k] for k in np.flatnonzero(matrix[1])] == ["Comedy"]
    assert [genres[k] for k in np.flatnonzero(matrix[2])] == ["Animation", "Children's", "Comedy"]
    vocabs = dataset.feature_vocabs
    # User 1 is original 20 (M, 56+, self-employed); user 2 is original 10 (F, Under 18, K-12).
    assert [vocabs["gender"][k] for k in dataset.user_features["gender"]] == ["M", "F"]
    assert [vocabs["age"][k] for k in dataset.user_features["age"]] == ["56+", "Under 18"]
    assert [vocabs["occupation"][k] for k in dataset.user_features["occupation"]] == [
        "self-employed",
        "K-12 student",
    ]
    assert all(values.dtype == np.int32 for values in dataset.user_features.values())


def test_ml1m_side_info_without_remapping_uses_original_ids(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    dataset = load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory, remap_ids=False)
    # Item index 1 is now movie 1 (Toy Story); users 1 and 2 are not in users.dat.
    genres = dataset.feature_vocabs["genres"]
    assert "Animation" in [genres[k] for k in np.flatnonzero(dataset.item_features["genres"][1])]
    assert dataset.user_features["gender"].tolist() == [0, 0]


def make_ml100k_dir(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir()
    write(directory / "u.data", "1\t2\t5\t20\n1\t1\t3\t10\n2\t1\t4\t5\n")
    flags_toy = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    flags_gold = "|".join(["0", "1", "1"] + ["0"] * 13 + ["1", "0", "0"])
    write(
        directory / "u.item",
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags_toy}\n"
        f"2|GoldenEye (1995)|01-Jan-1995||http://y|{flags_gold}\n",
        encoding="latin-1",
    )
    genre_names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                   "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                   "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip
    write(directory / "u.genre", "".join(f"{name}|{k}\n" for k, name in enumerate(genre_names)) + "\n")
    write(directory / "u.user", "1|24|M|technician|85711\n2|17|F|student|94043\n")
    write(directory / "u.occupation", "student\ntechnician\n")
    return directory


def test_ml1m_side_info_without_mappings_needs_explicit_remap_ids(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    for name in ("sas_to_original_items.txt", "sas_to_original_users.txt"):
        (directory / name).unlink()
    dataset = load_pairs(directory / "ml-1m.txt")
    # The remapped ids would silently "match" MovieLens ids; refuse to guess.
    with pytest.raises(ValueError) as info:
        load_movielens_side_info(dataset, directory)
    message = str(info.value)
    assert "sas_to_original_items.txt" in message and "sas_to_original_users.txt" in message
    assert "remap_ids=False" in message
    with pytest.raises(ValueError, match="remap_ids=False"):
        load_dataset("ml-1m", data_dir=tmp_path)
    # Saying so explicitly joins the ids as MovieLens ids (item 1 is Toy Story).
    joined = load_movielens_side_info(dataset, directory, remap_ids=False)
    genres = joined.feature_vocabs["genres"]
    assert "Animation" in [genres[k] for k in np.flatnonzero(joined.item_features["genres"][1])]
    with pytest.raises(FileNotFoundError, match="sas_to_original_items.txt"):
        load_movielens_side_info(dataset, directory, remap_ids=True)


def test_ml1m_side_info_missing_user_mapping_is_named(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    (directory / "sas_to_original_users.txt").unlink()
    with pytest.raises(ValueError) as info:
        load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)
    assert "sas_to_original_users.txt" in str(info.value)
    assert "sas_to_original_items.txt" not in str(info.value)


def test_ml1m_side_info_with_timestamps_uses_original_ids_without_mappings(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    for name in ("sas_to_original_items.txt", "sas_to_original_users.txt"):
        (directory / name).unlink()
    # A raw rating log (ratings.dat) has timestamps and original ids: no mapping needed.
    write(directory / "ratings.dat", "10::1::5::978300760\n10::5::3::978302109\n20::2::4::978301968\n")
    dataset = load_movielens_side_info(load_rating_log(directory / "ratings.dat"), directory)
    assert dataset.user_features["gender"].tolist() == [1, 2]


def test_ml100k_side_info_buckets_ages(tmp_path):
    directory = make_ml100k_dir(tmp_path / "ml-100k")
    dataset = load_dataset(str(directory / "u.data"), format="ratings", sep="\t")
    assert dataset.timestamps is not None
    vocabs = dataset.feature_vocabs
    assert vocabs["genres"][0] == "unknown" and len(vocabs["genres"]) == 19
    toy = dataset.item_vocab.index(1)
    assert [vocabs["genres"][k] for k in np.flatnonzero(dataset.item_features["genres"][toy])] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    assert [vocabs["age"][k] for k in dataset.user_features["age"]] == ["18-24", "Under 18"]
    assert [vocabs["gender"][k] for k in dataset.user_features["gender"]] == ["M", "F"]
    assert [vocabs["occupation"][k] for k in dataset.user_features["occupation"]] == ["technician", "student"]


def test_side_info_missing_files(tmp_path):
    dataset = load_pairs(write(tmp_path / "p.txt", "1 1\n"))
    with pytest.raises(FileNotFoundError, match="movies.dat"):
        load_movielens_side_info(dataset, tmp_path)


def test_side_info_bad_line(tmp_path):
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    write(directory / "users.dat", "10::F::1::10::48067\nx::M::56::16::70072\n")
    with pytest.raises(DataFormatError, match="users.dat:2: UserID 'x' is not an integer"):
        load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)


@pytest.mark.parametrize("name, text, message", [
    ("movies.dat", "1::A (1995)::Comedy\n2::B (1995)::Drama\n1::C (1995)::Horror\n",
     "movies.dat:3: MovieID 1 appears again (first at line 1)"),
    ("users.dat", "10::F::1::10::48067\n20::M::56::16::70072\n10::M::25::2::1\n",
     "users.dat:3: UserID 10 appears again (first at line 1)"),
    ("sas_to_original_items.txt", "1 5\n2 1\n1 2\n", "sas_to_original_items.txt:3: remapped id 1 appears again"),
])
def test_side_files_refuse_an_id_given_twice(tmp_path, name, text, message):
    # The later line silently replaced the first: item 1 took another movie's genres.
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    write(directory / name, text, encoding="latin-1")
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)


@pytest.mark.parametrize("name, text, message", [
    ("movies.dat", "1::A (1995)::Comedy\n002::B (1995)::Drama\n", "movies.dat:2: MovieID '002' is not written as"),
    ("users.dat", "+10::F::1::10::48067\n20::M::56::16::70072\n", "users.dat:1: UserID '+10' is not written as"),
])
def test_side_file_ids_follow_the_interactions_id_rule(tmp_path, name, text, message):
    """int() read MovieID "002" as 2 and UserID "+10" as 10, joining them to ids the interaction
    loaders keep apart ("007" is another id than 7 there)."""
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    write(directory / name, text, encoding="latin-1")
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)


def test_side_files_may_start_with_a_byte_order_mark(tmp_path):
    # Read as latin-1 it was part of the first id: "MovieID 'ï»¿1' is not an integer".
    directory = make_ml1m_dir(tmp_path / "ml-1m")
    for name in ("movies.dat", "users.dat", "sas_to_original_items.txt"):
        (directory / name).write_bytes(b"\xef\xbb\xbf" + (directory / name).read_bytes())
    plain = load_movielens_side_info(load_pairs(make_ml1m_dir(tmp_path / "plain") / "ml-1m.txt"), tmp_path / "plain")
    marked = load_movielens_side_info(load_pairs(directory / "ml-1m.txt"), directory)
    np.testing.assert_array_equal(marked.item_features["genres"], plain.item_features["genres"])
    assert marked.feature_vocabs == plain.feature_vocabs


# ----------------------------------------------------------------------------- registry


def test_load_dataset_by_name_under_data_dir(tmp_path):
    make_ml1m_dir(tmp_path / "ml-1m")
    dataset = load_dataset("ml-1m", data_dir=tmp_path)
    assert dataset.name == "ml-1m"
    assert "genres" in dataset.item_features and "age" in dataset.user_features
    plain = load_dataset("ml-1m", data_dir=tmp_path, side_info=False)
    assert plain.item_features == {} and plain.user_features == {}
    # The dataset's own folder is accepted too.
    assert load_dataset("ml-1m", data_dir=tmp_path / "ml-1m").num_users == 2


def test_load_dataset_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        load_dataset("ml-20m")
    for name in DATASETS:
        assert name in str(info.value)


def test_load_dataset_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("beauty", data_dir=tmp_path)
    assert os.path.join(str(tmp_path), "beauty", "Beauty.txt") in str(info.value)
    assert "sequences file" in str(info.value)


def test_load_dataset_path_needs_format(tmp_path):
    path = write(tmp_path / "seq.txt", "1 1 2\n")
    with pytest.raises(ValueError, match="needs format="):
        load_dataset(str(path))
    assert load_dataset(str(path), format="sequences").num_interactions == 2
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_dataset(str(tmp_path / "missing.txt"), format="pairs")
    with pytest.raises(FileNotFoundError, match="not a dataset name; known names: beauty"):
        load_dataset("movielens/1m-ratings")


def test_load_dataset_named_format_must_match(tmp_path):
    make_ml1m_dir(tmp_path / "ml-1m")
    assert load_dataset("ml-1m", data_dir=tmp_path, format="pairs").num_users == 2
    with pytest.raises(ValueError, match="'ml-1m' is a 'pairs' file, got format='ratings'"):
        load_dataset("ml-1m", data_dir=tmp_path, format="ratings")


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf1 2\n1 3\n")
    dataset = load_pairs(path)
    assert dataset.user_ids.tolist() == [1] and dataset.item_vocab.id_type == "int"


def test_load_dataset_skip_bad_lines_passes_through(tmp_path):
    directory = tmp_path / "lastfm"
    directory.mkdir()
    write(directory / "LastFM.txt", "1 1 2\n2\n")
    with pytest.raises(DataFormatError):
        load_dataset("lastfm", data_dir=tmp_path)
    assert load_dataset("lastfm", data_dir=tmp_path, skip_bad_lines=True).skipped_lines == 1


def test_load_dataset_synthetic_kwargs():
    dataset = load_dataset("synthetic", num_users=12, num_items=30, num_clusters=3)
    assert (dataset.num_users, dataset.num_items) == (12, 30)


def test_load_dataset_synthetic_unknown_kwargs_are_named():
    with pytest.raises(ValueError) as info:
        load_dataset("synthetic", num_users=12, num_item=30, format="pairs")
    message = str(info.value)
    assert "unknown argument(s) for dataset 'synthetic': num_item, format" in message
    for accepted in ("num_users", "num_items", "min_length", "max_length", "num_clusters", "noise", "seed"):
        assert accepted in message


def test_tfds_download_failure_is_a_clear_runtime_error(monkeypatch):
    class OfflineBuilder:
        def download_and_prepare(self):
            raise ConnectionError("Temporary failure in name resolution")

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name, data_dir=None: OfflineBuilder()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(RuntimeError) as info:
        load_tfds_movielens_1m()
    message = str(info.value)
    assert "needs network access to download the data" in message
    assert "movielens/1m-ratings" in message
    assert "load_dataset('ml-1m', data_dir=...)" in message
    with pytest.raises(RuntimeError, match="needs network access"):
        load_dataset("tfds:movielens/1m-ratings")


def test_tfds_records_become_a_timestamped_dataset(monkeypatch):
    class Builder:
        def download_and_prepare(self):
            pass

        def as_dataset(self, split, batch_size):
            return [
                {"user_id": np.array([b"7", b"3", b"7"]), "movie_id": np.array([b"2", b"1", b"1"]),
                 "timestamp": np.array([20, 5, 10])},
            ]  # fmt: skip

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name, data_dir=None: Builder()
    fake.as_numpy = lambda batches: batches
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    dataset = load_tfds_movielens_1m()
    assert dataset.user_ids.tolist() == [7, 3]
    assert as_lists(dataset) == [[1, 2], [1]]
    assert [times.tolist() for times in dataset.timestamps] == [[10, 20], [5]]


# ----------------------------------------------------------------------------- real data


@functools.lru_cache(maxsize=None)
def real(name: str, data_dir: str):
    return load_dataset(name, data_dir=data_dir)


@pytest.mark.parametrize(
    "name, users, items, interactions",
    [
        ("ml-1m", 6040, 3416, 999611),
        ("ml-100k", 943, 1682, 100000),
        ("beauty", 22363, 12101, 198502),
        ("lastfm", 1090, 3646, 52551),
    ],
)
def test_real_dataset_counts(real_data_dir, name, users, items, interactions):
    dataset = real(name, str(real_data_dir))
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (users, items, interactions)
    assert dataset.skipped_lines == 0
    # Files with ids 1..N keep item i at index i (comparable with published numbers).
    np.testing.assert_array_equal(dataset.item_vocab.ids(np.arange(1, items + 1)), np.arange(1, items + 1))
    assert all(len(sequence) >= 5 for sequence in dataset.sequences)


def test_real_ml1m_matches_file_order(real_data_dir):
    dataset = real("ml-1m", str(real_data_dir))
    assert dataset.user_ids.tolist() == list(range(1, 6041))
    with open(real_data_dir / "ml-1m" / "ml-1m.txt") as handle:
        head = [line.split() for _, line in zip(range(5), handle)]
    assert dataset.sequences[0][:5].tolist() == [int(item) for user, item in head if user == "1"]


def test_real_ml1m_side_info(real_data_dir):
    dataset = real("ml-1m", str(real_data_dir))
    genres = dataset.item_features["genres"]
    assert genres.shape == (3417, 18)
    assert genres[0].sum() == 0
    assert (genres[1:].sum(axis=1) >= 1).all(), "every item has at least one genre"
    with open(real_data_dir / "ml-1m" / "sas_to_original_items.txt") as handle:
        toy_story = next(int(remapped) for remapped, original in map(str.split, handle) if original == "1")
    animation = dataset.feature_vocabs["genres"].index("Animation")
    assert genres[dataset.item_vocab.index(toy_story), animation] == 1.0
    # Official ML-1M counts: 1,709 women and 4,331 men; every user has demographics.
    assert np.bincount(dataset.user_features["gender"]).tolist() == [0, 1709, 4331]
    assert (dataset.user_features["age"] > 0).all() and (dataset.user_features["occupation"] > 0).all()


def test_real_ml100k_timestamps_and_side_info(real_data_dir):
    dataset = real("ml-100k", str(real_data_dir))
    assert all((np.diff(times) >= 0).all() for times in dataset.timestamps)
    assert dataset.item_features["genres"].shape == (1683, 19)
    assert (dataset.user_features["age"] > 0).all() and (dataset.user_features["occupation"] > 0).all()
    toy_story = dataset.item_vocab.index(1)
    animation = dataset.feature_vocabs["genres"].index("Animation")
    assert dataset.item_features["genres"][toy_story, animation] == 1.0


# ----------------------------------------------------------------------------- malformed tables and bytes


@pytest.mark.parametrize("row, message", [
    ("1,11", r"1 field\(s\) fewer than the header has: \['1', '11'\] under the header \['user', 'item', 'ts'\]"),
    ("1,11,200,999", r"1 field\(s\) more than the header has: \['999'\] in 'user=1, item=11, ts=200, 999'"),
    ('1,"11,200', r"column 'item' runs over several lines \(an unclosed quote\?\)"),
])
def test_table_rows_that_do_not_fit_the_header_are_malformed(tmp_path, row, message):
    # Each of these once loaded silently: a short row as timestamp 0, an unclosed quote as one
    # item id swallowing the rest of the file.
    path = write(tmp_path / "events.csv", f"user,item,ts\n{row}\n2,20,300\n3,30,400\n2,21,301\n")
    with pytest.raises(DataFormatError, match=message) as info:
        load_table(path, timestamp_column="ts")
    assert info.value.line_number == 2
    if '"' not in row:
        dataset = load_table(path, timestamp_column="ts", skip_bad_lines=True)
        assert dataset.skipped_lines == 1 and dataset.user_ids.tolist() == [2, 3]


def test_a_short_row_is_malformed_even_when_the_columns_it_lacks_are_not_read(tmp_path):
    """As the README says; it loaded when only user and item were read: "1,3" under the header
    "user,item,ts", and so would a row whose fields had shifted."""
    path = write(tmp_path / "events.csv", "user,item,ts\n1,1,1\n1,3\n2,2,2\n2,3,3\n")
    with pytest.raises(DataFormatError, match=r"events.csv:3: 1 field\(s\) fewer than the header has"):
        load_table(path)
    assert load_table(path, skip_bad_lines=True).skipped_lines == 1


def test_a_header_line_repeated_mid_file_is_malformed_not_an_event(tmp_path):
    """Files concatenated with their headers: with string ids, "user,item" loaded as one more
    user and item."""
    table = write(tmp_path / "events.csv", "user,item,ts\nu1,i1,1\nu1,i2,2\nuser,item,ts\nu2,i1,3\nu2,i3,4\n")
    with pytest.raises(DataFormatError, match=r"events.csv:4: the header line again \(files concatenated"):
        load_table(table, timestamp_column="ts")
    dataset = load_table(table, timestamp_column="ts", skip_bad_lines=True)
    assert dataset.skipped_lines == 1 and sorted(dataset.user_ids.tolist()) == ["u1", "u2"]
    log = write(tmp_path / "ratings.txt", "user item rating ts\nu1 i1 5 1\nuser item rating ts\nu2 i2 4 2\n")
    with pytest.raises(DataFormatError, match=r"ratings.txt:3: the header line again"):
        load_rating_log(log, has_header=True)
    assert load_rating_log(log, has_header=True, skip_bad_lines=True).skipped_lines == 1


def test_events_repeated_exactly_are_kept_and_named(tmp_path, caplog):
    path = write(tmp_path / "events.csv", "user,item,ts\nu1,i1,1\nu1,i2,2\nu2,i1,3\nu1,i1,1\nu1,i1,5\n")
    with caplog.at_level("WARNING"):
        dataset = load_table(path, timestamp_column="ts")
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == ["i1", "i1", "i2", "i1"]  # nothing dropped
    assert "1 event(s) repeat an earlier one exactly (user, item, timestamp), e.g. user 'u1' item 'i1' at 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_table(write(tmp_path / "fine.csv", "user,item,ts\nu1,i1,1\nu1,i2,1\nu1,i1,2\n"), timestamp_column="ts")
    assert "repeat" not in caplog.text


def test_a_short_row_is_not_kept_by_min_rating(tmp_path):
    path = write(tmp_path / "events.csv", "user,item,stars\n1,10,5\n1,11\n")
    with pytest.raises(DataFormatError, match="1 field\\(s\\) fewer than the header has"):
        load_table(path, rating_column="stars", min_rating=4)
    with pytest.raises(ValueError, match="min_rating must be a finite number, got 'four'"):
        load_table(path, rating_column="stars", min_rating="four")


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_undecodable_bytes_name_the_file_and_line_and_can_be_skipped(tmp_path, suffix):
    header = b"user,item\n" if suffix == ".csv" else b""
    sep = b"," if suffix == ".csv" else b" "
    path = tmp_path / f"events{suffix}"
    path.write_bytes(header + b"1" + sep + b"10\n1" + sep + b"caf\xff\n2" + sep + b"20\n")
    load = (lambda **kw: load_table(path, **kw)) if suffix == ".csv" else (lambda **kw: load_pairs(path, **kw))
    with pytest.raises(DataFormatError, match=r"not valid utf-8(-sig)?: byte\(s\) b'\\xff' at column 6") as info:
        load()
    assert info.value.path.endswith(f"events{suffix}") and info.value.line_number == 2 + bool(header)
    dataset = load(skip_bad_lines=True)
    assert dataset.skipped_lines == 1 and as_lists(dataset) == [[1], [2]]


def test_lines_end_only_at_line_breaks(tmp_path):
    # U+0085 is a plain byte (0x85) in latin-1; str.splitlines would split the line there.
    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::caf\x85e::5::10\r\n1::tea::4::20\r2::tea::3::30\n")
    dataset = load_rating_log(path, encoding="latin-1")
    assert dataset.item_vocab.ids(np.concatenate(dataset.sequences)).tolist() == ["caf\x85e", "tea", "tea"]


def test_ids_past_int64_stay_strings(tmp_path):
    # 2**64 - 1 once crashed with OverflowError and no file or line.
    path = write(tmp_path / "pairs.txt", "1 18446744073709551615\n1 9223372036854775807\n")
    dataset = load_pairs(path)
    assert dataset.item_vocab.id_type == "str"
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == ["18446744073709551615", "9223372036854775807"]
    assert load_pairs(write(tmp_path / "max.txt", "1 9223372036854775807\n")).item_vocab.id_type == "int"


def test_a_quote_left_open_in_a_column_not_read_still_fails_the_row(tmp_path):
    # It read the rows after it as the title, and load_table returned what was left, no word said.
    path = write(tmp_path / "events.csv", 'user,item,title\n1,1,"Foo\n1,2,Bar\n2,3,Baz\n3,4,"Qux"\n3,5,ok\n')
    with pytest.raises(DataFormatError, match=r"column 'title' runs over several lines \(an unclosed quote\?\): "
                                              r"lines 2 to 5 read as one row") as info:
        load_table(path)
    assert info.value.line_number == 2
    dataset = load_table(path, skip_bad_lines=True)
    assert dataset.skipped_lines == 1 and dataset.user_ids.tolist() == [3]


@pytest.mark.parametrize("timestamp, problem", [
    ("+100", "is not an integer"), ("5_0", "is not an integer"), ("\u0661\u0660\u0660", "is not an integer"),
    ("99999999999999999999", "is out of the int64 range"),
])
def test_timestamps_are_plain_integers_in_the_int64_range(tmp_path, timestamp, problem):
    # int() reads "+100", "5_0" and Arabic-Indic digits; past int64 a raw OverflowError came
    # later, naming no file or line.
    path = write(tmp_path / "ratings.dat", f"1::1::5::10\n1::2::4::{timestamp}\n")
    with pytest.raises(DataFormatError, match=re.escape(f"timestamp {timestamp!r} {problem}")) as info:
        load_rating_log(path)
    assert info.value.line_number == 2
    assert load_rating_log(write(tmp_path / "negative.dat", "1::1::5::-50\n1::2::4::10\n")).timestamps[0].tolist() == [
        -50, 10]


def test_a_rating_that_is_not_finite_is_malformed_and_min_rating_must_be_finite(tmp_path):
    # nan < min_rating is False: a NaN rating passed every threshold.
    path = write(tmp_path / "ratings.dat", "1::1::5::10\n1::2::nan::20\n2::3::inf::30\n")
    with pytest.raises(DataFormatError, match="rating 'nan' is not a finite number"):
        load_rating_log(path, min_rating=4)
    dataset = load_rating_log(path, min_rating=4, skip_bad_lines=True)
    assert dataset.skipped_lines == 2
    with pytest.raises(ValueError, match="min_rating must be a finite number, got nan"):
        load_rating_log(path, min_rating=float("nan"))


def test_a_column_named_twice_in_the_header_is_refused(tmp_path):
    # The row kept the last one: items 7 and 8 instead of 1 and 2.
    path = write(tmp_path / "events.csv", "user,item,item\n1,1,7\n1,2,8\n")
    with pytest.raises(DataFormatError, match=r"column\(s\) \['item'\] appear more than once in the header"):
        load_table(path)
    assert load_table(write(tmp_path / "extra.csv", "user,item,note,note\n1,1,a,b\n1,2,c,d\n")).num_items == 2


def test_parquet_ids_are_integers_strings_or_utf8_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    def table(name, users, items):
        path = tmp_path / f"{name}.parquet"
        parquet.write_table(pa.table({"user": users, "item": items}), path)
        return path

    # Bytes ids became their Python repr ("b'item28'"), which no client sends.
    dataset = load_table(table("bytes", pa.array([b"u1", b"u1"], pa.binary()), pa.array([b"item28", b"item29"],
                                                                                       pa.binary())))
    assert dataset.item_vocab.ids(dataset.sequences[0]).tolist() == ["item28", "item29"]
    with pytest.raises(DataFormatError, match=r":2: item id b'\\xff' is not valid UTF-8"):
        load_table(table("undecodable", pa.array([b"u1", b"u1"], pa.binary()), pa.array([b"a", b"\xff"], pa.binary())))
    # Floats ("1.0", and "nan" as an item of its own) are what a column of integers with nulls becomes.
    with pytest.raises(DataFormatError, match=r":1: item id 1.0 is a float; ids must be integers or strings"):
        load_table(table("floats", [1, 1], [1.0, float("nan")]))


# ----------------------------------------------------------------------------- ids exactly as written


def test_parquet_string_ids_are_kept_exactly_as_stored(tmp_path):
    """Ids were stripped: items "a", "a ", " a" loaded as one item, users "u1", "u1 ", " u1" as one user."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "events.parquet"
    parquet.write_table(pa.table({"user": ["u1", "u1 ", " u1", "u1", "u1"], "item": ["a", "a ", " a", "a\u00a0", "b"]}),
                        path)
    dataset = load_table(path)
    assert list(dataset.item_vocab) == ["a", "a ", " a", "a\u00a0", "b"]
    assert dataset.user_ids.tolist() == ["u1", "u1 ", " u1"]


@pytest.mark.parametrize("row, field", [("u1, a", "item id ' a'"), ('u1,"a "', "item id 'a '"),
                                        ("u1 ,b", "user id 'u1 '")])
def test_a_csv_id_with_spaces_around_it_is_refused_not_merged(tmp_path, row, field):
    """" a" was stripped to "a" (and "u1 " to "u1"): ids that differ in the file loaded as one, no word said."""
    path = write(tmp_path / "events.csv", f"user,item\nu1,a\n{row}\nu2,a\n")
    with pytest.raises(DataFormatError, match=re.escape(f"events.csv:3: {field} has spaces or tabs around it")):
        load_table(path)
    dataset = load_table(path, skip_bad_lines=True)
    assert dataset.skipped_lines == 1 and list(dataset.item_vocab) == ["a"]
    # The column is named when it is not called after its role; a tab inside a quoted field is kept.
    with pytest.raises(DataFormatError, match=re.escape("item id (column 'movie') ' a' has spaces")):
        load_table(write(tmp_path / "movies.csv", "user,movie\nu1, a\n"), item_column="movie")
    assert list(load_table(write(tmp_path / "tab.csv", 'user,item\nu1,"b\tc"\n')).item_vocab) == ["b\tc"]


def test_a_rating_log_id_with_spaces_around_it_is_refused(tmp_path):
    """"1:: 2::5::10" loaded item " 2" as "2"."""
    path = write(tmp_path / "ratings.dat", "1::2::5::10\n1:: 2::5::20\n")
    with pytest.raises(DataFormatError, match=re.escape("ratings.dat:2: item id ' 2' has spaces or tabs around it")):
        load_rating_log(path)
    # A file written with ", " between its fields is told how to read it, and then reads.
    path = write(tmp_path / "ratings.csv", "1, 10, 5, 100\n2, 11, 4, 200\n")
    with pytest.raises(DataFormatError, match=re.escape("rewrite it with ',' alone, or read a rating log with sep=', '")):
        load_rating_log(path)
    assert list(load_rating_log(path, sep=", ").item_vocab) == [10, 11]


@pytest.mark.parametrize("fmt, text, line, shown", [
    ("pairs", "u1 a\nu1 a\x00\nu1 b\n", 2, r"item id 'a\x00' holds the control character '\x00' at position 2"),
    ("sequences", "u1 a b\nu\x1f2 c\n", 2, r"user id 'u\x1f2' holds the control character '\x1f'"),
    ("sequences", "u1 a\x0bb c\n", 1, r"item id 'a\x0bb' holds the control character '\x0b'"),
    ("csv", 'user,item\nu1,a\nu1,"a\x00"\n', 3, r"item id 'a\x00' holds the control character '\x00'"),
    ("ratings", "1::a\x00::5::10\n", 1, r"item id 'a\x00' holds the control character"),
])
def test_ids_holding_control_characters_are_refused(tmp_path, fmt, text, line, shown):
    """"a\\x00" loaded as an id of its own; NumPy's fixed-width strings then dropped the NUL, so the
    export failed (or served "a" for it); "a\\x0bb" was split in two by str.split()."""
    path = write(tmp_path / ("events.csv" if fmt == "csv" else "events.txt"), text)
    load = {"pairs": load_pairs, "sequences": load_sequences, "csv": load_table, "ratings": load_rating_log}[fmt]
    with pytest.raises(DataFormatError, match=re.escape(f"events.{'csv' if fmt == 'csv' else 'txt'}:{line}: {shown}")):
        load(path)


def test_parquet_ids_holding_nul_are_refused(tmp_path):
    """Parquet "a\\x00" and "a" loaded as two items; the export then had two values for key "a"."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "events.parquet"
    parquet.write_table(pa.table({"user": ["u1"] * 3, "item": ["a\x00", "a", "b"]}), path)
    with pytest.raises(DataFormatError, match=re.escape(r"events.parquet:1: item id 'a\x00' holds the control "
                                                        r"character '\x00' at position 2")):
        load_table(path)


def test_one_long_user_id_does_not_multiply_the_memory_of_all(tmp_path):
    """user_ids was a fixed-width unicode array: one 2,000-character user id made every user's
    id take 8 kB."""
    path = write(tmp_path / "pairs.txt", "".join(f"u{k} i{k}\n" for k in range(500)) + "x" * 2000 + " i1\n")
    dataset = load_pairs(path)
    assert dataset.user_ids.nbytes < 10 * 501 and dataset.user_ids.tolist()[-1] == "x" * 2000
    assert dataset.item_vocab.ids(np.arange(1, 501)).nbytes < 10 * 500
