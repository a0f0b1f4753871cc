"""Every public name is documented: a docstring, an API page, and for the math a ledger row."""

import inspect
from pathlib import Path

import pytest

import probdiff
from probdiff import (
    analytic,
    checkpoint,
    data,
    distributions,
    divergences,
    em,
    flows,
    infer,
    inverse,
    nets,
    ode,
    parallel,
    recipes,
    samplers,
    schedules,
    score,
    sde,
    training,
    vae,
    vdm,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
API_TEXT = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
LEDGER = (DOCS / "math.md").read_text()

MODULES = (
    probdiff, schedules, distributions, analytic, nets, infer, inverse, samplers, score, sde, ode, vdm, vae, divergences, em, flows, checkpoint, training, data,
    recipes, parallel,
)
PUBLIC = [(m, name) for m in MODULES for name in m.__all__]


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
        "ULA", "MALA", "annealed_langevin", "predictor_corrector", "ddim", "score_from_eps",
        "ImplicitScoreMatching", "SlicedScoreMatching", "DenoisingScoreMatching", "NCSNScoreMatching",
        "TimeConditionalScoreMatching", "x0_from_score", "VPSDE", "VESDE", "SubVPSDE",
        "ScheduleSDE", "reverse_sde_sample", "ContinuousScoreMatching", "odeint", "NeuralODE", "ODEFlow", "CNF",
        "ProbabilityFlow", "log_likelihood", "score_from_diffusion", "VariationalDiffusion", "LearnedSchedule",
        "LinearSchedule", "discrete_elbo", "GammaSchedule.discretize", "likelihood_bound", "VAE", "MHVAE",
        "LinearGaussianEncoder", "MHVAE.elbo_terms", "reverse_kernel_on_grid", "moment_match", "fit_reverse_kl",
        "joint_kl_bound", "em_gmm", "e_step", "m_step", "elbo_estimates", "Flow", "AdditiveCoupling",
        "AffineCoupling", "ActNorm", "Conv1x1", "Conv1x1LU", "Squeeze", "MultiscaleSplit",
        "AnnealedLangevin", "TwistedSMC", "DPS", "gaussian_posterior", "gaussian_evidence", "LinearObservation",
        "Inpainting", "PosteriorProblem", "MixedPrecision", "data_mesh", "sum_over_t",
    ],
)
def test_math_bearing_names_have_a_ledger_row(name):
    assert name in LEDGER, f"{name} has no row in docs/math.md"


def test_methods_of_gaussian_diffusion_have_docstrings():
    for name in ("model", "guide", "elbo", "elbo_terms", "elbo_consistency_terms", "sample", "bits_per_dim", "log_prob"):
        assert inspect.getdoc(getattr(probdiff.GaussianDiffusion, name)), name


def test_no_control_characters_in_sources():
    """A docstring written through a non-raw string once turned \\beta into a backspace."""
    root = DOCS.parent
    bad = []
    for folder in ("probdiff", "tests", "examples", "bench", "docs"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file():
                text = path.read_text()
                if any(ord(c) < 32 and c not in "\n\r" for c in text):
                    bad.append(str(path.relative_to(root)))
    assert not bad, f"control characters (e.g. a backspace from an unescaped \\b) in {bad}"
