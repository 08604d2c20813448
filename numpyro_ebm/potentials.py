r"""Energies written in Flax or NumPyro, as the ``potential_fn(params, x)`` the library takes.

Every adapter returns a pair ``(potential_fn, params)``:

* ``potential_fn(params, x) -> scalar`` is the energy :math:`U_\theta(x)` of ONE sample
  ``x``, ready for :func:`numpyro_ebm.fit`, :func:`numpyro_ebm.ce_grad` and the
  Jarzynski kernel (which vmap it over samples);
* ``params`` is the initial parameter pytree :math:`\theta_0`.

``potential_fn`` is a small callable object that also knows how to map parameters back to
the user's framework: :meth:`FlaxNNXPotential.to_module`,
:meth:`FlaxLinenPotential.to_variables`, :meth:`NumPyroPotential.constrain`.

:func:`from_flax`
    Flax NNX modules (``from_flax(module)``) and Flax Linen modules
    (``from_flax(module, variables)``). The trainable parameters are the ``nnx.Param``
    variables (NNX) or the ``"params"`` collection (Linen); every other variable (batch
    statistics, RNG state, ...) is held fixed at its current value.
:func:`from_numpyro`
    A NumPyro model describing ONE data point; ``numpyro.param`` sites (and latent
    ``numpyro.sample`` sites, fitted by MAP) are optimised in unconstrained space, as
    NumPyro's SVI does.
:func:`add_log_prior_grad`
    An optax transformation adding a log-prior's gradient to the cross-entropy gradient
    (MAP training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from numpyro_ebm import _checks

__all__ = [
    "from_flax",
    "from_numpyro",
    "add_log_prior_grad",
    "FlaxNNXPotential",
    "FlaxLinenPotential",
    "NumPyroPotential",
]


def _as_scalar_energy(out: Any, who: str) -> jax.Array:
    """The module output for one sample as a scalar; it must hold exactly one number."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(
            f"{who} must return an array holding one energy per sample, got "
            f"{type(out).__name__}"
        )
    if out.size != 1:
        raise ValueError(
            f"{who} must return one scalar energy for ONE sample x (shape () or (1,)), got "
            f"output shape {tuple(out.shape)}; if the module expects a batch axis, pass "
            "`add_batch_axis=True`"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{who} must return a floating-point energy, got dtype {out.dtype}")
    return jnp.reshape(out, ())


# ---------------------------------------------------------------------------------------
# Flax
# ---------------------------------------------------------------------------------------


class FlaxNNXPotential:
    r"""Energy of a Flax NNX module, :math:`U_\theta(x) = \mathrm{module}_\theta(x)`.

    Built by :func:`from_flax`. The module is split once with
    ``nnx.split(module, nnx.Param, ...)`` into a graph definition, the parameter state
    :math:`\theta` (an ``nnx.State`` of the ``nnx.Param`` variables, the ``params`` that
    training updates) and the remaining state (held fixed). A call
    ``potential_fn(params, x)`` rebuilds the module with ``nnx.merge`` and returns its
    output for the single sample ``x`` as a scalar.
    """

    def __init__(self, graphdef: Any, rest: Any, add_batch_axis: bool):
        self.graphdef = graphdef
        self.rest = rest
        self.add_batch_axis = add_batch_axis

    def __call__(self, params: Any, x: Any) -> jax.Array:
        from flax import errors as flax_errors
        from flax import nnx

        # copy=True: a module that writes to its state must not change the stored state
        module = nnx.merge(self.graphdef, params, self.rest, copy=True)
        before = jax.tree.leaves(nnx.split(module, nnx.Param, ...)[2])
        inp = jax.tree.map(lambda leaf: leaf[None], x) if self.add_batch_axis else x
        try:
            out = module(inp)
        except flax_errors.TraceContextError as err:
            raise ValueError(
                "the Flax NNX module updates its non-parameter state in its forward pass "
                "(e.g. BatchNorm in training mode, Dropout drawing from nnx.Rngs); an "
                "energy must be a deterministic function of (params, x): call "
                "`module.eval()` (or build it with use_running_average=True / "
                "deterministic=True) before `from_flax`"
            ) from err
        after = jax.tree.leaves(nnx.split(module, nnx.Param, ...)[2])
        if len(before) != len(after) or any(a is not b for a, b in zip(before, after, strict=True)):
            raise ValueError(
                "the Flax NNX module changed its non-parameter state (batch statistics, "
                "RNG counters, ...) in its forward pass; only deterministic modules are "
                "supported: call `module.eval()` before `from_flax`"
            )
        return _as_scalar_energy(out, "the Flax NNX module")

    def to_module(self, params: Any) -> Any:
        """A new NNX module holding ``params`` (e.g. ``result.params`` after ``fit``)
        and the fixed non-parameter state; the original module is left untouched."""
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.rest, copy=True)


