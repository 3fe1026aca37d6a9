"""Adapter registry: importing this package registers every adapter family.

Public API: ``build_adapter_config``, ``inject_adapter``, ``save_adapter``, ``load_adapter``.
"""

from comol.adapters.base import (  # noqa: F401
    ADAPTER_PREFIX,
    AdapterConfig,
    AdapterLinear,
    LowRankConfig,
    adapter_config_class,
    aux_loss,
    build_adapter_config,
    is_adapter_name,
    register_adapter,
    registered_adapters,
    token_mask,
)
from comol.adapters import lora, comol  # noqa: F401,E401  (registration side effects)
from comol.adapters.inject import (  # noqa: F401
    adapter_state_dict,
    count_parameters,
    inject_adapter,
    load_adapter,
    save_adapter,
)
