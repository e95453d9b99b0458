"""Scaled dot-product attention for both U-Nets and CLIP, the implementation chosen per backend.

``dot_product_attention(q, k, v)`` takes ``[B, L, H, D]`` queries, keys and values and returns
``softmax(q·kᵀ / √D) · v`` as ``[B, Lq, H, D]``, with the logits and the softmax in float32.
The implementations give the same result to float32 rounding, forward and gradient
(tests/test_attention.py):

* ``"xla"``: ``jax.nn.dot_product_attention`` lowered by XLA. It builds the ``[B, H, Lq, Lk]``
  logits: at SD's 64×64 latents (4096 tokens) that is 0.5 GiB per head and example in float32.
* ``"cudnn"``: the same call with cuDNN's fused kernel (GPU; float16 or bfloat16, head
  dimension a multiple of 8 up to 128).
* ``"tpu_flash"``: the Pallas flash-attention kernel for TPU
  (``jax.experimental.pallas.ops.tpu.flash_attention``) where both lengths are multiples of its
  128-token blocks. Its head dimension is zero-padded to a multiple of 128 (zeros add nothing
  to ``q·k``, and the padded value columns are dropped).
* ``"chunked"``: queries in blocks of ``QUERY_CHUNK``, keys in blocks of ``KEY_CHUNK`` with a
  running maximum and normaliser (the online softmax), and each key block recomputed in the
  backward pass: no array of ``Lq × Lk`` is ever built, forward or backward.
* ``"auto"`` (the default): ``choose`` by backend, lengths, head dimension and dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tpu_flash", "chunked")
QUERY_CHUNK = 1024
KEY_CHUNK = 1024
TPU_BLOCK = 128


def choose(backend: str, *, q_len: int, kv_len: int, head_dim: int, dtype) -> str:
  """The implementation ``"auto"`` takes on ``backend`` (``jax.default_backend()``).

  GPU: cuDNN where it applies. TPU: the flash kernel where both lengths fill its blocks. Else
  XLA's attention while the logits are no larger than one chunked block's
  (``QUERY_CHUNK × KEY_CHUNK`` per head), the chunked attention beyond.
  """
  if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and \
      head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  if backend == "tpu" and q_len % TPU_BLOCK == 0 and kv_len % TPU_BLOCK == 0:
    return "tpu_flash"
  return "xla" if q_len * kv_len <= QUERY_CHUNK * KEY_CHUNK else "chunked"


def dot_product_attention(q, k, v, *, causal: bool = False, implementation: str = "auto"):
  """``softmax(q·kᵀ/√D)·v`` of ``[B, L, H, D]`` tensors; ``causal`` masks keys after each query
  (the CLIP text encoder's mask; ``Lq == Lk``)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={implementation!r} is not one of "
                     f"{list(IMPLEMENTATIONS)}.")
  if implementation == "auto":
    implementation = choose(jax.default_backend(), q_len=q.shape[1], kv_len=k.shape[1],
                            head_dim=q.shape[-1], dtype=q.dtype)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  if implementation == "tpu_flash":
    return _tpu_flash(q, k, v, causal=causal)
  return chunked_attention(q, k, v, causal=causal)


def _tpu_flash(q, k, v, *, causal: bool):
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=import-outside-toplevel
  d = q.shape[-1]
  pad = (-d) % TPU_BLOCK
  to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)
  out = flash_attention.flash_attention(to_kernel(q), to_kernel(k), to_kernel(v), causal=causal,
                                        sm_scale=1.0 / math.sqrt(d))
  return out.transpose(0, 2, 1, 3)[..., :d]


def chunked_attention(q, k, v, *, causal: bool = False, query_chunk: int | None = None,
                      key_chunk: int | None = None):
  """Attention by blocks, never building ``Lq × Lk`` (see the module docstring). Lengths that
  are not multiples of the blocks are padded; padded keys are masked out."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  cq = min(query_chunk or QUERY_CHUNK, lq)
  ck = min(key_chunk or KEY_CHUNK, lk)
  nq, nk = -(-lq // cq), -(-lk // ck)
  pad = lambda x, n, c: jnp.pad(x, ((0, 0), (0, n * c - x.shape[1]), (0, 0), (0, 0)))
  # [n, B, chunk, H, D]: blocks first, for lax.map and lax.scan.
  blocks = lambda x, n, c: pad(x, n, c).reshape(b, n, c, h, d).swapaxes(0, 1)
  qs = blocks(q.astype(jnp.float32) / math.sqrt(d), nq, cq)
  ks, vs = blocks(k, nk, ck), blocks(v, nk, ck)
  key_pos = jnp.arange(nk * ck).reshape(nk, ck)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def key_block(carry, block, q_block, q_pos):
    """One key block's update of the running maximum ``m``, normaliser ``l`` and output."""
    m, l, acc = carry
    k_block, v_block, pos = block
    logits = jnp.einsum("bqhd,bkhd->bqhk", q_block, k_block.astype(jnp.float32))
    keep = (pos < lk)[None, None, None, :]
    if causal:
      keep = keep & (pos[None, :] <= q_pos[:, None])[None, :, None, :]
    logits = jnp.where(keep, logits, -jnp.inf)
    # The result does not depend on the shift m: no gradient flows through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(axis=-1)))
    # A row whose keys so far are all masked keeps m = -inf: subtract 0 instead (its p are 0).
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - shift[..., None])
    scale = jnp.exp(jnp.where(jnp.isfinite(m), m - shift, -jnp.inf))
    l = l * scale + p.sum(axis=-1)
    acc = acc * scale[..., None] + jnp.einsum("bqhk,bkhd->bqhd", p.astype(v.dtype),
                                              v_block).astype(jnp.float32)
    return (m_new, l, acc), None

  def query_block(inputs):
    q_block, q_index = inputs
    q_pos = q_index * cq + jnp.arange(cq)
    init = (jnp.full((b, cq, h), -jnp.inf, jnp.float32), jnp.zeros((b, cq, h), jnp.float32),
            jnp.zeros((b, cq, h, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(
        lambda carry, block: key_block(carry, block, q_block, q_pos), init, (ks, vs, key_pos))
    return acc / jnp.where(l > 0, l, 1.0)[..., None]

  out = jax.lax.map(query_block, (qs, jnp.arange(nq)))  # [nq, B, cq, H, D]
  return out.swapaxes(0, 1).reshape(b, nq * cq, h, d)[:, :lq].astype(v.dtype)
