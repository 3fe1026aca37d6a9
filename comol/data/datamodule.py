"""Tokenization (prompt template -> ids -> loss mask), left-padded or packed collation and the datamodule."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from comol.data.clip import clip_row
from comol.data.eval_split import eval_split
from comol.data.loading import drop_rows_in, load_rows
from comol.data.packing import check_packable, collate_packed, layout_for, pack_bins, pack_rows
from comol.data.pinned import train_source
from comol.data.prompts import build_prompt
from comol.data.toy_math import toy_math_splits
from comol.errors import ConfigError
from comol.training.distributed import global_order_sampler
from comol.training.sampler import LengthGroupedSampler, PackedSampler, row_permutation

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def encode_example(row: Mapping[str, Any], tokenizer, max_length: int, train_on_prompt: bool = True) -> dict:
    """Training features for one row: ids of prompt + output + EOS, truncated to ``max_length``.

    The prompt is tokenised on its own, exactly as evaluation tokenises it (special tokens such as a
    BOS included), and the output is appended without special tokens: the tokens a model is trained on
    up to "### Response:" are by construction the tokens it is later prompted with, whatever the
    tokenizer would merge across the boundary. EOS is appended as an id, so it is learned even when
    the tokenizer's pad token is EOS (padding is masked by position in ``collate_left``).
    Labels equal the ids; with ``train_on_prompt=False`` the prompt positions are IGNORE_INDEX.
    Fields far longer than ``max_length`` tokens are cut before tokenising (comol/data/clip.py).
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token: training "
                          f"text is prompt + output + EOS")
    row = clip_row(row, max_length, tokenizer)
    prompt_ids = tokenizer(build_prompt(row))["input_ids"]
    output_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(output_ids) + [tokenizer.eos_token_id])[:max_length]
    labels = list(ids)
    if not train_on_prompt:
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": ids, "labels": labels}


def check_max_length(max_length: int, tokenizer) -> None:
    """``dataset.max_length`` must fit the backbone's context (``load_backbone`` copies the model's
    max_position_embeddings into ``tokenizer.model_max_length``)."""
    context = getattr(tokenizer, "model_max_length", None)
    if context and max_length > context:
        raise ConfigError(f"dataset.max_length={max_length} is invalid: the backbone's context length is {context}")


