"""One 3×3 convolution, XLA against PyTorch: where the U-Net's CPU time goes.

    pip install -e '.[bench]'
    python bench/conv_kernels.py [--runs=30] [--quick]
    XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true" \
        python bench/conv_kernels.py      # XLA's experimental oneDNN path

The U-Nets' steps are nearly all 3×3 convolutions (``train_step.py``: optimiser, EMA and
attention are 3 % of the digits step). This times one such convolution at the shapes of the
digits U-Net (8×8 and 4×4 maps; 96 input channels where the up path concatenates a skip) and of
the CIFAR-10 U-Net (32×32×128, batch 8), in NHWC for XLA and NCHW for PyTorch (each framework's
native layout), forward alone and forward + backward (gradients of the input and the kernel).
Runs of the two alternate in one process, each timed run preceded by one untimed run of the
same framework (``common.round_robin``'s ``settle``); medians after two warm-up calls.
Ratio = XLA / torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

# (label, batch, size, in channels, out channels)
SHAPES = [("digits level 0", 64, 8, 32, 32), ("digits level 1", 64, 4, 64, 64),
          ("digits up-path concat", 64, 8, 96, 32), ("cifar10 level 0", 8, 32, 128, 128)]
QUICK = [("tiny", 2, 4, 8, 8)]


def _xla(batch, size, cin, cout):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  k = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fwd = jax.jit(conv)
  both = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.square(conv(x, k))), argnums=(0, 1)))
  return (x, k, fwd(x, k)), (lambda: common.block(fwd(x, k))), (lambda: common.block(both(x, k)))


def _torch(x_nhwc, k_hwio):
  """The same convolution in PyTorch on the same numbers (NCHW, OIHW)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy()).requires_grad_()
  k = torch.from_numpy(np.asarray(k_hwio).transpose(3, 2, 0, 1).copy()).requires_grad_()
  with torch.inference_mode():
    out = torch.nn.functional.conv2d(x, k, padding=1).numpy().transpose(0, 2, 3, 1)

  def fwd():
    with torch.inference_mode():
      torch.nn.functional.conv2d(x, k, padding=1)

  def both():
    x.grad, k.grad = None, None
    torch.nn.functional.conv2d(x, k, padding=1).square().sum().backward()
  return out, fwd, both


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--runs", type=int, default=30)
  parser.add_argument("--quick", action="store_true", help="one tiny shape, two runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"bench/conv_kernels.py needs the bench extra ({e}): "
                     "pip install -e '.[bench]'.") from e
  torch.set_num_threads(os.cpu_count())
  runs = 2 if args.quick else args.runs
  results = []
  for label, batch, size, cin, cout in (QUICK if args.quick else SHAPES):
    (x, k, out_xla), xf, xb = _xla(batch, size, cin, cout)
    out_torch, tf, tb = _torch(x, k)
    diff = float(abs(out_torch - jax.device_get(out_xla)).max())  # the same convolution?
    fwd = common.alternate(xf, tf, runs=runs, warmup=2, settle=1)
    both = common.alternate(xb, tb, runs=runs, warmup=2, settle=1)
    results.append({"shape": label, "batch": batch, "size": size, "in": cin, "out": cout,
                    "forward_xla_s": fwd[0], "forward_torch_s": fwd[1],
                    "fwd_bwd_xla_s": both[0], "fwd_bwd_torch_s": both[1],
                    "max_abs_diff": diff, "xla_flags": os.environ.get("XLA_FLAGS", "")})
  print(f"# python bench/conv_kernels.py {' '.join(argv)}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"# {common.machine_line()}; torch {torch.__version__}")
  print("| convolution | input (NHWC) | forward XLA (ms) | forward torch (ms) | ratio | "
        "fwd + bwd XLA (ms) | fwd + bwd torch (ms) | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['shape']} | {r['batch']}×{r['size']}×{r['size']}×{r['in']} → {r['out']} | "
          f"{1e3 * r['forward_xla_s']:.2f} | {1e3 * r['forward_torch_s']:.2f} | "
          f"{r['forward_xla_s'] / r['forward_torch_s']:.2f} | {1e3 * r['fwd_bwd_xla_s']:.2f} | "
          f"{1e3 * r['fwd_bwd_torch_s']:.2f} | {r['fwd_bwd_xla_s'] / r['fwd_bwd_torch_s']:.2f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
