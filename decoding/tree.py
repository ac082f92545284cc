"""Token-tree verification: the `TreeBatch` a drafter proposes, and the acceptance rules.

The verification side of tree-based speculative decoding (the draft shapes and the builders of
a `TreeBatch` live in `drafting.shapes`):
- SpecInfer (Miao et al. 2024): a token tree verified in one target forward with a tree
  attention mask (each node sees the prefix and its ancestors; position = prefix + depth), and
  multi-round speculative sampling over siblings.
- Sampled siblings are distinct: drawn *without replacement* from the drafter's q (in the
  order of `children`, e.g. Gumbel-top-k). The rule is the recursive rejection sampling of
  Sequoia (Chen et al. 2024) and Jeon et al. 2024 ("Recursive Speculative Decoding"): with P
  and q the current target and draft distributions, accept sibling x w.p. min(1, P(x) / q(x));
  on rejection P <- norm(max(P - q, 0)) AND q <- q with x removed, renormalised (the law the
  next sibling was drawn from). By induction the emitted token follows P: the rejection
  residual does not depend on which x was rejected, and x has no mass left in it.
  (SpecInfer's multi-round rule keeps q fixed, which is exact for i.i.d. siblings only.)
- Medusa (Cai et al. 2024) static trees and EAGLE-2 (Li et al. 2024) dynamic trees: siblings
  are the draft's deterministic top-k, each proposal one-hot; the same rule with q = delta(x)
  becomes: accept child x with probability P(x); on rejection set P(x) = 0, renormalise, try
  the next sibling.
A chain (plain speculative decoding, Leviathan et al. 2023) is the tree with one child per node,
and the rules above reduce to the standard accept/reject/residual rule.

Node 0 of every tree is the *root*: the last committed token, which the target has not yet
processed. The other nodes are candidates. Nodes are numbered so that a parent precedes its
children.

Legend: B batch, N nodes (root included), K max children per node, D max depth, V vocab.

Choices recorded here where the papers leave them open:
- Sibling order for sampled acceptance is the order of `children` (for top-k trees: by draft
  score, best first). Any fixed order is lossless.
- Lenience (DistillSpec, Zhou et al. 2024; Leviathan et al. 2023 A.5) multiplies q in the
  acceptance test only: accept x with min(1, P(x) / (lenience * q(x))); the correction is the
  standard residual normalize(max(0, P - q)) (the residual of the accepted mass min(q, P/l) is
  the same wherever it is positive). lenience = 1 is the lossless rule. It applies to
  stochastic (sampled-draft) nodes; one-hot siblings keep the exact rule.
- A sibling a drafter declined (`valid` False) but listed in `children` is skipped, and its
  token is still removed from q: the later siblings were drawn without it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeBatch:
    """A proposed tree per row (device side). Node 0 is the root.

    tokens: int32[B, N]; depth: int32[B, N]; mask: bool[B, N, N] (ancestor-or-self);
    children: int32[B, N, K] (-1 padded, in the order siblings are tried);
    valid: bool[B, N] (nodes a drafter declined to propose are invalid and never accepted);
    q_logprobs: float32[B, N, V] or None — for *stochastic* trees, the draft distribution at
    each node from which its children were sampled, in `children` order and without
    replacement (distinct siblings); None means siblings are deterministic (one-hot proposals:
    top-k, n-gram lookup, greedy drafts).
    """

    tokens: jax.Array
    depth: jax.Array
    mask: jax.Array
    children: jax.Array
    valid: jax.Array
    q_logprobs: jax.Array | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accepted:
    """Outcome of verification per row.

    path: int32[B, D+1] accepted node ids from the root (path[:, 0] = 0), padded with 0;
    n: int32[B] accepted candidates (root excluded); bonus: int32[B] the token sampled from the
    target after the last accepted node (the next root).
    """

    path: jax.Array
    n: jax.Array
    bonus: jax.Array

    def tokens(self, tree: TreeBatch) -> jax.Array:
        """int32[B, D+1]: accepted candidate tokens followed by the bonus token (length n + 1)."""
        d = self.path.shape[1] - 1
        cand = jnp.take_along_axis(tree.tokens, self.path[:, 1:], axis=1)  # [B, D]
        j = jnp.arange(d + 1)[None, :]
        padded = jnp.concatenate([cand, jnp.zeros_like(cand[:, :1])], axis=1)
        return jnp.where(j == self.n[:, None], self.bonus[:, None], padded).astype(jnp.int32)


def _first_true(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index of first True along the last axis, any) for bool[..., K]."""
    return jnp.argmax(x, axis=-1), jnp.any(x, axis=-1)


