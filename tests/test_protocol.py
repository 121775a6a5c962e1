"""One vocabulary: the packages that may not import `ponderttt.eval.protocol` (gating, models) define the same
actions, step counts, protocols and adapter kinds, and the published cost convention is the same everywhere."""

import subprocess
import sys

import pytest

from ponderttt.eval import protocol


def test_gating_actions_are_the_protocols():
    from ponderttt.gating import ACTION_NAMES, NUM_STEPS, UPDATE_1, CostTable

    assert ACTION_NAMES == protocol.ACTION_NAMES and NUM_STEPS == protocol.ACTION_STEPS
    assert UPDATE_1 == protocol.UPDATE_ACTION
    assert CostTable.published().costs == tuple(protocol.published_cost(k) for k in protocol.ACTION_STEPS)


def test_models_protocols_and_adapter_kinds_are_the_protocols():
    from ponderttt.models import ADAPTER_KINDS, PROTOCOLS

    assert sorted(PROTOCOLS) == sorted(protocol.PROTOCOLS)
    assert sorted(ADAPTER_KINDS) == sorted(protocol.ADAPTER_KINDS)


def test_the_cost_model_and_the_app_use_the_protocol():
    from ponderttt.eval import cost
    from ponderttt.train import compare, config, heldout

    assert cost.ACTION_NAMES is protocol.ACTION_NAMES and cost.ADAPTER_KINDS is protocol.ADAPTER_KINDS
    assert [cost.published_cost(name) for name in protocol.ACTION_NAMES] == [1.0, 3.0, 5.0, 9.0]
    assert config.FIXED_METHODS is protocol.ACTION_NAMES and config.PROTOCOLS is protocol.PROTOCOLS
    assert compare.ACTION_NAMES is protocol.ACTION_NAMES
    assert heldout.ACTION_PASSES == ((0.0, 0), (1.0, 1), (1.0, 2), (1.0, 4))


def test_the_protocol_module_is_pure_python():
    code = "import sys, ponderttt.eval.protocol\nprint(sorted(m for m in ('numpy', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative int"):
            protocol.published_cost(bad)
