"""The decode loop's greedy fast path: a greedy step draws no random numbers (no key split, no
threefry kernels per step); a sampled step still does, from the same keys as before."""

import jax
import numpy as np
import pytest

import decoding
from decoding import generation
from drafting import DraftModel, PromptLookup
from tiny import tiny_model

RANDOM_PRIMITIVES = ("random_split", "random_bits", "threefry2x32", "random_fold_in")


def _primitives(jaxpr) -> set[str]:
    """Every primitive of `jaxpr` and of the jaxprs inside it (loops, conds, pjit, custom rules)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for p in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(p, "jaxpr", p)  # a ClosedJaxpr holds its Jaxpr in .jaxpr
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def _step_primitives(strategy, sampling, draft=None) -> set[str]:
    model = tiny_model()
    prep = generation.prepare(model, [[5, 6, 7, 5, 6]], strategy=strategy, sampling=sampling, max_new_tokens=4,
                              eos_token_id=(), chat=False, draft=draft)
    state = jax.eval_shape(lambda p, k: prep.strategy.init(prep.ctx, p, prep.prompt, prep.lengths, k),
                           prep.params, prep.key)
    jaxpr = jax.make_jaxpr(lambda p, s: prep.strategy.step(prep.ctx, p, s))(prep.params, state)
    return _primitives(jaxpr.jaxpr)


@pytest.mark.parametrize("name", ["autoregressive", "speculative-prompt-lookup", "speculative-draft-model",
                                  "entropy-adaptive"])
def test_a_greedy_step_draws_no_random_numbers_and_a_sampled_one_does(name):
    draft = tiny_model(seed=1) if name.endswith("draft-model") or name == "entropy-adaptive" else None
    strategy = {"autoregressive": decoding.Autoregressive(),
                "speculative-prompt-lookup": decoding.Speculative(PromptLookup(), gamma=2),
                "speculative-draft-model": decoding.Speculative(DraftModel(), gamma=2),
                "entropy-adaptive": decoding.EntropyAdaptive(threshold=1.0)}[name]
    greedy = _step_primitives(strategy, decoding.Greedy(), draft)
    assert not greedy & set(RANDOM_PRIMITIVES), sorted(greedy & set(RANDOM_PRIMITIVES))
    sampled = _step_primitives(strategy, decoding.Sampling(temperature=0.7), draft)
    assert sampled & set(RANDOM_PRIMITIVES)


def test_round_keys_split_as_before_when_sampling_and_pass_the_key_through_when_greedy():
    from decoding.strategy import Context, round_keys
    from decoding.tokens import StopRule

    key = jax.random.PRNGKey(3)
    base = dict(target=None, rule=StopRule(), max_new_tokens=1, capacity=8)
    sampled = round_keys(Context(sampling=decoding.Sampling(), **base), key, 2)
    np.testing.assert_array_equal(np.stack(sampled), jax.random.split(key, 3))
    greedy = round_keys(Context(sampling=decoding.Greedy(), **base), key, 2)
    assert len(greedy) == 3 and all(k is key for k in greedy)