def accept_greedy(tree: TreeBatch, target_logits: jax.Array, max_depth: int) -> Accepted:
    """Walk the tree taking the child equal to the target's argmax (lossless for greedy)."""
    b = tree.tokens.shape[0]
    rows = jnp.arange(b)
    top = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N]
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    n = jnp.zeros((b,), jnp.int32)
    path = [cur]
    for _ in range(max_depth):
        kids = tree.children[rows, cur]  # [B, K]
        kid_ok = (kids >= 0) & tree.valid[rows[:, None], jnp.maximum(kids, 0)]
        kid_tok = tree.tokens[rows[:, None], jnp.maximum(kids, 0)]
        match = kid_ok & (kid_tok == top[rows, cur][:, None])
        k, found = _first_true(match)
        step = alive & found
        cur = jnp.where(step, kids[rows, k], cur)
        n = n + step
        alive = step
        path.append(jnp.where(step, cur, 0))
    bonus = top[rows, cur]
    return Accepted(path=jnp.stack(path, axis=1), n=n, bonus=bonus)


def sibling_round(probs: jax.Array, q: jax.Array | None, x: jax.Array, lenience: float = 1.0):
    """One sibling of the recursive rejection rule (see the module doc), for every row.

    probs: float32[B, V] the current target distribution; q: float32[B, V] the distribution the
    sibling `x: int32[B]` was drawn from (None: a one-hot proposal). Returns (accept probability
    float32[B], target distribution after a rejection [B, V], draft distribution of the next
    sibling [B, V] or None).
    """
    rows = jnp.arange(x.shape[0])
    px = probs[rows, x]
    if q is None:
        accept = px
        resid = probs.at[rows, x].set(0.0)
        q_next = None
    else:
        qx = q[rows, x]
        accept = jnp.minimum(1.0, px / jnp.maximum(lenience * qx, 1e-30))  # px = 0: never accepted
        resid = jnp.maximum(probs - q, 0.0)
        q_next = _normalise(q.at[rows, x].set(0.0), q)
    # A rejection with zero residual mass has probability zero; keep P there.
    return accept, _normalise(resid, probs), q_next


def _normalise(p: jax.Array, fallback: jax.Array) -> jax.Array:
    z = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.where(z > 0, p / jnp.where(z > 0, z, 1.0), fallback)


def accept_sampled(tree: TreeBatch, target_logprobs: jax.Array, key: jax.Array, max_depth: int,
                   lenience: float = 1.0) -> Accepted:
    """Recursive rejection sampling over the tree (lossless for lenience = 1).

    target_logprobs: float32[B, N, V], the target's *processed* distribution at every node.
    At the current node with target distribution P, siblings are tried in order
    (`sibling_round`):
      stochastic (q given): accept x w.p. min(1, P(x) / (lenience q(x))); else
        P <- norm(max(0, P - q)) and q <- norm(q with x removed) (siblings drawn without replacement);
      one-hot: accept x w.p. P(x); else P(x) <- 0, renormalise.
    The first accepted child becomes the current node (P <- its target distribution); if every
    child is rejected, or the node is a leaf, the bonus token is sampled from P.
    """
    b, n_nodes, vocab = target_logprobs.shape
    rows = jnp.arange(b)
    k_max = tree.children.shape[2]
    stochastic = tree.q_logprobs is not None
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    n = jnp.zeros((b,), jnp.int32)
    probs = jnp.exp(target_logprobs[:, 0])  # [B, V]
    path = [cur]
    keys = jax.random.split(key, max_depth * k_max + 1)
    for d in range(max_depth):
        kids = tree.children[rows, cur]
        q = jnp.exp(tree.q_logprobs[rows, cur]) if stochastic else None
        moved = jnp.zeros((b,), bool)
        new_cur = cur
        for k in range(k_max):
            kid = kids[:, k]
            listed = alive & ~moved & (kid >= 0)
            ok = listed & tree.valid[rows, jnp.maximum(kid, 0)]
            x = tree.tokens[rows, jnp.maximum(kid, 0)]
            u = jax.random.uniform(keys[d * k_max + k], (b,))
            p_acc, resid, q_next = sibling_round(probs, q, x, lenience)
            accept = ok & (u < p_acc)
            rejected = ok & ~accept
            probs = jnp.where(rejected[:, None], resid, probs)
            if stochastic:
                q = jnp.where((listed & ~accept)[:, None], q_next, q)
            new_cur = jnp.where(accept, kid, new_cur)
            moved = moved | accept
        cur = new_cur
        probs = jnp.where(moved[:, None], jnp.exp(target_logprobs[rows, cur]), probs)
        n = n + moved
        alive = moved
        path.append(jnp.where(moved, cur, 0))
    logits = jnp.log(jnp.maximum(probs, 0.0))
    bonus = jax.random.categorical(keys[-1], logits, axis=-1).astype(jnp.int32)
    return Accepted(path=jnp.stack(path, axis=1), n=n, bonus=bonus)
