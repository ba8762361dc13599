"""Tests for jaxpurify.contamination (dtype-agnostic: pass with or without x64)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpurify import contamination as C

ADDITIVE_LAWS = ("gaussian", "uniform", "heavy_tailed", "constant")


# Test data come from NumPy (no XLA compilation) and the float leaves only have a few sizes
# (48, 4 and a bf16 leaf of 6), because the jitted cores compile once per size and dtype;
# this keeps the file fast on small CPU machines.


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _params():
    """A small Flax-like params pytree with float, bf16 and integer leaves."""
    return {
        "Conv_0": {"kernel": _normal((2, 2, 3, 4), 1), "bias": 0.1 * _normal((4,), 2)},
        "Dense_0": {"kernel": _normal((8, 6), 3)},
        "norm": {"scale": jnp.asarray(np.ones(6, jnp.bfloat16))},
        "step": jnp.asarray(np.int32(7)),
    }


def _vector(seed=0):
    return _normal((6, 8), seed)


def _count(fraction, size):
    # Same rounding rule as the implementation (float32, round-half-to-even).
    return int(np.round(np.float32(fraction) * np.float32(size)))


def _as_uint(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _popcount(x):
    return np.asarray(jax.lax.population_count(jnp.asarray(x))).astype(np.int64)


def _assert_close(a, b):
    """Same structure/dtypes; bool and int leaves equal, float leaves equal up to ~1 ulp.

    XLA may fuse a whole jitted/vmapped program differently from the eager per-leaf calls,
    so float results are compared with a tight tolerance rather than bitwise.
    """
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.inexact) or x.dtype == jnp.bfloat16:
            np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


def _tree_equal(a, b):
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------- sparse gross errors


def test_exact_count_per_leaf_and_structure_preserved():
    params = _params()
    out, mask = C.sparse_gross_errors(params, jax.random.key(0), fraction=0.25)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for p, o, m in zip(*(jax.tree.leaves(t) for t in (params, out, mask)), strict=True):
        assert o.shape == p.shape and o.dtype == p.dtype
        assert m.shape == p.shape and m.dtype == jnp.bool_
        if jnp.issubdtype(p.dtype, jnp.floating):
            assert int(m.sum()) == _count(0.25, p.size)
            np.testing.assert_array_equal(np.asarray(o != p), np.asarray(m))
        else:  # non-float leaves untouched
            assert not bool(m.any())
            assert int(o) == int(p)


@pytest.mark.parametrize("law", ADDITIVE_LAWS)
def test_mask_marks_exactly_changed_entries(law):
    w = _vector()
    out, mask = C.corrupt_vector(w, jax.random.key(1), fraction=0.15, magnitude=5.0, law=law)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert int(mask.sum()) == _count(0.15, w.size)
    np.testing.assert_array_equal(np.asarray(out != w), np.asarray(mask))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_sign_flip_replaces_by_negative():
    w = _vector()
    out, mask = C.corrupt_vector(w, jax.random.key(1), fraction=0.3, law="sign_flip")
    assert int(mask.sum()) == _count(0.3, w.size)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.where(mask, -w, w)))


def test_error_scale_relative_absolute_and_zero_std_fallback():
    w = _vector()
    key = jax.random.key(3)
    out, mask = C.corrupt_vector(w, key, fraction=0.2, magnitude=4.0, law="constant")
    err = np.abs(np.asarray(out - w))[np.asarray(mask)]
    np.testing.assert_allclose(err, 4.0 * float(jnp.std(w)), rtol=1e-5)

    out, mask = C.corrupt_vector(
        w, key, fraction=0.2, magnitude=4.0, law="constant", relative=False
    )
    np.testing.assert_allclose(np.abs(np.asarray(out - w))[np.asarray(mask)], 4.0, rtol=1e-5)

    zeros = jnp.zeros_like(w)  # std == 0 -> scale 1
    out, mask = C.corrupt_vector(zeros, key, fraction=0.2, magnitude=4.0, law="constant")
    np.testing.assert_allclose(np.abs(np.asarray(out))[np.asarray(mask)], 4.0)
    assert not bool(jnp.any(out[~mask]))

    # uniform errors are bounded by the scale
    out, mask = C.corrupt_vector(w, key, fraction=0.5, magnitude=2.0, law="uniform")
    assert float(jnp.max(jnp.abs(out - w))) <= 2.0 * float(jnp.std(w)) * (1 + 1e-6)


def test_largest_targeting_picks_largest_magnitudes():
    w = _vector()
    out, mask = C.corrupt_vector(w, jax.random.key(5), fraction=0.1, targeting="largest")
    k = _count(0.1, w.size)
    assert int(mask.sum()) == k
    expected = np.zeros(w.size, bool)
    expected[np.argsort(-np.abs(np.asarray(w).ravel()), kind="stable")[:k]] = True
    np.testing.assert_array_equal(np.asarray(mask).ravel(), expected)
    assert float(jnp.min(jnp.abs(w[mask]))) >= float(jnp.max(jnp.abs(w[~mask])))


def test_fraction_zero_and_one():
    w = _vector()
    out, mask = C.corrupt_vector(w, jax.random.key(0), fraction=0.0)
    assert not bool(mask.any()) and bool(jnp.all(out == w))
    out, mask = C.corrupt_vector(w, jax.random.key(0), fraction=1.0)
    assert bool(mask.all()) and bool(jnp.all(out != w))


def test_determinism_and_key_dependence():
    params = _params()
    a = C.sparse_gross_errors(params, jax.random.key(9), fraction=0.25)
    b = C.sparse_gross_errors(params, jax.random.key(9), fraction=0.25)
    c = C.sparse_gross_errors(params, jax.random.key(10), fraction=0.25)
    assert _tree_equal(a, b)
    assert not _tree_equal(a[1], c[1])
    # raw uint32 keys work too
    w = _vector()
    raw = [C.corrupt_vector(w, jax.random.PRNGKey(9), fraction=0.25) for _ in range(2)]
    assert _tree_equal(raw[0], raw[1]) and int(raw[0][1].sum()) == 12


def test_jit_matches_eager_with_traced_fraction():
    params = _params()
    key = jax.random.key(11)
    fn = functools.partial(C.sparse_gross_errors, law="gaussian", targeting="random")
    eager = fn(params, key, fraction=0.25)
    jitted = jax.jit(fn)(params, key, fraction=jnp.float32(0.25))
    _assert_close(eager, jitted)


def test_vmap_over_keys_matches_eager():
    w = _vector()
    keys = jax.random.split(jax.random.key(12), 4)
    outs, masks = jax.vmap(lambda k: C.corrupt_vector(w, k, fraction=0.15, law="gaussian"))(keys)
    for i in range(keys.shape[0]):
        eager = C.corrupt_vector(w, keys[i], fraction=0.15, law="gaussian")
        _assert_close((outs[i], masks[i]), eager)


def test_vmap_over_traced_fraction_matches_eager():
    w = _vector()
    key = jax.random.key(13)
    fractions = [0.0, 0.15, 0.5, 1.0]
    outs, masks = jax.vmap(lambda f: C.corrupt_vector(w, key, fraction=f))(
        jnp.asarray(fractions, jnp.float32)
    )
    for i, f in enumerate(fractions):
        assert int(masks[i].sum()) == _count(f, w.size)
        _assert_close((outs[i], masks[i]), C.corrupt_vector(w, key, fraction=f))
    # nested supports: same key, growing fraction -> growing support
    assert bool(jnp.all(masks[1] <= masks[2]))


def test_heavy_tailed_law_is_student_t():
    stats = pytest.importorskip("scipy.stats")
    zeros = jnp.zeros((6, 8), jnp.float32)  # reuses the size-48 compilation
    draws = []
    for key in jax.random.split(jax.random.key(7), 60):
        xi, mask = C.corrupt_vector(
            zeros, key, fraction=1.0, magnitude=1.0, law="heavy_tailed", relative=False
        )
        assert bool(mask.all())
        draws.append(np.asarray(xi, np.float64).ravel())
    result = stats.kstest(np.concatenate(draws), stats.t(C.HEAVY_TAILED_DF).cdf)
    assert result.pvalue > 1e-3


# ------------------------------------------------------------------------------ bit flips


@pytest.mark.parametrize(
    "bits, allowed",
    [
        ("any", range(32)),
        ("sign", [31]),
        ("exponent", range(23, 31)),
        ("mantissa", range(23)),
        (5, [5]),
    ],
)
def test_bit_flips_change_exactly_one_bit(bits, allowed):
    w = _vector()
    out, mask = C.bit_flips({"w": w}, jax.random.key(21), fraction=0.3, bits=bits)
    out, mask = out["w"], np.asarray(mask["w"])
    assert out.dtype == w.dtype and out.shape == w.shape
    assert int(mask.sum()) == _count(0.3, w.size)
    xor = _as_uint(out) ^ _as_uint(w)
    np.testing.assert_array_equal(_popcount(xor), mask.astype(np.int64))
    positions = np.log2(xor[mask].astype(np.float64)).astype(int)
    assert set(positions.tolist()) <= set(allowed)


def test_bit_flips_exponent_can_create_nonfinite_values():
    w = jnp.array([1.0, 1.5, 0.75, 3.0], jnp.float32)
    out, mask = C.bit_flips(w, jax.random.key(0), fraction=1.0, bits=30)  # exponent MSB
    assert bool(mask.all())
    out = np.asarray(out)  # kept as is, not sanitised
    assert np.isposinf(out[0]) and np.isnan(out[1])
    assert 2.5e38 < out[2] < 2.6e38 and 0 < out[3] < 1e-38


def test_bit_flips_half_precision_and_mixed_tree():
    params = _params()
    out, mask = C.bit_flips(params, jax.random.key(22), fraction=0.5, bits="any")
    assert jax.tree.structure(out) == jax.tree.structure(params)
    scale, m = out["norm"]["scale"], np.asarray(mask["norm"]["scale"])
    assert scale.dtype == jnp.bfloat16 and int(m.sum()) == 3
    xor = _as_uint(scale) ^ _as_uint(params["norm"]["scale"])
    np.testing.assert_array_equal(_popcount(xor), m.astype(np.int64))
    assert not bool(mask["step"]) and int(out["step"]) == 7


def test_bit_flips_float64_go_through_float32():
    with jax.enable_x64(True):
        w = jnp.linspace(-2.0, 2.0, 101, dtype=jnp.float64) + 1e-12
        out, mask = C.bit_flips(w, jax.random.key(23), fraction=0.2, bits="mantissa")
        assert out.dtype == jnp.float64
        mask = np.asarray(mask)
        assert int(mask.sum()) == _count(0.2, w.size)
        np.testing.assert_array_equal(np.asarray(out)[~mask], np.asarray(w)[~mask])
        xor = _as_uint(np.asarray(out, np.float32)) ^ _as_uint(np.asarray(w, np.float32))
        np.testing.assert_array_equal(_popcount(xor)[mask], 1)


# -------------------------------------------------------------------- dense noise, combine


def test_dense_noise():
    params = _params()
    out, mask = C.dense_noise(params, jax.random.key(31), std=0.5)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert bool(mask["Dense_0"]["kernel"].all()) and not bool(mask["step"])
    kernel = params["Conv_0"]["kernel"]
    diff = out["Conv_0"]["kernel"] - kernel
    assert bool(jnp.all(diff != 0))
    ratio = float(jnp.std(diff) / (0.5 * jnp.std(kernel)))
    assert 0.7 < ratio < 1.3
    assert out["norm"]["scale"].dtype == jnp.bfloat16


def test_combine_applies_in_order_and_ors_masks():
    params = _params()
    key = jax.random.key(41)
    first = functools.partial(C.sparse_gross_errors, fraction=0.25, magnitude=3.0)
    second = functools.partial(C.bit_flips, fraction=0.25, bits="sign")
    out, mask = C.combine(params, key, first, second)
    k1, k2 = jax.random.split(key)
    p1, m1 = first(params, k1)
    p2, m2 = second(p1, k2)
    assert _tree_equal(out, p2)
    assert _tree_equal(mask, jax.tree.map(jnp.logical_or, m1, m2))
    # no contamination: identity with an all-False mask
    same, empty = C.combine(params, key)
    assert _tree_equal(same, params)
    assert not any(bool(m.any()) for m in jax.tree.leaves(empty))


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), np.array([0.1, 0.2])])
def test_bad_fraction_raises(fraction):
    with pytest.raises(ValueError, match="fraction"):
        C.sparse_gross_errors(_params(), jax.random.key(0), fraction=fraction)
    with pytest.raises(ValueError, match="fraction"):
        C.bit_flips(_params(), jax.random.key(0), fraction=fraction)


def test_bad_arguments_raise():
    w, key = _vector(), jax.random.key(0)
    with pytest.raises(ValueError, match="law"):
        C.corrupt_vector(w, key, fraction=0.1, law="laplace")
    with pytest.raises(ValueError, match="targeting"):
        C.sparse_gross_errors({"w": w}, key, fraction=0.1, targeting="smallest")
    with pytest.raises(ValueError, match="magnitude"):
        C.corrupt_vector(w, key, fraction=0.1, magnitude=-1.0)
    with pytest.raises(ValueError, match="floating"):
        C.corrupt_vector(jnp.arange(5), key, fraction=0.1)
    for bits in ("exp", 32, -1, True, 1.5):
        with pytest.raises(ValueError):
            C.bit_flips({"w": w}, key, fraction=0.1, bits=bits)
    with pytest.raises(ValueError):  # bit 20 does not exist in a 16-bit float
        C.bit_flips(jnp.ones(4, jnp.float16), key, fraction=0.5, bits=20)
    with pytest.raises(ValueError, match="std"):
        C.dense_noise({"w": w}, key, std=-0.1)
    with pytest.raises(TypeError):
        C.combine({"w": w}, key, "not callable")
