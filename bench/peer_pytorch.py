"""Our U-Net against a PyTorch peer of the same shape: diffusers' ``UNet2DModel``.

    pip install -e '.[bench]'     # torch==2.13.0 (CPU build) and diffusers
    python bench/peer_pytorch.py [--models=digits,cifar10] [--runs=7] [--quick]

For each model the peer is configured to the same widths (``block_out_channels = ch·ch_mult``),
residual blocks per level, attention resolutions and head size, GroupNorm groups, class
embedding (num_classes + 1 for the null label), scale–shift time conditioning and dropout, at
the same batch and resolution; both parameter counts are printed (they must agree within 10 %).
Timed in both frameworks: a forward pass (inference mode) and a training step — forward,
mean-squared-error loss, backward and an Adam update — with runs of ours and theirs alternating
in this one process so that both see the same machine state, each timed run preceded by one
untimed run of the same framework (``common.round_robin``'s ``settle``: PyTorch's OpenMP threads
spin-wait after a call and would slow the next JAX call). Reported: medians and ours / theirs
(below 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import family, models  # noqa: E402
from distill.config_utils import load_config  # noqa: E402

MODELS = {"digits": ("digits", 64), "cifar10": ("cifar10", 8)}
QUICK = {"digits": ("digits:runlocal", 4), "cifar10": ("cifar10:runlocal", 2)}


def peer_unet(config):
  """diffusers ``UNet2DModel`` with our U-Net's architecture for ``config.model``."""
  from diffusers import UNet2DModel  # pylint: disable=import-outside-toplevel
  m = config.model
  size = config.data.image_size
  widths = tuple(m.ch * k for k in m.ch_mult)
  attn = [size // 2**i in m.attn_resolutions for i in range(len(widths))]
  return UNet2DModel(
      sample_size=size, in_channels=config.data.channels, out_channels=config.data.channels,
      block_out_channels=widths, layers_per_block=m.num_res_blocks,
      down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
      up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
      attention_head_dim=m.head_dim, norm_num_groups=m.num_groups,
      num_class_embeds=config.data.num_classes + 1, resnet_time_scale_shift="scale_shift",
      dropout=m.dropout, time_embedding_type="positional")


def ours(config, batch: int):
  """Jitted forward and train step (MSE + Adam) of our teacher U-Net."""
  model = family.of(config).teacher
  params = models.init_params(model, jax.random.key(0), models.model_input_shape(config))
  tx = optax.adam(1e-4)
  shape = models.model_input_shape(config, batch)
  z = jax.random.normal(jax.random.key(1), shape)
  target = jax.random.normal(jax.random.key(2), shape)
  logsnr = jnp.linspace(-5.0, 5.0, batch)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes

  @jax.jit
  def forward(p):
    return model.apply({"params": p}, z, logsnr, labels)

  def loss_fn(p, key):
    out = model.apply({"params": p}, z, logsnr, labels, train=True, rngs={"dropout": key})
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def step(p, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = {"p": params, "o": tx.init(params), "i": 0}

  def train_once():
    state["p"], state["o"], loss = step(state["p"], state["o"], jax.random.key(state["i"]))
    state["i"] += 1
    jax.block_until_ready(loss)

  return models.param_count(params), lambda: jax.block_until_ready(forward(params)), train_once


def theirs(config, batch: int):
  """The same for the diffusers peer (eager PyTorch, NCHW)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  net = peer_unet(config)
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  c, s = config.data.channels, config.data.image_size
  z, target = torch.randn(batch, c, s, s), torch.randn(batch, c, s, s)
  t = torch.linspace(0, 999, batch).long()
  labels = torch.arange(batch) % config.data.num_classes

  def forward():
    net.eval()
    with torch.inference_mode():
      net(z, t, class_labels=labels)

  def train_once():
    net.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(net(z, t, class_labels=labels).sample, target)
    loss.backward()
    opt.step()

  return sum(p.numel() for p in net.parameters()), forward, train_once


def bench_model(name: str, spec: str, batch: int, runs: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  config = load_config(spec)
  n_ours, fwd_ours, train_ours = ours(config, batch)
  n_theirs, fwd_theirs, train_theirs = theirs(config, batch)
  if abs(n_ours - n_theirs) > 0.1 * n_theirs:
    raise SystemExit(f"{name}: parameter counts differ by more than 10 % ({n_ours} vs "
                     f"{n_theirs}): the peer is not the same architecture.")
  f_o, f_t = common.alternate(fwd_ours, fwd_theirs, runs=runs, settle=1)
  s_o, s_t = common.alternate(train_ours, train_theirs, runs=runs, settle=1)
  return {"model": name, "config": spec, "batch": batch, "params_ours": n_ours,
          "params_theirs": n_theirs, "forward_ours_s": f_o, "forward_theirs_s": f_t,
          "train_ours_s": s_o, "train_theirs_s": s_t, "torch": torch.__version__}


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="digits,cifar10")
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="tiny models, two runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  try:
    import diffusers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise SystemExit(f"bench/peer_pytorch.py needs the bench extra ({e}): "
                     "pip install -e '.[bench]'.") from e
  table = QUICK if args.quick else MODELS
  runs = 2 if args.quick else args.runs
  results = []
  for name in args.models.split(","):
    if name not in table:
      raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(table)}.")
    results.append(bench_model(name, *table[name], runs))
  print(f"# python bench/peer_pytorch.py {' '.join(argv)}")
  print(f"# {common.machine_line()}; torch {results[0]['torch']}")
  print("| model | batch | params ours / diffusers | forward ours (s) | forward diffusers (s) | "
        "ratio | train step ours (s) | train step diffusers (s) | ratio |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['model']} | {r['batch']} | {r['params_ours'] / 1e6:.3f} M / "
          f"{r['params_theirs'] / 1e6:.3f} M | {r['forward_ours_s']:.4f} | "
          f"{r['forward_theirs_s']:.4f} | {r['forward_ours_s'] / r['forward_theirs_s']:.2f} | "
          f"{r['train_ours_s']:.4f} | {r['train_theirs_s']:.4f} | "
          f"{r['train_ours_s'] / r['train_theirs_s']:.2f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
