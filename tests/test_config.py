import pytest

from eplbd.config import EplbConfig, make_eplb_config
from eplbd.errors import ConfigError


def test_defaults_mirror_vllm():
    c = EplbConfig()
    assert (c.window_size, c.step_interval, c.num_redundant_experts) == (1000, 3000, 0)
    assert (c.log_balancedness, c.log_balancedness_interval, c.policy) == (False, 1, "default")


@pytest.mark.parametrize("field,value", [
    ("window_size", 0), ("step_interval", -5), ("num_redundant_experts", -1),
    ("log_balancedness_interval", 0), ("policy", "nosuch"), ("communicator", "carrier_pigeon"),
    ("min_gain", 2.0),
])
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(ConfigError) as ei:
        make_eplb_config(**{field: value})
    assert field in str(ei.value) and repr(value) in str(ei.value)


def test_async_with_nccl_rejected():
    with pytest.raises(ConfigError, match="torch_nccl"):
        make_eplb_config(use_async=True, communicator="torch_nccl")
    assert make_eplb_config(use_async=False, communicator="torch_nccl").communicator == "torch_nccl"


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="windowsize"):
        make_eplb_config(windowsize=3)
