"""Data: prompt template, row loading (local file or hub id), toy_math generator, datamodule."""

from comol.data.datamodule import IGNORE_INDEX, SFTDataModule, collate_left, dataset_splits, encode_example  # noqa: F401
from comol.data.loading import load_rows  # noqa: F401
from comol.data.prompts import build_prompt  # noqa: F401
from comol.data.toy_math import generate_toy_math, toy_math_splits  # noqa: F401
