"""The FID Inception-v3 network in Flax (NHWC), with weights read from a local file.

The architecture is the one FID is defined with (the TF "2015-12-05" Inception graph as
re-expressed by the ``pytorch-fid`` package): torchvision's Inception-v3 blocks, except that the
average pools of the A, C and first E blocks exclude padding from their counts, the second E
block's pool branch is a max pool, and the classifier has 1008 outputs. Images in [−1, 1] are
resized to 299×299 (bilinear, as the FID convention does); the 2048-d output of the final
average pool is the FID feature, the softmax of the logits the Inception Score's ``p(y|x)``.

Weights (no wheel ships them and nothing downloads at run time): the public file
``pt_inception-2015-12-05-6726825d.pth`` released with ``pytorch-fid`` (its
``FID_WEIGHTS_URL``), converted once on any machine with PyTorch::

    python -m distill.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out inception_fid.safetensors

The result keeps the PyTorch names and layouts (``Mixed_5b.branch1x1.conv.weight`` OIHW,
``….bn.running_mean``, ``fc.weight`` [1008, 2048], …); ``load_variables`` transposes them into
this module's tree after checking every name and shape, so a wrong file is a one-line error.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from distill import files

NUM_LOGITS = 1008
FEATURE_DIM = 2048
SIZE = 299


class BasicConv(nn.Module):
  """Conv (no bias) → BatchNorm (ε = 0.001, running statistics) → ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "VALID"

  @nn.compact
  def __call__(self, x):
    pad = self.padding
    if isinstance(pad, tuple):
      pad = ((pad[0], pad[0]), (pad[1], pad[1]))
    x = nn.Conv(self.features, self.kernel, self.strides, padding=pad, use_bias=False,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=(2, 2), padding="VALID"):
  return nn.max_pool(x, (3, 3), strides, padding=padding)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # FID's second E block pools with max, the first with average

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool(x, (1, 1), ((1, 1), (1, 1))) if self.max_pool_branch else _avg_pool(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Returns ``(features [N, 2048], logits [N, 1008])`` for images ``[N, H, W, 3]`` in [−1, 1]."""

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), method="bilinear")
    x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, nn.Dense(NUM_LOGITS, name="fc")(features)


@functools.cache
def abstract_variables():
  """Shapes of ``{"params", "batch_stats"}`` (no computation)."""
  return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0),
                                                      jnp.zeros((1, 8, 8, 3))))


def torch_layout() -> dict[str, tuple[int, ...]]:
  """The converted file's names and shapes (PyTorch state-dict names and layouts)."""
  out = {}
  for path, leaf in _flax_leaves(abstract_variables()).items():
    out[_torch_name(path)] = _torch_shape(path, leaf.shape)
  return out


def _flax_leaves(variables) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(variables))


_BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_name(path) -> str:
  collection, *modules, leaf = path
  if modules[-1] == "conv":
    return ".".join(modules) + ".weight"
  if modules[-1] == "bn":
    return ".".join(modules) + "." + _BN_NAMES[(collection, leaf)]
  return ".".join(modules) + (".weight" if leaf == "kernel" else ".bias")  # fc


def _torch_shape(path, shape):
  if path[-1] == "kernel" and len(shape) == 4:  # HWIO → OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel":  # Dense [in, out] → [out, in]
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax(path, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if path[-1] == "kernel":
    return array.T
  return array


def variables_from_torch_arrays(arrays: dict[str, np.ndarray]):
  """This module's variables from PyTorch-named arrays, after checking names and shapes."""
  expected = torch_layout()
  missing = sorted(set(expected) - set(arrays))
  if missing:
    raise ValueError(f"Inception weights lack {len(missing)} tensor(s), e.g. {missing[0]!r}: "
                     "convert pt_inception-2015-12-05-6726825d.pth with "
                     "`python -m distill.evaluation.inception --convert`.")
  flat = {}
  for path, leaf in _flax_leaves(abstract_variables()).items():
    name = _torch_name(path)
    array = np.asarray(arrays[name], np.float32)
    if array.shape != expected[name]:
      raise ValueError(f"Inception weights: {name!r} has shape {array.shape}, expected "
                       f"{expected[name]}: not the FID Inception-v3 file.")
    flat[path] = _to_flax(path, array)
  return traverse_util.unflatten_dict(flat)


def load_variables(path):
  """Reads a converted ``.safetensors`` (or ``.npz``) file into this module's variables."""
  path = str(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  else:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    with files.safetensors_errors(path):
      arrays = load_file(path)
  files.check_finite(arrays, what=path)
  return variables_from_torch_arrays(arrays)


def make_extractor(path, *, batch_size: int = 100):
  """``extract(images) -> (features, probs)`` with the weights in ``path``."""
  variables = load_variables(path)
  apply = jax.jit(lambda v, x: FIDInceptionV3().apply(v, x))

  def extract(images):
    """Batches of ``batch_size``; the last one padded with zeros to that size, so that any number
    of images runs on the one compiled program (each image's result depends on it alone)."""
    feats, probs = [], []
    images = np.asarray(images, np.float32)
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
      f, logits = apply(variables, chunk)
      feats.append(np.asarray(f, np.float64)[:n])
      probs.append(np.asarray(jax.nn.softmax(logits), np.float64)[:n])
    return np.concatenate(feats), np.concatenate(probs)

  return extract


def convert(torch_file: str, out: str) -> None:
  """Converts the ``pytorch-fid`` weights file (needs PyTorch) to safetensors."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  # weights_only: the file is read as tensors only; a pickle that would run code is refused.
  try:
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"--convert={torch_file}: torch.load(weights_only=True) failed "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): pass "
                     "the pytorch-fid weights file pt_inception-2015-12-05-6726825d.pth.") from None
  if not isinstance(state, dict):
    raise ValueError(f"--convert={torch_file}: holds a {type(state).__name__}, not a state dict "
                     "of tensors.")
  arrays = {k: v.numpy() for k, v in state.items() if k in torch_layout()}
  variables_from_torch_arrays(arrays)  # validates before writing
  files.check_finite(arrays, what=torch_file)
  tmp = f"{out}.tmp"
  save_file(arrays, tmp)  # then renamed: a half-written file never carries the final name
  os.replace(tmp, out)


def main(argv=None) -> None:
  """``python -m distill.evaluation.inception --convert=FILE.pth --out=FILE.safetensors``."""
  import argparse  # pylint: disable=import-outside-toplevel
  from distill import cli, paths  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m distill.evaluation.inception",
                                   description="Convert the FID Inception weights.")
  parser.add_argument("--convert", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--out", required=True, help="output .safetensors")
  args = parser.parse_args(argv)
  out = paths.resolve(args.out)
  cli.run_cli(convert, paths.resolve(args.convert), out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
