"""Tokenization (prompt template -> ids -> loss mask), left-padded collation and the datamodule."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from comol.data.clip import clip_row
from comol.data.eval_split import eval_split
from comol.data.loading import drop_rows_in, load_rows
from comol.data.pinned import train_source
from comol.data.prompts import build_prompt
from comol.data.toy_math import toy_math_splits
from comol.errors import ConfigError
from comol.training.distributed import global_order_sampler

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
    if max_length < 2:
        raise ConfigError(f"dataset.max_length={max_length} is invalid: expected >= 2 (a prompt token and EOS)")
    if context and max_length > context:
        raise ConfigError(f"dataset.max_length={max_length} is invalid: the backbone's context length is {context}")


def collate_left(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: pads get attention 0 and label IGNORE_INDEX. Padding is told apart by position
    (each row's length), never by token id: with pad == EOS the learned EOS keeps its label."""
    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        ids.append([pad_id] * pad + list(f["input_ids"]))
        mask.append([0] * pad + [1] * len(f["input_ids"]))
        labels.append([IGNORE_INDEX] * pad + list(f.get("labels", f["input_ids"])))
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
        if not cfg.get("train"):
            raise ConfigError("dataset.train is missing: expected a .json/.jsonl path or a hub dataset id")
        out = {"train": load_rows(train_source(cfg), split=cfg.get("split", "train"))}
        out["val"] = load_rows(cfg["val"]) if cfg.get("val") else []
        if cfg.get("drop_val_rows") and out["val"]:
            out["train"] = drop_rows_in(out["train"], out["val"], f"dataset={cfg.get('name')}")
        return out
    if source == "eval_split":
        return eval_split(cfg)
    raise ConfigError(f"dataset.source={source!r} is invalid: expected 'toy_math', 'files' or 'eval_split'")


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: rows -> Alpaca prompt -> tokens -> left-padded batches."""

    def __init__(self, cfg: Mapping[str, Any], tokenizer, seed: int = 0, splits: dict[str, list[dict]] | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.splits = splits
        self.train_features: list[dict] = []
        self.val_features: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        check_max_length(int(self.cfg["max_length"]), self.tokenizer)
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
        kept = [f for f in feats if any(label != IGNORE_INDEX for label in f["labels"])]
        if len(kept) < len(feats):
            log.warning("dataset=%s %s: dropped %d of %d rows whose prompt fills dataset.max_length=%d",
                        self.cfg.get("name"), split, len(feats) - len(kept), len(feats), self.cfg["max_length"])
        return kept

    def _loader(self, feats: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        # shuffled: one seeded global order on any number of processes, resumable mid-epoch
        # (comol/training/sampler.py); the loader's own generator keeps worker seeding off the global RNG
        sampler = global_order_sampler(feats, self.seed, self.trainer) if shuffle else None
        return DataLoader(feats, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(self.seed),
                          num_workers=self.cfg.get("num_workers", 0),
                          collate_fn=lambda b: collate_left(b, self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_features, self.cfg["batch_size"], shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_features:
            return []
        return self._loader(self.val_features, self.cfg.get("eval_batch_size", self.cfg["batch_size"]), shuffle=False)