class FlaxLinenPotential:
    r"""Energy of a Flax Linen module,
    :math:`U_\theta(x) = \mathrm{module.apply}(\{\texttt{params}: \theta, \dots\}, x)`.

    Built by :func:`from_flax`. ``params`` is the ``"params"`` collection; the other
    collections of ``variables`` (e.g. ``"batch_stats"``) are held fixed and passed
    read-only, so a module that must mutate a collection or needs RNGs in ``apply`` is
    rejected with a ``ValueError``.
    """

    def __init__(self, module: Any, rest: dict, add_batch_axis: bool, apply_kwargs: dict):
        self.module = module
        self.rest = rest
        self.add_batch_axis = add_batch_axis
        self.apply_kwargs = apply_kwargs

    def __call__(self, params: Any, x: Any) -> jax.Array:
        from flax import errors as flax_errors

        inp = jax.tree.map(lambda leaf: leaf[None], x) if self.add_batch_axis else x
        try:
            out = self.module.apply({**self.rest, "params": params}, inp, **self.apply_kwargs)
        except (flax_errors.ModifyScopeVariableError, flax_errors.InvalidRngError) as err:
            raise ValueError(
                "the Flax Linen module must be a deterministic function of (params, x) "
                "with its other collections read-only (no batch-statistics update, no "
                f"dropout RNG); pass e.g. `train=False` via `apply_kwargs`: {err}"
            ) from err
        return _as_scalar_energy(out, "the Flax Linen module")

    def to_variables(self, params: Any) -> dict:
        """The full Linen ``variables`` dict with ``params`` in place of the initial ones."""
        return {**self.rest, "params": params}


def from_flax(
    module: Any,
    variables: Any = None,
    *,
    add_batch_axis: bool = False,
    apply_kwargs: dict | None = None,
) -> tuple[Callable[[Any, Any], jax.Array], Any]:
    r"""Turn a Flax module whose output is the energy into ``(potential_fn, params)``.

    The energy of one sample is the module's output for that sample,
    :math:`U_\theta(x) = f_\theta(x)`; the output must hold exactly one number (shape
    ``()``, ``(1,)``, ...), which is returned as a scalar. The library vmaps
    ``potential_fn`` over samples, so the module sees ONE sample ``x`` (shape
    ``event_shape``); with ``add_batch_axis=True`` it sees ``x[None]`` instead (for layers
    that require a batch axis, e.g. convolutions) and must return one number.

    Parameters
    ----------
    module
        A Flax NNX module (``flax.nnx.Module``), or a Flax Linen module
        (``flax.linen.Module``) together with ``variables``.
    variables
        Linen only: the variables from ``module.init``. Must be ``None`` for NNX.
    add_batch_axis
        Call the module on ``x[None]`` rather than ``x``.
    apply_kwargs
        Linen only: extra keyword arguments for ``module.apply`` (e.g. ``train=False``).

    Returns
    -------
    tuple
        ``(potential_fn, params)``.

        * NNX: ``params`` is ``nnx.split(module, nnx.Param, ...)[1]``, the ``nnx.State`` of
          the module's ``nnx.Param`` variables (a pytree, usable with optax and :func:`fit`);
          ``potential_fn.to_module(params)`` returns a module with trained params put back.
        * Linen: ``params`` is ``variables["params"]``;
          ``potential_fn.to_variables(params)`` returns the full variables dict.

    What is supported
    -----------------
    Only ``nnx.Param`` (NNX) / the ``"params"`` collection (Linen) is trained. All other
    state (``nnx.BatchStat``, RNG state, custom variable types; Linen's other collections)
    is captured at its current value and held fixed. The forward pass must be a
    deterministic function of ``(params, x)`` that does not write to that state: put
    BatchNorm in inference mode (``module.eval()`` or ``use_running_average=True``) and
    disable dropout. A module that updates its state, needs RNGs, or whose output is not
    one number per sample raises ``ValueError`` when ``potential_fn`` is first called or
    traced (for :func:`fit` this is at validation time).
    """
    if not isinstance(add_batch_axis, bool):
        raise TypeError(f"`add_batch_axis` must be a bool, got {type(add_batch_axis).__name__}")
    try:
        from flax import nnx
    except ImportError as err:  # pragma: no cover - flax is a dependency
        raise ImportError("`from_flax` needs flax (pip install flax)") from err
    import flax.linen as nn

    if isinstance(module, nnx.Module):
        if variables is not None:
            raise ValueError(
                "`variables` is only for Flax Linen modules; an NNX module holds its own "
                "parameters"
            )
        if apply_kwargs:
            raise ValueError("`apply_kwargs` is only for Flax Linen modules")
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        if not jax.tree.leaves(params):
            raise ValueError("`module` has no nnx.Param variables to train")
        return FlaxNNXPotential(graphdef, rest, add_batch_axis), params
    if isinstance(module, nn.Module):
        if variables is None:
            raise ValueError(
                "`variables` is required for a Flax Linen module: "
                "from_flax(module, module.init(rng_key, x))"
            )
        if not hasattr(variables, "keys") or "params" not in variables:
            raise ValueError("`variables` must be a mapping with a 'params' collection")
        rest = {k: v for k, v in variables.items() if k != "params"}
        params = variables["params"]
        if not jax.tree.leaves(params):
            raise ValueError("`variables['params']` is empty: nothing to train")
        return FlaxLinenPotential(module, rest, add_batch_axis, dict(apply_kwargs or {})), params
    raise TypeError(
        f"`module` must be a flax.nnx.Module or a flax.linen.Module, got {type(module).__name__}"
    )


