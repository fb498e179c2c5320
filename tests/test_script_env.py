"""The shipped script's environment inputs are held to the same rules as pgolf's options: SEED to
the recipe's seed range (dataclasses.replace skips the recipe's checks), PGOLF_DEVICE (and every
device string) to auto | cpu | cuda | cuda:N, each a one-line UserError, never a traceback."""

from __future__ import annotations

import pytest

from pipeline.distributed import init
from pipeline.errors import UserError
from pipeline.script_entry import env_seed


def test_seed_from_the_environment_keeps_the_recipes_range():
    assert env_seed("0") == 0 and env_seed("4294967295") == 2**32 - 1 and env_seed(" 42 ") == 42
    for bad in ("-5", "99999999999", "abc", "1.5"):
        with pytest.raises(UserError, match=r"SEED='.*' is not a seed; give a whole number from 0 to 4294967295"):
            env_seed(bad)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "cpu:0", ""])
def test_a_device_that_is_not_one_is_a_user_error(device):
    with pytest.raises(UserError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        init(device)
