"""Attention (distill/attention.py): every implementation against the attention the models used
before it (written out below), forward and gradient; the chunked one never builds an
``Lq × Lk`` array; the per-backend choice; the latent U-Net, VAE and CLIP text encoder with the
chunked attention against the stored diffusers/transformers outputs; the pixel U-Net's
attention block with either."""

import math
import pathlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from distill import attention, models
from distill.models import unet
from distill.latent import pretrained, vae
from test_train import tiny_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "latent"


def plain_attention(q, k, v, causal=False):
  """The einsum attention of ``[B, L, H, D]`` tensors, softmax in float32."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _qkv(lq, lk, d, heads=3, batch=2):
  keys = jax.random.split(jax.random.key(lq * 1000 + lk), 3)
  return (jax.random.normal(keys[0], (batch, lq, heads, d)),
          jax.random.normal(keys[1], (batch, lk, heads, d)),
          jax.random.normal(keys[2], (batch, lk, heads, d)))


def _value_and_grads(fn, q, k, v):
  # A non-linear read-out, so that every output element's gradient differs.
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, atol):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(out, ref_out, atol=atol)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=atol)


CASES = [  # (Lq, Lk, causal): self-attention, cross-attention to 77 text tokens, CLIP's mask
    (100, 100, False), (100, 77, False), (100, 100, True)]


@pytest.mark.parametrize("lq,lk,causal", CASES)
def test_xla_and_chunked_match_the_plain_attention(lq, lk, causal):
  q, k, v = _qkv(lq, lk, d=8)
  want = _value_and_grads(lambda q, k, v: plain_attention(q, k, v, causal), q, k, v)
  _assert_close(_value_and_grads(lambda q, k, v: attention.dot_product_attention(
      q, k, v, causal=causal, implementation="xla"), q, k, v), want, 2e-5)
  # Blocks of 16 queries and 24 keys: several blocks, and padding in the last of each.
  _assert_close(_value_and_grads(lambda q, k, v: attention.chunked_attention(
      q, k, v, causal=causal, query_chunk=16, key_chunk=24), q, k, v), want, 2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_the_tpu_flash_kernel_matches_the_plain_attention(causal):
  """The Pallas TPU kernel run by Pallas's TPU interpreter on this CPU, at 256 tokens and SD's
  head dimension 40 (padded to 128 for the kernel)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  q, k, v = _qkv(256, 256, d=40, heads=2, batch=1)
  want = _value_and_grads(lambda q, k, v: plain_attention(q, k, v, causal), q, k, v)
  with pltpu.force_tpu_interpret_mode():
    got = _value_and_grads(lambda q, k, v: attention.dot_product_attention(
        q, k, v, causal=causal, implementation="tpu_flash"), q, k, v)
    got = jax.device_get(got)
  _assert_close(got, want, 2e-5)


def test_chunked_attention_never_builds_the_full_map():
  """No value in the forward or backward program has as many elements as a quarter of the
  ``[B, H, Lq, Lk]`` logits; XLA's attention has one of the full size."""
  q, k, v = (jax.ShapeDtypeStruct((1, 1024, 2, 8), jnp.float32),) * 3
  full = 1 * 2 * 1024 * 1024

  def largest(fn):
    jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))(
        q, k, v)
    sizes = []

    def walk(jp):
      for eqn in jp.eqns:
        sizes.extend(math.prod(getattr(var.aval, "shape", ())) for var in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jaxpr.jaxpr)
    return max(sizes)

  assert largest(lambda q, k, v: attention.chunked_attention(
      q, k, v, query_chunk=64, key_chunk=64)) < full / 4
  assert largest(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation="xla")) >= full


def test_the_choice_per_backend():
  choose = attention.choose
  big, small = dict(q_len=4096, kv_len=4096), dict(q_len=64, kv_len=77)
  assert choose("gpu", **big, head_dim=40, dtype=jnp.bfloat16) == "cudnn"
  assert choose("gpu", **big, head_dim=40, dtype=jnp.float32) == "chunked"  # cuDNN: 16-bit only
  assert choose("gpu", **big, head_dim=44, dtype=jnp.float16) == "chunked"  # 44 % 8 != 0
  assert choose("tpu", **big, head_dim=40, dtype=jnp.float32) == "tpu_flash"
  assert choose("tpu", q_len=4096, kv_len=77, head_dim=40, dtype=jnp.float32) == "xla"
  assert choose("tpu", q_len=16384, kv_len=77, head_dim=40, dtype=jnp.float32) == "chunked"
  assert choose("cpu", **big, head_dim=40, dtype=jnp.float32) == "chunked"
  assert choose("cpu", **small, head_dim=40, dtype=jnp.float32) == "xla"
  with pytest.raises(ValueError, match=r"^attention implementation='flash' is not one of "):
    attention.dot_product_attention(*_qkv(4, 4, 8), implementation="flash")
  config = tiny_config()
  config.model.attention = "flash"
  with pytest.raises(ValueError, match=r"^model\.attention='flash' is not one of \['auto', "):
    models.build_unet(config)


@pytest.fixture
def small_blocks(monkeypatch):
  """The chunked attention in blocks of 16 queries and 24 keys."""
  monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
  monkeypatch.setattr(attention, "KEY_CHUNK", 24)


@pytest.fixture
def chunked_everywhere(monkeypatch, small_blocks):
  """``"auto"`` takes the chunked attention, in small blocks."""
  del small_blocks
  monkeypatch.setattr(attention, "choose", lambda *a, **k: "chunked")


def test_latent_models_with_chunked_attention_match_diffusers(chunked_everywhere):
  del chunked_everywhere
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
  ref = dict(np.load(FIXTURES / "outputs.npz"))
  sd = pretrained.load_pretrained(FIXTURES / "tiny-sd")
  err = lambda got, want: float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  with jax.default_matmul_precision("highest"):
    unet_out = sd.unet_apply(nhwc(ref["latents"]), ref["timesteps"], ref["context"])
    mean, _ = sd.vae.apply({"params": sd.vae_params}, nhwc(ref["images"]),
                           method=vae.AutoencoderKL.encode)
    context = sd.encode_prompt(["a photo of a cat", "A  PHOTO of a   cat!", "",
                                "cat photo of a photo"])
  assert nhwc(ref["latents"]).shape[1] * nhwc(ref["latents"]).shape[2] > 24  # several blocks
  assert err(unet_out, nhwc(ref["unet_out"])) <= 5e-5
  assert err(mean, nhwc(ref["vae_mean"])) <= 5e-5
  assert err(context, ref["text_last_hidden_state"]) <= 5e-5  # causal, 77 tokens


def test_pixel_unet_attention_blocks_agree_across_implementations(small_blocks):
  """``model.attention`` reaches the U-Net's attention blocks, and a block (64 tokens, two
  heads) gives the same output and gradients with XLA's and the chunked attention."""
  del small_blocks
  config = tiny_config()
  config.model.attention = "chunked"
  assert models.build_unet(config).attention == "chunked"
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
  results = []
  for name in ("xla", "chunked"):
    block = unet.AttnBlock(head_dim=16, num_groups=8, attention=name)
    params = block.init(jax.random.key(0), x)["params"]
    # The output projection starts at zero; move it so that attention reaches the output.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                          params)
    loss = lambda p, x, block=block: jnp.sum(jnp.sin(block.apply({"params": p}, x)))
    results.append(jax.value_and_grad(loss, argnums=(0, 1))(params, x))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), results[0][1],
               results[1][1])
