"""comol.adapters: mixture-of-LoRA adapters for Hugging Face causal LMs, usable on their own (plain Python:
nothing here reads a config tree or imports Hydra, OmegaConf, Lightning, or comol's data/eval code).

    from comol.adapters import CoMoLConfig, inject_adapter, load_adapter
    inject_adapter(model, CoMoLConfig())          # the paper's CoMoL: r=16, N=8 on q,k,v,o,down
    loss = model(input_ids=ids, labels=ids).loss  # LM loss + aux_loss_coeff x routing loss
    model.save_pretrained(out_dir)                # the adapter only; load_adapter(fresh_model, out_dir)

Each config dataclass holds its method's published settings as defaults. Importing this package imports
every module in it, and each adapter family registers itself with ``@register_adapter("<name>")``
(one family per file), so ``inject_adapter(model, {"name": "mola", "top_k": 1})`` works as well.
See docs/adapters_elsewhere.md for HF Trainer, TRL and notebooks.
"""

import importlib
import pkgutil

from comol.adapters.base import (  # noqa: F401
    ADAPTER_PREFIX,
    AdapterConfig,
    AdapterLinear,
    LowRankConfig,
    adapter_config_class,
    PAPER_TARGETS,
    PRESET_KEYS,
    adapter_defaults,
    aux_loss,
    build_adapter_config,
    is_adapter_name,
    register_adapter,
    registered_adapters,
)
from comol.adapters.context import AdapterContext, adapter_context, attach_optimizer  # noqa: F401
from comol.adapters.inject import (  # noqa: F401
    adapter_state_dict,
    count_parameters,
    inject_adapter,
    load_adapter,
    save_adapter,
)

from comol.adapters.adamole import AdaMoleConfig  # noqa: F401,E402  (the public config classes)
from comol.adapters.comol import CoMoLConfig  # noqa: F401,E402
from comol.adapters.comol_sh import CoMoLShConfig  # noqa: F401,E402
from comol.adapters.denselora import DenseLoraConfig  # noqa: F401,E402
from comol.adapters.flylora import FlyLoraConfig  # noqa: F401,E402
from comol.adapters.hydralora import HydraLoraConfig  # noqa: F401,E402
from comol.adapters.lora import LoraConfig  # noqa: F401,E402
from comol.adapters.mola import MolaConfig, MoleConfig  # noqa: F401,E402
from comol.adapters.molora import MoLoRAConfig  # noqa: F401,E402
from comol.adapters.parallel_adapter import ParallelAdapterConfig  # noqa: F401,E402
from comol.adapters.prompt import PromptTuningConfig  # noqa: F401,E402
from comol.adapters.softmoa import SoftMoAConfig  # noqa: F401,E402
from comol.adapters.sparsemoa import SparseMoAConfig  # noqa: F401,E402
from comol.adapters.unipeft import UniPEFTConfig  # noqa: F401,E402

_INFRA = {"base", "inject", "context", "routing_stats", "gating"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
