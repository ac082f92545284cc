"""The command line (`python -m experiments.cli`): strategies by name, and the model list."""

from __future__ import annotations

import pytest

import decoding
import drafting
from experiments import cli


def test_strategies_by_name():
    assert isinstance(cli.build_strategy("ar"), decoding.Autoregressive)
    spec = cli.build_strategy("spec", gamma=3, lenience=0.5)
    assert isinstance(spec, decoding.Speculative) and isinstance(spec.drafter, drafting.DraftModel)
    assert (spec.gamma, spec.lenience) == (3, 0.5)
    tree = cli.build_strategy("layerskip-tree", layers=2, depth=3, top_k=2, total_tokens=5)
    assert tree.tree == drafting.DynamicTree(3, 2, 5) and tree.drafter == drafting.LayerSkip(layers=2)
    assert isinstance(cli.build_strategy("pld").drafter, drafting.PromptLookup)
    ht = cli.build_strategy("ht", gamma=3)
    assert isinstance(ht, decoding.Speculative) and isinstance(ht.drafter, drafting.HiddenTransfer) and ht.gamma == 3
    ht_tree = cli.build_strategy("ht-tree", branching=(3, 2), pseudo="separate")
    assert ht_tree.tree == drafting.TreeTopology.from_branching((3, 2)) and ht_tree.drafter.pseudo == "separate"
    with pytest.raises(SystemExit, match="unknown strategy 'beam'; choose from ar, spec, tree"):
        cli.build_strategy("beam")


def test_models_lists_the_registry(capsys):
    cli.main(["models"])
    names = [e.name for e in decoding.registry.list_models()]
    out = capsys.readouterr().out
    assert names and all(name in out for name in names)
