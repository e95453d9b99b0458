"""``apply(net, params, ...)``: a Flax network's forward pass, traced once per network, input
shapes and process.

Every network evaluation of the families' ``v_hat``, and the latent models' encoders and
decoders, go through one jitted function whose static arguments are the network (a hashable Flax
module) and its method. Inside a train step or a sampler this is a nested ``jit``: JAX reuses its
traced program wherever the same network is applied to inputs of the same shapes again (the
teacher's two DDIM steps of a stage-two target, the next link's or the next test's train step,
every sampler of the eval stage) instead of tracing the network again. XLA inlines the call, so
the compiled program computes the same function. Called outside a trace, it is one compiled
program per network, method and input shapes in a process, shared by every object that holds
the same network.
"""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.jit, static_argnames=("net", "train", "method"))
def _apply(params, args, kwargs, rngs, *, net, train, method):
  if train:
    kwargs = dict(kwargs, train=True)
  return net.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)


def apply(net, params, *args, train: bool = False, rngs=None, method=None, **kwargs):
  """``net.apply({"params": params}, *args, rngs=rngs, method=method, **kwargs)`` (and
  ``train=True`` when set), through one jitted function per network and method."""
  return _apply(params, args, kwargs, rngs, net=net, train=train, method=method)