def collate_left(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: pads get attention 0 and label IGNORE_INDEX. Padding is told apart by position
    (each row's length), never by token id: with pad == EOS the learned EOS keeps its label.

    The first label of every row is IGNORE_INDEX too: nothing of the row precedes its first token, and
    the causal-LM loss (labels shifted by one) would otherwise train the last *pad* position to predict
    it, one spurious term per padded row. So every row contributes the same loss terms whatever it is
    batched with, padded or packed (comol/data/packing.py)."""
    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        ids.append([pad_id] * pad + list(f["input_ids"]))
        mask.append([0] * pad + [1] * len(f["input_ids"]))
        labels.append([IGNORE_INDEX] * (pad + 1) + list(f.get("labels", f["input_ids"]))[1:])
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def dataset_splits(cfg: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Raw rows per split ('train', 'val' and, for generated data, 'test') for a dataset config node."""
    source = cfg.get("source")
    if source == "toy_math":
        return toy_math_splits(cfg["train_size"], cfg["val_size"], cfg.get("test_size", 0),
                               seed=cfg.get("data_seed", 0), max_operand=cfg.get("max_operand", 9))
    if source == "files":
        out = {"train": load_rows(train_source(cfg), split=cfg.get("split", "train"))}
        out["val"] = load_rows(cfg["val"]) if cfg.get("val") else []
        if cfg.get("drop_val_rows") and out["val"]:
            out["train"] = drop_rows_in(out["train"], out["val"], f"dataset={cfg.get('name')}")
        return out
    if source == "eval_split":
        return eval_split(cfg)
    raise ConfigError(f"dataset.source={source!r} is invalid: expected 'toy_math', 'files' or 'eval_split'")


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: rows -> Alpaca prompt -> tokens -> left-padded or packed batches.

    ``dataset.packing=true``: training micro-batches are packs of rows within ``dataset.packing_tokens``
    real tokens (default batch_size x max_length), laid out for ``attn_implementation``
    (comol/data/packing.py). ``dataset.group_by_length=true``: padded batches of rows of similar length
    (comol/training/sampler.py). Validation batches are always left-padded."""

    def __init__(self, cfg: Mapping[str, Any], tokenizer, seed: int = 0, splits: dict[str, list[dict]] | None = None,
                 attn_implementation: str | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.splits = splits
        #: decides the packed layout; None: read off the trained model's config when the loader is built
        self.attn_implementation = attn_implementation
        self.train_features: list[dict] = []
        self.val_features: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        check_max_length(int(self.cfg["max_length"]), self.tokenizer)
        check_batching(self.cfg)
        if self.splits is None:
            self.splits = dataset_splits(self.cfg)
        enc = lambda rows: [encode_example(r, self.tokenizer, self.cfg["max_length"], self.cfg["train_on_prompt"])  # noqa: E731
                            for r in rows]
        self.train_features = self._learnable(enc(self.splits["train"]), "train")
        self.val_features = self._learnable(enc(self.splits.get("val", [])), "val")
        if not self.train_features:
            raise ConfigError(f"dataset={self.cfg.get('name')}: the training split is empty")

    def _learnable(self, feats: list[dict], split: str) -> list[dict]:
        """Drop rows with no target token left (prompt longer than max_length with train_on_prompt=false):
        they would give a 0/0 loss."""
        kept = [f for f in feats if any(label != IGNORE_INDEX for label in f["labels"][1:])]
        if len(kept) < len(feats):
            log.warning("dataset=%s %s: dropped %d of %d rows whose prompt fills dataset.max_length=%d",
                        self.cfg.get("name"), split, len(feats) - len(kept), len(feats), self.cfg["max_length"])
        return kept

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _loader(self, feats: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        # shuffled: one seeded global order on any number of processes, resumable mid-epoch
        # (comol/training/sampler.py); the loader's own generator keeps worker seeding off the global RNG
        sampler = None
        if shuffle and self.cfg.get("group_by_length"):
            world, rank = self._world()
            sampler = LengthGroupedSampler([len(f["input_ids"]) for f in feats], self.seed,
                                           group=batch_size * world * GROUP_BATCHES, num_replicas=world, rank=rank)
        elif shuffle:
            sampler = global_order_sampler(feats, self.seed, self.trainer)
        return DataLoader(feats, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(self.seed),
                          num_workers=self.cfg.get("num_workers", 0),
                          collate_fn=lambda b: collate_left(b, self.tokenizer.pad_token_id))

    def layout(self) -> str:
        attn = self.attn_implementation
        if attn is None and self.trainer is not None:
            config = getattr(getattr(self.trainer.lightning_module, "model", None), "config", None)
            attn = getattr(config, "_attn_implementation", None)
        return layout_for(attn)

    def packs(self) -> list[tuple[int, ...]]:
        """The training packs of ``packing_tokens`` real tokens, cut from the seeded row order: greedily for the
        flat layout, bin by bin (``pack_bins``, bins of ``BIN_ROWS`` x max_length tokens) for the bins layout."""
        lengths = [len(f["input_ids"]) for f in self.train_features]
        order = row_permutation(len(lengths), self.seed)
        if self.layout() == "flat":
            return pack_rows(lengths, order, packing_tokens(self.cfg))
        return pack_bins(lengths, order, packing_tokens(self.cfg), BIN_ROWS * int(self.cfg["max_length"]))

    def _packed_loader(self) -> DataLoader:
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer is not None else None
        if model is not None:
            check_packable(model)
        world, rank = self._world()
        sampler = PackedSampler(self.packs(), self.seed, num_replicas=world, rank=rank)
        # bins of up to two rows' worth of tokens: fewer half-empty bins, attention cost still bounded
        layout, width, pad = self.layout(), BIN_ROWS * int(self.cfg["max_length"]), self.tokenizer.pad_token_id
        # batch_size=1 over packs: the resume position (batches x batch_size) counts packs
        return DataLoader(_Rows(self.train_features), batch_size=1, sampler=sampler,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.cfg.get("num_workers", 0),
                          collate_fn=lambda b: collate_packed(b[0], pad, layout=layout, width=width))

    def train_dataloader(self) -> DataLoader:
        if self.cfg.get("packing"):
            return self._packed_loader()
        return self._loader(self.train_features, self.cfg["batch_size"], shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_features:
            return []
        return self._loader(self.val_features, self.cfg.get("eval_batch_size", self.cfg["batch_size"]), shuffle=False)


#: packed "bins" layout: a bin holds at most this many times dataset.max_length tokens
BIN_ROWS = 2
#: dataset.group_by_length sorts rows by length inside chunks of this many (global) batches
GROUP_BATCHES = 50


class _Rows:
    """The training features, indexed by a pack (a tuple of row indices) -> the list of its rows."""

    def __init__(self, feats: list[dict]):
        self.feats = feats

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, pack: tuple[int, ...]) -> list[dict]:
        return [self.feats[i] for i in pack]


def packing_tokens(cfg: Mapping[str, Any]) -> int:
    """``dataset.packing_tokens``, or batch_size x max_length when null."""
    value = cfg.get("packing_tokens")
    return int(value) if value is not None else int(cfg["batch_size"]) * int(cfg["max_length"])


def check_batching(cfg: Mapping[str, Any]) -> None:
    """The packing / grouping keys: types, ranges, and not both."""
    for key in ("packing", "group_by_length"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"dataset.{key}={cfg.get(key)!r} is invalid: expected true or false")
    if cfg.get("packing") and cfg.get("group_by_length"):
        raise ConfigError("dataset.group_by_length=true is invalid with dataset.packing=true: packed batches have "
                          "no padding to save; pick one")
    value = cfg.get("packing_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < int(cfg["max_length"])):
        raise ConfigError(f"dataset.packing_tokens={value!r} is invalid: expected null (batch_size x max_length) or "
                          f"an integer >= dataset.max_length={cfg['max_length']}")
