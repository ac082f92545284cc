"""The forward contract of decoding.model on tiny random models.

Every property algorithms rely on is checked against either a full pass of our own model or
the independent numpy reference in tests/tiny.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding
from decoding.strategy import prefill
from decoding.model import check_params
from tiny import jit_forward, jit_run_layers, numpy_forward, tiny_model

ATOL = 2e-5  # our model against itself (different block shapes), fp32
REF_ATOL = 1e-4  # our fp32 model against the float64 numpy reference
B, T, CAP = 2, 12, 16  # most tests share these shapes so compiled programs are reused


def arange_positions(b, t, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


def fwd(model, tokens, positions, cache, **kwargs):
    return jit_forward(model.config, model.params, jnp.asarray(tokens, jnp.int32),
                       jnp.asarray(positions, jnp.int32), cache, **kwargs)


def full_logits(model, tokens):
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    return np.asarray(fwd(model, tokens, arange_positions(b, t), model.init_cache(b, CAP)).logits)


def random_tokens(seed, shape=(B, T)):
    return np.random.RandomState(seed).randint(0, 96, size=shape).astype(np.int32)



@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, qkv_bias=True, num_kv_heads=4)])
def test_full_pass_matches_numpy_reference(overrides):
    model = tiny_model(**overrides)
    tokens = random_tokens(0)
    got = full_logits(model, tokens)
    assert got.shape == (B, T, 96) and got.dtype == np.float32
    for b in range(B):
        want, _ = numpy_forward(model.config, model.params, tokens[b])
        np.testing.assert_allclose(got[b], want, atol=REF_ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 3], [3, 4, 1, 4], [1, 3, 4, 4]])
def test_incremental_equals_one_full_pass(chunks):
    """Prefill then token by token, and chunks of various T, all equal one full pass."""
    model = tiny_model()
    tokens = random_tokens(1)
    want = full_logits(model, tokens)
    cache = model.init_cache(B, CAP)
    assert cache.k.dtype == jnp.float32  # the cache follows the params' dtype
    got, start = [], 0
    for t in chunks:
        out = fwd(model, tokens[:, start:start + t], arange_positions(B, t, start), cache)
        np.testing.assert_array_equal(np.asarray(out.cache.lengths), np.asarray(cache.lengths) + t)
        cache = out.cache
        got.append(np.asarray(out.logits))
        start += t
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=ATOL, rtol=0)


# A token tree per row: parent index of each node (-1 = child of the committed prefix).
TREES = [
    [-1, 0, 0, 1, 1, 2, 5],  # root, two children, grandchildren, a depth-3 leaf
    [-1, 0, 1, 2, 3, 4, 5],  # a chain: the mask is causal, positions consecutive
]


def tree_tables(parents):
    t = len(parents)
    depth = np.zeros(t, np.int32)
    mask = np.zeros((t, t), bool)
    paths = []
    for i, p in enumerate(parents):
        path = [i] if p < 0 else paths[p] + [i]
        paths.append(path)
        depth[i] = len(path) - 1
        mask[i, path] = True
    return depth, mask, paths


def test_tree_mask_gives_each_node_the_logits_of_its_path():
    """THE property of tree verification: node i of a block with an ancestor mask and
    positions prefix + depth sees exactly its root-to-node path after the prefix."""
    model = tiny_model()
    rng = np.random.RandomState(3)
    prefix_lens = np.array([4, 3], np.int32)
    padded = rng.randint(0, 96, size=(B, 4)).astype(np.int32)  # row 1's 4th token is garbage
    prefixes = [padded[b, :n] for b, n in enumerate(prefix_lens)]
    cache = fwd(model, padded, arange_positions(B, 4), model.init_cache(B, CAP)).cache
    cache = cache.truncate(jnp.asarray(prefix_lens))

    tables = [tree_tables(p) for p in TREES]
    block = rng.randint(0, 96, size=(B, 7)).astype(np.int32)
    positions = np.stack([prefix_lens[b] + tables[b][0] for b in range(B)])
    mask = np.stack([tables[b][1] for b in range(B)])
    out = fwd(model, block, positions, cache, mask=jnp.asarray(mask))
    tree_logits = np.asarray(out.logits)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), prefix_lens + 7)

    for b in range(B):
        for i, path in enumerate(tables[b][2]):
            seq = np.concatenate([prefixes[b], block[b, path]])
            want, _ = numpy_forward(model.config, model.params, seq)
            np.testing.assert_allclose(tree_logits[b, i], want[-1], atol=REF_ATOL, rtol=0)

    # Commit an accepted path with cache.gather: decoding then continues exactly as if the
    # path had been fed as a plain sequence.
    accepted = [[0, 2, 5, 6], [0, 1]]
    src = np.zeros((B, 4), np.int32)
    n = np.array([len(a) for a in accepted], np.int32)
    for b, a in enumerate(accepted):
        src[b, : len(a)] = a
    committed = out.cache.gather(jnp.asarray(src), jnp.asarray(n), base=jnp.asarray(prefix_lens))
    np.testing.assert_array_equal(np.asarray(committed.lengths), prefix_lens + n)
    nxt = rng.randint(0, 96, size=(B, 1)).astype(np.int32)
    res = fwd(model, nxt, committed.lengths[:, None], committed)
    for b in range(B):
        seq = np.concatenate([prefixes[b], block[b, accepted[b]], nxt[b]])
        want, _ = numpy_forward(model.config, model.params, seq)
        np.testing.assert_allclose(np.asarray(res.logits)[b, 0], want[-1], atol=REF_ATOL, rtol=0)


def test_right_padded_ragged_prefill_matches_each_prompt_alone():
    model = tiny_model()
    rng = np.random.RandomState(4)
    lengths = np.array([2, 7], np.int32)
    padded = rng.randint(0, 96, size=(B, 8)).astype(np.int32)  # garbage after each prompt
    prompts = [padded[b, :n] for b, n in enumerate(lengths)]
    out = fwd(model, padded, arange_positions(B, 8), model.init_cache(B, CAP),
              logit_indices=jnp.asarray(lengths - 1)[:, None])
    assert out.logits.shape == (B, 1, 96)
    # The library's prefill helper does the same and leaves the cursor at the true lengths.
    logits, cache = prefill(model.config, model.params, jnp.asarray(padded), jnp.asarray(lengths),
                            model.init_cache(B, CAP))
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(out.logits)[:, 0], atol=ATOL, rtol=0)
    for b, p in enumerate(prompts):
        alone, _ = numpy_forward(model.config, model.params, p)
        np.testing.assert_allclose(np.asarray(out.logits)[b, 0], alone[-1], atol=REF_ATOL, rtol=0)
        padded_alone, _ = numpy_forward(model.config, model.params, padded[b])
        assert np.abs(padded_alone[len(p) - 1] - alone[-1]).max() < 1e-9  # causal sanity
        if len(p) < 8:  # the padding would change the last logits if it leaked
            assert np.abs(padded_alone[-1] - alone[-1]).max() > 1e-2

    # Decoding after the ragged prefill: stale padding slots must stay invisible.
    nxt = rng.randint(0, 96, size=(B, 1)).astype(np.int32)
    res = fwd(model, nxt, cache.lengths[:, None], cache)
    for b, p in enumerate(prompts):
        alone, _ = numpy_forward(model.config, model.params, np.concatenate([p, nxt[b]]))
        np.testing.assert_allclose(np.asarray(res.logits)[b, 0], alone[-1], atol=REF_ATOL, rtol=0)


def layers_call(model, x, cache, layers, return_hidden=()):
    return jit_run_layers(model.config, model.params, x, arange_positions(B, T), cache, layers=layers,
                          return_hidden=return_hidden)


def test_run_layers_split_equals_full_stack():
    model = tiny_model()
    c, p = model.config, model.params
    tokens = random_tokens(5)
    x0 = decoding.embed(c, p, jnp.asarray(tokens))
    full_x, _, full_cache = layers_call(model, x0, model.init_cache(B, CAP), (0, c.num_layers))
    x, _, cache = layers_call(model, x0, model.init_cache(B, CAP), (0, 1))
    np.testing.assert_array_equal(np.asarray(cache.k[1]), 0.0)  # layer 1 untouched so far
    x, _, cache = layers_call(model, x, cache, (1, c.num_layers))
    np.testing.assert_allclose(np.asarray(x), np.asarray(full_x), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(full_cache.k), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.v), np.asarray(full_cache.v), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [0, 0])  # run_layers moves no cursor
    logits = decoding.unembed(c, p, full_x)
    np.testing.assert_allclose(np.asarray(logits), full_logits(model, tokens), atol=ATOL, rtol=0)


def test_return_hidden_is_the_stream_after_i_layers():
    model = tiny_model()
    c, p = model.config, model.params
    tokens = random_tokens(6)
    out = fwd(model, tokens, arange_positions(B, T), model.init_cache(B, CAP),
              return_hidden=tuple(range(c.num_layers + 1)))
    assert sorted(out.hidden) == list(range(c.num_layers + 1))
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(decoding.embed(c, p, jnp.asarray(tokens))))
    for b in range(B):
        _, ref_hidden = numpy_forward(c, p, tokens[b])
        for i in range(c.num_layers + 1):
            np.testing.assert_allclose(np.asarray(out.hidden[i])[b], ref_hidden[i], atol=REF_ATOL, rtol=0)
    x, _, _ = layers_call(model, out.hidden[0], model.init_cache(B, CAP), (0, 1))
    np.testing.assert_allclose(np.asarray(out.hidden[1]), np.asarray(x), atol=ATOL, rtol=0)
    last = decoding.unembed(c, p, out.hidden[c.num_layers])
    np.testing.assert_allclose(np.asarray(last), np.asarray(out.logits), atol=ATOL, rtol=0)
    # unembed is final_norm then lm_head.
    split = decoding.lm_head(c, p, decoding.final_norm(c, p, out.hidden[c.num_layers]))
    np.testing.assert_allclose(np.asarray(split), np.asarray(last), atol=1e-6, rtol=0)


def test_layer_ranges_and_return_hidden_outside_the_range_are_refused():
    model = tiny_model()
    c, p = model.config, model.params
    x = jnp.zeros((1, 2, c.hidden_size))
    pos = arange_positions(1, 2)
    with pytest.raises(ValueError, match="return_hidden"):
        decoding.run_layers(c, p, x, pos, model.init_cache(1, 4), layers=(0, 1), return_hidden=(2,))
    with pytest.raises(ValueError, match="layers"):
        decoding.run_layers(c, p, x, pos, model.init_cache(1, 4), layers=(1, 3))


def test_injecting_hidden_states_at_layer_k():
    """Run layers < k to fill their cache, inject the captured stream at layer k for layers
    >= k: the logits match, and decoding continues exactly as after a normal forward."""
    model = tiny_model()
    c, p = model.config, model.params
    tokens = random_tokens(7)
    k = 1
    ref = fwd(model, tokens, arange_positions(B, T), model.init_cache(B, CAP), return_hidden=(0, 1, 2))
    cache = model.init_cache(B, CAP)
    _, _, cache = layers_call(model, decoding.embed(c, p, jnp.asarray(tokens)), cache, (0, k))
    x, _, cache = layers_call(model, ref.hidden[k], cache, (k, c.num_layers))
    np.testing.assert_allclose(np.asarray(decoding.unembed(c, p, x)), np.asarray(ref.logits), atol=ATOL, rtol=0)
    cache = cache.truncate(cache.lengths + T)
    nxt = random_tokens(8, (B, 1))
    got = fwd(model, nxt, cache.lengths[:, None], cache).logits
    for b in range(B):
        want, _ = numpy_forward(c, p, np.concatenate([tokens[b], nxt[b]]))
        np.testing.assert_allclose(np.asarray(got)[b, 0], want[-1], atol=REF_ATOL, rtol=0)


def test_sliding_window_matches_numpy_reference_full_and_incremental():
    model = tiny_model(sliding_window=4)
    tokens = random_tokens(9)
    got = full_logits(model, tokens)
    for b in range(B):
        want, _ = numpy_forward(model.config, model.params, tokens[b])  # masks position diff >= 4
        np.testing.assert_allclose(got[b], want, atol=REF_ATOL, rtol=0)
    # Incremental decoding with a window: cached keys are masked by their position too.
    out = fwd(model, tokens[:, :4], arange_positions(B, 4), model.init_cache(B, CAP))
    parts, cache = [np.asarray(out.logits)], out.cache
    for t in range(4, T):
        out = fwd(model, tokens[:, t:t + 1], arange_positions(B, 1, t), cache)
        parts.append(np.asarray(out.logits))
        cache = out.cache
    np.testing.assert_allclose(np.concatenate(parts, axis=1), got, atol=ATOL, rtol=0)
    # A small window changes the logits from the first position that loses a key on.
    no_window = full_logits(tiny_model(), tokens)
    diff = np.abs(got - no_window).max(axis=(0, 2))
    assert diff[:4].max() < ATOL and diff[4:].min() > 1e-3, diff


def test_sliding_window_masks_keys_window_or_more_positions_back():
    # One layer: the logits at the last position depend on the last 4 tokens only.
    model = tiny_model(sliding_window=4, num_layers=1)
    base = random_tokens(10, (1, T))[0]
    backs = [0, 1, 3, 4, 5, 8]
    batch = np.stack([base] * len(backs))
    for row, back in enumerate(backs[1:], start=1):
        batch[row, T - 1 - back] = (batch[row, T - 1 - back] + 1) % 96
    logits = full_logits(model, batch)[:, -1]
    for row, back in enumerate(backs[1:], start=1):
        diff = np.abs(logits[row] - logits[0]).max()
        assert (diff > 1e-3) == (back < 4), (back, diff)


def test_window_at_least_the_sequence_length_changes_nothing():
    tokens = random_tokens(11)
    want = full_logits(tiny_model(), tokens)
    np.testing.assert_allclose(full_logits(tiny_model(sliding_window=T), tokens), want, atol=ATOL, rtol=0)


def test_check_params_names_the_offending_tensor():
    model = tiny_model()
    c = model.config
    check_params(c, model.params)  # a matching tree passes

    missing = jax.tree.map(lambda x: x, model.params)
    del missing["layers"]["wqkv"]
    with pytest.raises(ValueError, match=r"missing \['layers/wqkv'\]"):
        check_params(c, missing)

    wrong = jax.tree.map(lambda x: x, model.params)
    wrong["embed"] = jnp.zeros((c.vocab_size + 1, c.hidden_size))
    with pytest.raises(ValueError, match=r"embed: expected shape \(96, 32\), got \(97, 32\)"):
        check_params(c, wrong)

    wrong_layer = jax.tree.map(lambda x: x, model.params)
    wrong_layer["layers"]["w_down"] = jnp.zeros((c.num_layers, c.hidden_size, c.intermediate_size))
    with pytest.raises(ValueError, match=r"layers/w_down: expected shape \(2, 64, 32\)"):
        check_params(c, wrong_layer)

    tied = tiny_model(tie_embeddings=True)
    extra = dict(tied.params, lm_head=model.params["lm_head"])
    with pytest.raises(ValueError, match=r"unexpected \['lm_head'\]"):
        check_params(tied.config, extra)


def test_init_params_follows_the_declared_shapes():
    # vocab = hidden = ffn = heads * head_dim: few distinct random shapes to compile.
    config = decoding.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                  num_kv_heads=2, head_dim=4, qkv_bias=True)
    params = decoding.init_params(config, jax.random.PRNGKey(0), dtype=jnp.float32, scale=0.5)
    check_params(config, params)
    assert params["layers"]["wqkv"].shape == (2, 8, 24) and params["layers"]["wqkv"].dtype == jnp.float32
    assert params["layers"]["bqkv"].shape == (2, 24) and params["layers"]["w_gate_up"].shape == (2, 8, 16)
    assert config.param_count() == sum(x.size for x in jax.tree.leaves(params))
    for name in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(np.asarray(params["layers"][name]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["final_norm"]), 1.0)
    weights = np.concatenate([np.asarray(params["embed"]).ravel(),
                              np.asarray(params["layers"]["w_gate_up"]).ravel()])
    assert 0.35 < weights.std() < 0.65  # drawn at the requested scale
    # Every tensor gets its own key.
    assert not np.allclose(np.asarray(params["embed"]), np.asarray(params["lm_head"]))
    assert not np.allclose(np.asarray(params["layers"]["wqkv"][0]), np.asarray(params["layers"]["wqkv"][1]))
    other = decoding.init_params(config, jax.random.PRNGKey(1), dtype=jnp.float32, scale=0.5)
    assert not np.allclose(np.asarray(params["embed"]), np.asarray(other["embed"]))


@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, False), (True, True), (False, True)])
def test_param_count_is_the_size_of_the_parameter_tree(qkv_bias, tie):
    c = decoding.ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=8, qkv_bias=qkv_bias, tie_embeddings=tie)
    from decoding.model import param_shapes

    shapes = param_shapes(c)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert c.param_count() == n


# ------------------------------------------------------------------------------------------
# split layers: one weight array per layer
# ------------------------------------------------------------------------------------------

def _weight_slices(fn, params, stacked) -> int:
    """How many slice / dynamic-slice / gather ops of `fn(params)`'s jaxpr read an array of one of
    the `stacked` [L, ...] weight shapes."""
    jaxpr = jax.make_jaxpr(fn)(params)

    def count(j):
        n = 0
        for e in j.eqns:
            if e.primitive.name in ("slice", "dynamic_slice", "gather", "squeeze") and \
                    tuple(getattr(e.invars[0].aval, "shape", ())) in stacked:
                n += 1
            for v in e.params.values():  # scan / while / cond / pjit bodies
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        n += count(sub)
        return n
    return count(jaxpr.jaxpr)


@pytest.mark.parametrize("unroll", [True, False])
def test_split_layers_computes_the_same_forward_and_reads_no_weight_slices(unroll):
    """`split_layers` (a tuple of per-layer dicts) gives the stacked model's logits, cache and
    hidden states exactly (float32), unrolled and under the scan; `stack_layers` undoes it; the
    unrolled split forward slices no stacked weight, where the stacked one slices every one."""
    model = tiny_model(qkv_bias=True)
    split = model.split_layers()
    L = model.config.num_layers
    assert isinstance(split.params["layers"], tuple) and len(split.params["layers"]) == L
    assert all(split.params["layers"][i]["wqkv"].shape == model.params["layers"]["wqkv"].shape[1:] for i in range(L))
    back = decoding.stack_layers(split.params)
    assert jax.tree.structure(back) == jax.tree.structure(model.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    opts = decoding.Options(unroll_layers=unroll)
    tokens, pos = jnp.asarray(random_tokens(5)), arange_positions(B, T)
    f = jax.jit(decoding.forward, static_argnums=(0,), static_argnames=("return_hidden", "options"))
    want = f(model.config, model.params, tokens, pos, model.init_cache(B, CAP), return_hidden=(1, L), options=opts)
    got = f(split.config, split.params, tokens, pos, split.init_cache(B, CAP), return_hidden=(1, L), options=opts)
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))
    for i in (1, L):
        np.testing.assert_array_equal(np.asarray(got.hidden[i]), np.asarray(want.hidden[i]))
    for a, b in zip(got.cache.layers, want.cache.layers):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    if unroll:
        def f(params):
            return decoding.forward(model.config, params, tokens, pos, model.init_cache(B, CAP), options=opts).logits
        stacked = {tuple(w.shape) for w in jax.tree.leaves(model.params["layers"])}
        assert _weight_slices(f, split.params, stacked) == 0
        assert _weight_slices(f, model.params, stacked) >= L  # the check can fail: the stacked form slices


def _split_generates_the_same(strategy):
    model, draft = tiny_model(), tiny_model(seed=1)
    prompts = [[3, 4, 5, 6], [7, 8]]
    want = decoding.generate(model, prompts, strategy=strategy, max_new_tokens=8, draft=draft).tokens
    got = decoding.generate(model.split_layers(), prompts, strategy=strategy, max_new_tokens=8,
                            draft=draft.split_layers()).tokens
    assert got == want, strategy


@pytest.mark.slow
def test_split_layers_speculative_generates_the_same_tokens():
    from drafting import DraftModel

    _split_generates_the_same(decoding.Speculative(DraftModel(), gamma=3))


def test_split_layers_generates_the_same_tokens_and_refuses_a_mesh():
    from decoding.sharding import ShardingError, put_params

    model = tiny_model()
    split = model.split_layers()
    assert split.split_layers().params is split.params  # idempotent
    _split_generates_the_same(decoding.Autoregressive())
    with pytest.raises(ShardingError, match="stack_layers"):
        put_params(split.params, split.config, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
    import dataclasses
    with pytest.raises(ValueError, match="without mesh="):
        dataclasses.replace(model, layout=object()).split_layers()
