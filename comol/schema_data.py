"""Schema of the ``dataset`` group: one class per data source (``dataset.source``), each with the keys its
YAMLs use (comol/conf/dataset/*.yaml). The rows themselves are checked when they are read (comol/data/checks.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from comol.errors import ConfigError
from comol.schema_base import Key, NonEmptyStr, NonNegInt, PosInt, Schema, Seed

TOY_SOURCE = "toy_math"
SPLIT_SOURCE = "eval_split"
FILES_SOURCE = "files"
SOURCES = (TOY_SOURCE, FILES_SOURCE, SPLIT_SOURCE)   # what comol.data.datamodule.dataset_splits reads
FILE_PRESETS = "dataset=math14k dataset.train=<file> (or dataset=codealpaca20k)"
#: generated rows are built in memory at the start of a run: more than this is a typo, not an experiment
MAX_GENERATED_ROWS = 1_000_000


class DatasetCommon(Schema):
    """Keys every data source has: tokenisation and batching."""

    name: NonEmptyStr = Key("the dataset's name (run names, reports)")
    max_length: Annotated[int, Field(ge=2)] = Key("tokens per training row (prompt + answer + EOS)",
                                                  expected="an integer >= 2 (a prompt token and EOS)")
    train_on_prompt: bool = Key("the loss covers prompt tokens too (paper recipe)", default=True)
    batch_size: PosInt = Key("training micro-batch (per process)")
    eval_batch_size: PosInt | None = Key("validation batch (null: batch_size)", default=None)
    num_workers: Annotated[int, Field(ge=0, le=256)] = Key("DataLoader worker processes", default=0)
    packing: bool = Key("padding-free packs of rows (comol/data/packing.py)", default=False)
    packing_tokens: PosInt | None = Key("real tokens per packed micro-batch (null: batch_size x max_length)",
                                        default=None)
    group_by_length: bool = Key("padded batches of rows of similar length", default=False)

    def train_rows(self) -> int | None:
        """Training rows when the config alone tells (None: read from files)."""
        return None


GeneratedRows = Annotated[int, Field(ge=0, le=MAX_GENERATED_ROWS)]


class ToyMathDataset(DatasetCommon):
    """Generated arithmetic word problems (no files)."""

    source: Literal["toy_math"] = Key("generated rows")
    data_seed: Seed = Key("the rows depend on this, not on the training seed", default=0)
    train_size: Annotated[int, Field(ge=1, le=MAX_GENERATED_ROWS)] = Key("training rows")
    val_size: GeneratedRows = Key("validation rows", default=0)
    test_size: GeneratedRows = Key("held-out rows (scored by eval=toy_math)", default=0)
    max_operand: Annotated[int, Field(ge=1, le=10 ** 6)] = Key("largest operand", default=9)
    train: Any = Key("not used (the rows are generated)", default=None)
    val: Any = Key("not used (the rows are generated)", default=None)

    @field_validator("train", "val")
    @classmethod
    def _no_files(cls, v: Any, info) -> Any:
        if v is not None:
            raise ConfigError(f"dataset.{info.field_name}={v!r} is not used by dataset=toy_math (generated rows): "
                              f"to train on a file use {FILE_PRESETS}")
        return v

    def train_rows(self) -> int:
        return self.train_size


class PinnedFile(Schema):
    """A training file pinned by its git blob id (fetched once, verified)."""

    url: NonEmptyStr = Key("where it is downloaded from")
    git_blob: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")] = Key("its git blob id", expected="40 hex digits")
    env: NonEmptyStr | None = Key("the environment variable that overrides it", default=None)
    local: NonEmptyStr | None = Key("a local copy used when present", default=None)


class FilesDataset(DatasetCommon):
    """Training rows from a local .json/.jsonl file or a hub dataset id."""

    source: Literal["files"] = Key("a training file or hub dataset")
    train: NonEmptyStr = Key("a .json/.jsonl path or a hub dataset id", expected="a .json/.jsonl path or a hub "
                                                                                  "dataset id")
    val: NonEmptyStr | None = Key("a validation file (null: no validation)", default=None)
    split: NonEmptyStr = Key("split name when train is a hub id", default="train")
    pinned: PinnedFile | None = Key("the paper's file, used when train is 'pinned' (comol/data/pinned.py)",
                                    default=None)
    drop_val_rows: bool = Key("drop training rows equal to a validation row (logged)", default=False)

    @model_validator(mode="after")
    def _pinned_has_a_spec(self) -> "FilesDataset":
        if self.train == "pinned" and self.pinned is None:
            raise ConfigError("dataset.train='pinned' is invalid without dataset.pinned: expected a url and git_blob")
        return self


class EvalSplitDataset(DatasetCommon):
    """A seeded train/val/test split of evaluation files (comol/data/eval_split.py)."""

    source: Literal["eval_split"] = Key("a seeded split of evaluation files")
    data_dir: NonEmptyStr | None = Key("folder of the set files", default=None)
    sets: dict[str, NonEmptyStr] = Key("{set name: file}", expected="a mapping {set name: file} (source=eval_split)",
                                       min_length=1)
    data_seed: Seed = Key("the split depends on this, not on the training seed", default=0)
    train_per_set: PosInt = Key("training rows per set")
    val_per_set: NonNegInt = Key("validation rows per set", default=0)
    test_per_set: NonNegInt = Key("held-out rows per set (scored by eval=real_commonsense)", default=0)
    split_dir: NonEmptyStr | None = Key("where the split is written (the held-out rows evaluation reads)",
                                        default=None)

    def train_rows(self) -> int:
        return self.train_per_set * len(self.sets)


DatasetConfig = Annotated[Union[ToyMathDataset, FilesDataset, EvalSplitDataset], Field(discriminator="source")]


def has_validation(ds: DatasetCommon) -> bool:
    """Whether the data source gives validation rows at all."""
    if isinstance(ds, ToyMathDataset):
        return ds.val_size > 0
    if isinstance(ds, EvalSplitDataset):
        return ds.val_per_set > 0
    return ds.val is not None
