"""The Gaussian analytic oracle shared by the objective tests.

For data x1 ~ N(mu, s^2 I) and noise x0 ~ N(0, I) on the path x_t = (1 - t) x0 + t x1, per dimension:
    x_t ~ N(t mu, sigma_t^2),  sigma_t^2 = (1 - t)^2 + t^2 s^2
    exact velocity   v(x, t)      = mu + (t s^2 - (1 - t)) / sigma_t^2 * (x - t mu)
    exact flow map   Phi_t^d(x)   = (t + d) mu + sigma_{t+d} / sigma_t * (x - t mu)
    exact shortcut   s*(x, t, d)  = (Phi_t^d(x) - x) / d
"""

import jax
import jax.numpy as jnp

MU, S = 0.7, 0.5
SHAPE = (4, 4, 1)


def sigma(t):
    return jnp.sqrt((1 - t) ** 2 + t**2 * S**2)


def exact_velocity(x, t):
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + (t * S**2 - (1 - t)) / sigma(t) ** 2 * (x - t * MU)


def exact_flow_map(x, t, d):
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    d = d.reshape(-1, *([1] * (x.ndim - 1)))
    return (t + d) * MU + sigma(t + d) / sigma(t) * (x - t * MU)


def exact_shortcut(params, x, t, d, labels):
    """An exact shortcut model, in the ApplyFn signature (params and labels unused)."""
    return (exact_flow_map(x, t, d) - x) / d.reshape(-1, *([1] * (x.ndim - 1)))


def velocity_model(params, x, t, d, labels):
    """A model that ignores d: the exact instantaneous velocity."""
    return exact_velocity(x, t)


def gaussian_batch(key, n):
    return MU + S * jax.random.normal(key, (n, *SHAPE)), jnp.zeros((n,), jnp.int32)
