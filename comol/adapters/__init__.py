"""Adapter registry: importing this package imports every module in it, and each adapter
family registers itself with ``@register_adapter("<name>")`` (one family per file).

Public API: ``build_adapter_config``, ``inject_adapter``, ``save_adapter``, ``load_adapter``.
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

_INFRA = {"base", "inject", "context", "routing_stats"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
