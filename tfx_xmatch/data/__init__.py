"""Data layer: loading interaction data, splitting it, and feeding it to TensorFlow."""

from tfx_xmatch.data.dataset import PAD_INDEX, EvalExamples, SequenceDataset, Split, pad_histories
from tfx_xmatch.data.inputs import eval_arrays, eval_dataset, sequence_training_dataset, training_arrays
from tfx_xmatch.data.loaders import DataFormatError, load_pairs, load_rating_log, load_sequences
from tfx_xmatch.data.movielens import load_movielens_side_info, load_tfds_movielens_1m
from tfx_xmatch.data.registry import DATASETS, DatasetInfo, load_dataset
from tfx_xmatch.data.splits import SPLITS, leave_one_out, make_split, time_split, user_level
from tfx_xmatch.data.synthetic import (
    make_synthetic,
    planted_cluster_of,
    planted_clusters,
    planted_successor,
)
from tfx_xmatch.data.tfrecord import (
    damaged_file_named,
    feature_spec,
    read_tfrecords,
    read_training_tfrecords,
    shard_paths,
    write_split_tfrecords,
    write_tfrecords,
)
from tfx_xmatch.data.vocabulary import Vocabulary

__all__ = [
    "DATASETS",
    "PAD_INDEX",
    "SPLITS",
    "DataFormatError",
    "DatasetInfo",
    "EvalExamples",
    "SequenceDataset",
    "Split",
    "Vocabulary",
    "damaged_file_named",
    "eval_arrays",
    "eval_dataset",
    "feature_spec",
    "leave_one_out",
    "load_dataset",
    "load_movielens_side_info",
    "load_pairs",
    "load_rating_log",
    "load_sequences",
    "load_tfds_movielens_1m",
    "make_split",
    "make_synthetic",
    "pad_histories",
    "planted_cluster_of",
    "planted_clusters",
    "planted_successor",
    "read_tfrecords",
    "read_training_tfrecords",
    "sequence_training_dataset",
    "shard_paths",
    "time_split",
    "training_arrays",
    "user_level",
    "write_split_tfrecords",
    "write_tfrecords",
]
