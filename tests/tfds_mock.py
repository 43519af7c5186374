"""Shared test helper: real TFDS metadata for a dataset whose records tfds.testing.mock_data fakes."""

from pathlib import Path

import tensorflow_datasets as tfds


def write_mock_metadata(tfds_name: str, data_dir: Path, num_examples: int) -> None:
    """Write the dataset's real metadata (features, one train split of `num_examples`) to data_dir, so
    `mock_data(policy=USE_FILES)` serves it like a prepared dataset."""
    builder = tfds.builder(tfds_name, data_dir=str(data_dir))
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, split="train", filetype_suffix="tfrecord",
    )
    split = tfds.core.SplitInfo(name="train", shard_lengths=[num_examples], num_bytes=0, filename_template=template)
    builder.info.set_splits(tfds.core.SplitDict([split]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
