r"""The default recipe of ``probdiff train``: an MLP eps-network on 2-D (or vector) data.

A recipe is a JSON-serialisable config dict from which the model, the SVI object and the
training state are rebuilt exactly; checkpoints store it in their metadata, so
``probdiff sample`` and ``probdiff evaluate`` need nothing but the checkpoint.
"""

from __future__ import annotations

import jax
import numpyro
import optax
from numpyro.contrib.module import eqx_module
from numpyro.infer import SVI

from probdiff import schedules
from probdiff.diffusion import GaussianDiffusion
from probdiff.infer import DiffusionELBO, with_loss_history
from probdiff.nets import MLP, MixedPrecision

__all__ = ["DEFAULT_CONFIG", "build", "Recipe", "diffusion_from_params"]

#: The configuration of ``probdiff train`` with no arguments.
DEFAULT_CONFIG = {
    "data": "eight_gaussians",
    "num_data": 20_000,
    "data_dim": 2,
    "T": 1000,
    "schedule": "linear",
    "variance": "beta",
    "parameterization": "eps",
    "hidden": [256, 256, 256],
    "time_dim": 32,
    "weighting": "simple",
    "t_sampling": "uniform",
    "learning_rate": 1e-3,
    "batch_size": 512,
    "steps": 12_000,
    "ema_decay": 0.999,
    "seed": 0,
    "compute_dtype": "float32",
}


class Recipe:
    """The objects a config builds: schedule, initial network, model, SVI.

    Attributes:
        config: the config dict.
        schedule: the noise schedule.
        net0: the initial network (its arrays are replaced by the trained parameters).
        model: the NumPyro model ``model(x)`` with the network registered as ``"eps_net"``.
        svi: the ``SVI`` object (Adam, [DiffusionELBO][probdiff.infer.DiffusionELBO]).
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        c = self.config
        make = getattr(schedules, c["schedule"], None)
        if make is None or c["schedule"] not in ("linear", "cosine", "sigmoid"):
            raise ValueError(f"schedule must be linear, cosine or sigmoid; got {c['schedule']!r}")
        self.schedule = make(int(c["T"]))
        self.net0 = MLP(int(c["data_dim"]), jax.random.key(int(c["seed"])), hidden=tuple(c["hidden"]),
                        time_dim=int(c["time_dim"]), learn_variance=c["variance"] == "learned")
        schedule, net0, dim = self.schedule, self.net0, int(c["data_dim"])
        kinds = {"variance": c["variance"], "parameterization": c["parameterization"]}
        compute_dtype = c.get("compute_dtype", "float32")
        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16; got {compute_dtype!r}")
        if compute_dtype == "bfloat16" and c["parameterization"] == "x0":
            # eps = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t) multiplies x0_hat's
            # bf16 rounding by up to 1/sqrt(1 - alpha_bar_1) ~ 100 at small t
            raise ValueError("compute_dtype bfloat16 needs parameterization eps or v: with x0 the implied "
                             "eps carries bf16's rounding times up to 1/sqrt(1 - alpha_bar_1)")

        def model(x):
            net = eqx_module("eps_net", net0)
            if compute_dtype != "float32":  # the parameters stay those of the float32 network
                net = MixedPrecision(net, compute_dtype)
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", GaussianDiffusion(net, schedule, (dim,), **kinds), obs=x)

        self.model = with_loss_history(model) if c["t_sampling"] == "importance" else model
        elbo = DiffusionELBO(c["weighting"], t_sampling=c["t_sampling"])
        self.svi = SVI(self.model, lambda x: None, optax.adam(float(c["learning_rate"])), elbo)


def build(config: dict) -> Recipe:
    """The [Recipe][probdiff.recipes.Recipe] of ``config`` (missing keys from ``DEFAULT_CONFIG``)."""
    return Recipe({**DEFAULT_CONFIG, **config})


def diffusion_from_params(recipe: Recipe, params: dict) -> GaussianDiffusion:
    """A [GaussianDiffusion][probdiff.GaussianDiffusion] whose eps-network carries ``params``
    (e.g. the EMA of a [TrainState][probdiff.training.TrainState])."""
    import equinox as eqx

    _, static = eqx.partition(recipe.net0, eqx.is_array)
    net = eqx.combine(params["eps_net$params"], static)
    c = recipe.config
    return GaussianDiffusion(
        net, recipe.schedule, (int(c["data_dim"]),), c["variance"], parameterization=c["parameterization"]
    )
