"""Every public name is documented: a docstring, an API page, and for the math a ledger row."""

import inspect
from pathlib import Path

import pytest

import probdiff
from probdiff import analytic, checkpoint, data, distributions, infer, nets, recipes, schedules, training

DOCS = Path(__file__).resolve().parents[1] / "docs"
API_TEXT = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
LEDGER = (DOCS / "math.md").read_text()

PUBLIC = [(m, name) for m in (probdiff, schedules, distributions, analytic, nets, infer, checkpoint, training, data, recipes) for name in m.__all__]


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC])
def test_public_name_has_docstring_and_api_page(module, name):
    obj = getattr(module, name)
    if inspect.ismodule(obj) or name == "__version__":
        return
    if not (inspect.isclass(obj) or callable(obj)):
        return  # constants are listed on their API page below
    assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    assert name in API_TEXT, f"{module.__name__}.{name} is on no page under docs/api/"


@pytest.mark.parametrize(
    "name",
    [
        "q_step", "q_marginal", "q_posterior", "posterior_mean", "p_step", "mu_from_eps",
        "ForwardChain", "ReverseChain", "GaussianDiffusion.elbo", "elbo_terms",
        "elbo_consistency_terms", "GaussianDiffusion.sample", "optimal_eps_fn",
        "affine_reverse_marginal", "affine_elbo_terms", "schedules.linear", "schedules.cosine",
    ],
)
def test_math_bearing_names_have_a_ledger_row(name):
    assert name in LEDGER, f"{name} has no row in docs/math.md"


def test_methods_of_gaussian_diffusion_have_docstrings():
    for name in ("model", "guide", "elbo", "elbo_terms", "elbo_consistency_terms", "sample", "bits_per_dim", "log_prob"):
        assert inspect.getdoc(getattr(probdiff.GaussianDiffusion, name)), name
