"""Backbones (hub id / local path / random-init tiny), the LightningModule and the offline tokenizer."""

from comol.models.backbone import build_meta_model, load_backbone, load_tokenizer  # noqa: F401
