"""Independent reference computations for the tests.

Everything here is plain numpy in float64, written from the math (MATH.md) and never from
probdiff: no module in this package imports probdiff or jax.
"""