# ---------------------------------------------------------------------------------------
# NumPyro
# ---------------------------------------------------------------------------------------


class NumPyroPotential:
    r"""Energy of a NumPyro model for one data point, in unconstrained parameters.

    Built by :func:`from_numpyro`. With :math:`\phi` the unconstrained parameters and
    :math:`\theta = T(\phi)` their constrained values (``T`` = ``biject_to`` of each site's
    constraint/support, applied by ``numpyro.infer.util.constrain_fn``),

    .. math::

       U_\phi(x) = -\sum_{s\ \text{observed}} \log p_s(\cdot \mid \theta, x)
                   \Big|_{\text{data site} = x},

    the sum running over the observed sample sites: the data site itself and every
    ``numpyro.factor`` site (a factor is an observed site whose log density is the factor).
    Latent sample sites (priors over parameters) are NOT part of :math:`U`; their log
    prior is :meth:`log_prior` and enters training through :func:`add_log_prior_grad`.

    Attributes: ``param_names`` (names of the ``numpyro.param`` sites), ``latent_names``
    (latent sample sites fitted by MAP), ``data_site``, ``event_shape`` (shape of one data
    point).
    """

    def __init__(self, model, model_args, model_kwargs, data_site, param_names,
                 latent_names, event_shape):
        self.model = model
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self.data_site = data_site
        self.param_names = param_names
        self.latent_names = latent_names
        self.event_shape = event_shape

    def _site_log_probs(self, params: dict, x: Any) -> tuple[dict, dict]:
        """Per-site summed (and scaled) log densities and the trace, with the constrained
        parameters and the data point substituted (``numpyro.infer.util.compute_log_probs``)."""
        from numpyro import handlers
        from numpyro.infer.util import compute_log_probs

        values = {**self.constrain(params), self.data_site: x}
        return compute_log_probs(
            handlers.seed(self.model, 0), self.model_args, self.model_kwargs, values
        )

    def __call__(self, params: dict, x: Any) -> jax.Array:
        log_probs, tr = self._site_log_probs(params, x)
        observed = [
            log_probs[k] for k, s in tr.items() if s["type"] == "sample" and s["is_observed"]
        ]
        return -sum(observed, start=jnp.zeros(()))

    def constrain(self, params: dict) -> dict:
        """Constrained parameter values :math:`\\theta = T(\\phi)` (``numpyro.param`` and
        MAP latent sites), keyed by site name, via ``numpyro.infer.util.constrain_fn``."""
        from numpyro.infer.util import constrain_fn

        return constrain_fn(self.model, self.model_args, self.model_kwargs, dict(params))

    def unconstrain(self, constrained: dict) -> dict:
        """Inverse of :meth:`constrain` (``numpyro.infer.util.unconstrain_fn``)."""
        from numpyro.infer.util import unconstrain_fn

        return unconstrain_fn(self.model, self.model_args, self.model_kwargs, dict(constrained))

    def log_prior(self, params: dict) -> jax.Array:
        r""":math:`\log p(\theta)`: summed log density of the latent sample sites at
        :math:`\theta = T(\phi)` (in constrained space, no Jacobian: the MAP estimate of
        the model as written, as NumPyro's ``AutoDelta`` gives). 0 when there are none."""
        log_probs, _ = self._site_log_probs(params, jnp.zeros(self.event_shape))
        return sum((log_probs[k] for k in self.latent_names), start=jnp.zeros(()))


