"""The test run checks ncode_jax's array annotations (pyproject.toml addopts, tests/typecheck.py):
a call whose arrays contradict them fails before the function body runs; ``wrong_inputs`` turns the
checks off for a test."""

import jax.numpy as jnp
import jaxtyping
import pytest

from ncode_jax.conv import conv3x3

X = jnp.zeros((4, 4, 2))
W_OTHER_C = jnp.zeros((3, 3, 3, 5))  # C=3 where x has C=2


def test_array_annotations_are_checked():
    with pytest.raises(jaxtyping.TypeCheckError, match="conv3x3"):
        conv3x3(X, W_OTHER_C)
    with pytest.raises(jaxtyping.TypeCheckError, match="conv3x3"):
        conv3x3(jnp.zeros((4, 4, 2), jnp.int32), jnp.zeros((3, 3, 2, 5)))  # Float wants a float dtype
    assert conv3x3(X, jnp.zeros((3, 3, 2, 5))).shape == (4, 4, 5)


@pytest.mark.wrong_inputs
def test_wrong_inputs_marker_leaves_the_library_s_own_error():
    with pytest.raises(ValueError, match="kernel has shape"):
        conv3x3(X, W_OTHER_C)
