"""benchmarks.preble_ablation: its variants are valid configs, and its summary is a median with min-max."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.preble_ablation import VARIANTS, medians
from preble_router.policies import PrebleConfig
from preble_router.policies.preble import CostModel


def test_every_variant_builds_a_config_and_queue_rules_pin_the_queue_model():
    for name, fields in VARIANTS.items():
        config = replace(PrebleConfig(), **fields)
        if name.startswith("queue"):
            assert config.cost_model is CostModel.QUEUE, name
    assert replace(PrebleConfig(), **VARIANTS["default"]) == PrebleConfig()


def test_medians_over_seeds():
    runs = {"tool_use:4:0": {"a": (1.0, 9.0)}, "tool_use:4:1": {"a": (3.0, 9.0)}, "tool_use:4:2": {"a": (2.0, 9.0)}}
    assert medians(runs) == ["tool_use:4: a 2.000 [1.000-3.000]"]
