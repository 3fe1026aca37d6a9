"""Lightning's WandbLogger without a deprecated argument.

Lightning 2.6 always passes ``anonymous=None`` to ``wandb.init``, which makes every job print
"The anonymous setting has no effect"; this subclass leaves the argument out. Nothing else changes.
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