def _observed_data_model(model: Callable, tr: dict, data_site: str) -> tuple[tuple, Callable]:
    """Event shape of the data site and a model in which that site is observed.

    With a placeholder observation the model is returned as it is. Written the NumPyro
    way (``obs=x`` with ``x=None``), the site is latent in the trace ``tr`` and its value
    is a prior draw (by the init strategy); its shape is the event shape, and the model
    is conditioned (``numpyro.handlers.condition``) on a zero placeholder of that shape,
    which the energy then replaces by each sample (``substitute``).
    """
    from numpyro import handlers

    if data_site not in tr:
        raise ValueError(
            f"`data_site`: the model has no site named {data_site!r} (sites: {list(tr)})"
        )
    site = tr[data_site]
    if site["type"] != "sample":
        raise ValueError(
            f"`data_site`: site {data_site!r} must be a numpyro.sample site (the data point, "
            f"observed or with `obs=None`), got a {site['type']!r} site"
        )
    value = jnp.asarray(site["value"])
    if site["is_observed"]:
        return tuple(value.shape), model
    if site["fn"].support.is_discrete:
        raise ValueError(f"`data_site`: site {data_site!r} is discrete; only continuous data supported")
    placeholder = jnp.zeros(value.shape, value.dtype)
    return tuple(value.shape), handlers.condition(model, data={data_site: placeholder})


