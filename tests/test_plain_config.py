"""``comol.schema_base.plain_config``: the one helper that turns a config node into plain Python values
(used by the job, the schema checks, adapter presets, the sweep lister and the estimator)."""

import pytest
from omegaconf import OmegaConf

from comol.schema_base import SchemaError, plain_config


def test_nodes_resolve_mappings_copy_scalars_pass_through():
    cfg = OmegaConf.create({"a": {"r": 8, "alpha": "${a.r}"}, "tags": ["x", "${a.r}"], "s": 3})
    assert plain_config(cfg.a) == {"r": 8, "alpha": 8} and type(plain_config(cfg.a)) is dict
    assert plain_config(cfg.tags) == ["x", 8] and type(plain_config(cfg.tags)) is list
    src = {"r": 4}
    out = plain_config(src)
    assert out == src and out is not src
    assert plain_config(cfg.s) == 3 and plain_config(None) is None


def test_unresolvable_value_is_one_line_naming_the_key():
    cfg = OmegaConf.create({"model": {"name": "???"}, "b": "${nope}"})
    with pytest.raises(SchemaError) as err:
        plain_config(cfg.model)
    assert str(err.value).startswith("model.name cannot be resolved") and "\n" not in str(err.value)
    with pytest.raises(SchemaError, match=r"^b cannot be resolved"):
        plain_config(OmegaConf.create({"a": 1, "b": "${nope}"}))
