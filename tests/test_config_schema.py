"""Every key of the run configuration (configs/schema.py) against values of the wrong type, outside its range or
outside its enum, and keys that do not exist: each is one line before any compute, as `launch.train` reports it
(launch.train.config_error: the schema at composition, then trainer.loop.check_config)."""
import dataclasses
import enum
import typing

import pytest
from hypothesis import given, settings, strategies as st

from configs import schema
from launch.train import config_error
from trainer.loop import _RANGES


def _leaves(node=schema.TrainConfig, prefix=""):
    """(dotted key, annotation) of every leaf field of the schema."""
    hints = typing.get_type_hints(node, globalns=vars(schema))
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


LEAVES = dict(_leaves())
TYPED = {k: v for k, v in LEAVES.items() if v in (int, float, bool) or isinstance(v, type) and issubclass(v, enum.Enum)}


def _wrong_values(kind):
    """Values that no field of this type accepts."""
    if kind is bool:
        return st.sampled_from(["maybe", "tru", "yes please", "[1]"])
    if kind in (int, float):
        return st.sampled_from(["abc", "[1,2]", "{a:1}", "1x"])
    return st.sampled_from(["not-a-member", "", "CPU!", "[x]"])        # enums


def test_every_typed_key_is_covered():
    """The schema's typed keys are what the property below draws from (none silently left out)."""
    assert {"hal.compile", "trainer.on_save_error", "trainer.precision", "optim.schedule", "trainer.resume",
            "trainer.steps", "optim.lr", "hal.platform"} <= set(TYPED)
    assert len(TYPED) >= 40


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_a_wrong_type_or_member_is_one_line(data):
    key = data.draw(st.sampled_from(sorted(TYPED)))
    value = data.draw(_wrong_values(TYPED[key]))
    message, _ = config_error([f"{key}={value}" if value else f"{key}=''"])
    assert message and "\n" not in message, (key, value, message)
    assert key.split(".")[-1] in message, (key, message)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.data())
def test_a_value_outside_its_range_is_one_line(data):
    section, key = data.draw(st.sampled_from(sorted(_RANGES)))
    lo, hi = _RANGES[(section, key)]
    if isinstance(lo, int):
        value = data.draw(st.integers(max_value=lo - 1, min_value=lo - 10**6))
    else:
        value = data.draw(st.one_of(st.floats(max_value=lo - 1e-6, min_value=lo - 1e6),
                                    st.floats(min_value=hi * 1.001 + 1e-6, max_value=hi * 10 + 1)
                                    if hi < 1e30 else st.nothing()))
    message, _ = config_error([f"{section}.{key}={value}"])
    assert message and "\n" not in message and f"{section}.{key}" in message, (section, key, value, message)


@pytest.mark.parametrize("override", ["trainer.foo=1", "+trainer.foo=1", "+hal.neuron.x=1", "modle=tiny",
                                      "hal=tpu", "model.rope_theta=fast", "trainer.async_save=sometimes",
                                      "hal.distributed=maybe", "seed=-1", "trainer.micro_batch=x"])
def test_unknown_keys_and_mixed_keys_are_one_line(override):
    message, _ = config_error([override])
    assert message and "\n" not in message, (override, message)


def test_good_overrides_pass():
    assert config_error(["hal=torch", "hal.compile=true", "trainer.async_save=false", "optim.schedule=constant",
                         "trainer.on_save_error=continue", "hal.distributed=auto"])[0] is None
    assert config_error(["hal.mesh={data:2,fsdp:4}", "model=llama3.2-1b"])[0] is None     # dict-valued keys
    message, _ = config_error(["hal.mesh={data:x}"])
    assert message is None or "\n" not in message          # the mesh's axes are checked when it is built