def from_numpyro(
    model: Callable,
    *model_args: Any,
    data_site: str,
    init_strategy: Callable | None = None,
    **model_kwargs: Any,
) -> tuple[NumPyroPotential, dict]:
    r"""Turn a NumPyro model of ONE data point into ``(potential_fn, params)``.

    ``model(*model_args, **model_kwargs)`` describes one data point :math:`x`: it has a
    sample site named ``data_site``, ``numpyro.param`` sites, and optionally
    ``numpyro.factor`` sites and latent ``numpyro.sample`` sites (priors over parameters).
    The data site may be written the NumPyro way, ``def model(x=None): ...
    numpyro.sample("x", d, obs=x)``, and the model passed without data: the shape of
    :math:`x` is then that of a draw of the site (by ``init_strategy``, from ``d``) and
    the site is conditioned on (``numpyro.handlers.condition``). An observed value passed
    in ``model_args`` / ``model_kwargs`` also works: it is only a placeholder fixing the
    shape of :math:`x`. Either way the library substitutes each sample. The model is read
    with ``numpyro.handlers`` (``seed``, ``trace``, ``substitute``, ``condition``) and
    ``numpyro.infer.util`` (``constrain_fn``/``unconstrain_fn``).

    The energy (see :class:`NumPyroPotential`) is minus the log density of the observed
    sites — the data site plus the factors — at :math:`x`:
    :math:`\rho_\theta(x) \propto e^{-U_\theta(x)}`, whose normaliser :math:`Z_\theta` the
    Jarzynski walkers estimate (the data site's own distribution need not be normalised,
    e.g. ``dist.ImproperUniform`` with a factor carrying the energy).

    Parameters are optimised in unconstrained space, as SVI does: ``params`` maps each
    ``numpyro.param`` site (and each latent sample site) to
    :math:`\phi = T^{-1}(\theta_0)`, with :math:`T` = ``biject_to`` of the site's
    ``constraint`` (param) or ``support`` (sample); ``potential_fn`` takes these
    unconstrained params, and ``potential_fn.constrain(params)`` returns the constrained
    values (e.g. of ``fit(...).params``). A constrained parameter therefore stays inside
    its support throughout training.

    MAP for latent sample sites: their log prior :math:`\log p(\theta)` is a term of the
    whole data set, so the per-point objective is

    .. math:: H(\theta) - \tfrac1n \log p(\theta), \qquad
              H(\theta) = \tfrac1n\textstyle\sum_j U_\theta(x_j) + \log Z_\theta .

    It cannot be written into :math:`U`: a term constant in :math:`x` cancels between the
    data and the model expectations in :math:`\nabla H`. Add it to the optimiser instead:
    ``optax.chain(add_log_prior_grad(potential_fn.log_prior, n), optax.sgd(lr))``. Their
    initial value comes from ``init_strategy`` (a NumPyro init strategy, default
    ``numpyro.infer.init_to_median`` as for ``AutoDelta``; seeded with key 0).

    Errors
    ------
    ``ValueError`` when the model has no ``numpyro.param`` or latent sample site, has no
    site named ``data_site``, or that site is not a (continuous) ``numpyro.sample`` site.
    """
    from numpyro import handlers
    from numpyro.infer import init_to_median

    if not callable(model):
        raise TypeError(f"`model` must be callable, got {type(model).__name__}")
    if not isinstance(data_site, str):
        raise TypeError(f"`data_site` must be a site name (str), got {type(data_site).__name__}")
    init_strategy = init_to_median if init_strategy is None else init_strategy
    if not callable(init_strategy):
        raise TypeError("`init_strategy` must be a NumPyro init strategy (callable)")
    seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_strategy)
    tr = handlers.trace(seeded).get_trace(*model_args, **model_kwargs)
    event_shape, model = _observed_data_model(model, tr, data_site)
    param_names = tuple(k for k, s in tr.items() if s["type"] == "param")
    latent_names = tuple(
        k for k, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"] and k != data_site
    )
    if not param_names and not latent_names:
        raise ValueError(
            "`model` has no parameters: declare them with numpyro.param (or latent "
            "numpyro.sample sites with priors, fitted by MAP)"
        )
    for k in latent_names:
        if tr[k]["fn"].support.is_discrete:
            raise ValueError(f"`model`: latent site {k!r} is discrete; only continuous supported")
    potential = NumPyroPotential(
        model, model_args, model_kwargs, data_site, param_names, latent_names, event_shape
    )
    constrained = {k: tr[k]["value"] for k in param_names + latent_names}
    params = potential.unconstrain(constrained)
    # plain (not weakly typed) arrays, so the optimiser's scan carry keeps its dtype
    params = {k: jnp.array(v, dtype=jnp.asarray(v).dtype) for k, v in params.items()}
    return potential, params


# ---------------------------------------------------------------------------------------
# MAP prior as an optax piece
# ---------------------------------------------------------------------------------------


def add_log_prior_grad(
    log_prior_fn: Callable[[Any], jax.Array], num_data: int
) -> optax.GradientTransformation:
    r"""An optax transformation adding :math:`-\nabla_\theta \log p(\theta) / n` to the
    incoming gradient.

    :func:`numpyro_ebm.fit` feeds its optimiser the per-point cross-entropy gradient
    :math:`\nabla H`. Chaining this transformation first,
    ``optax.chain(add_log_prior_grad(log_prior_fn, n), optax.sgd(lr))``, makes the
    optimiser descend :math:`H(\theta) - \log p(\theta)/n`, the negative log posterior per
    data point (MAP). A prior cannot be put in the potential instead: a term constant in
    :math:`x` enters :math:`E_{\text{data}}[\nabla U]` and :math:`E_{\rho}[\nabla U]` equally
    and cancels.

    ``log_prior_fn(params) -> scalar`` is evaluated at the ``params`` passed to
    ``update`` (``fit`` passes them); ``num_data`` is :math:`n`, the size of the WHOLE
    data set (also when ``fit`` uses minibatches).
    """
    if not callable(log_prior_fn):
        raise TypeError(f"`log_prior_fn` must be callable, got {type(log_prior_fn).__name__}")
    num_data = _checks.check_int_at_least("num_data", num_data, 1)
    prior_grad = jax.grad(log_prior_fn)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_log_prior_grad needs `params` in update(updates, state, params)")
        g = prior_grad(params)
        updates = jax.tree.map(lambda u, gp: u - gp.astype(u.dtype) / num_data, updates, g)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
