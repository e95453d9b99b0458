"""Per-chip memory of distilling Stable Diffusion 1.5, before launching (nothing is allocated).

    python bench/latent_memory.py [--batches=1,4] [--remat=off|on|both]
        [--attention=xla,chunked] [--quick]

1. Parameter counts of the SD 1.5 U-Net, text encoder and VAE from ``jax.eval_shape`` of the
   modules built from their published configs (``distill/latent/reference_configs.py``).
2. State bytes per chip under data parallelism, counted by hand: the student's float32
   parameters, gradients, Adam moments (2×) and EMA, and the frozen teacher U-Net in bfloat16;
   the text encoder and VAE are not resident (latents and prompt embeddings precomputed, as
   MaxDiffusion does by default) — their bfloat16 size is listed for when they are.
3. Activations: XLA's memory analysis (temporary bytes) of the student's forward + backward
   pass at 64×64×4 latents, bfloat16 activations, 77 context tokens, compiled for this CPU at
   each per-chip batch with and without ``remat``. A TPU compile lays memory out differently,
   so this is an estimate, not a guarantee. The teacher's forward pass (no gradient, batch 2B
   for both guidance branches) is smaller than the student's backward pass and is not added.
   ``--attention`` lists the attention implementations to compile with (distill/attention.py):
   ``xla`` builds the full ``L×L`` maps, ``chunked`` never does.
   XLA's CPU compiler does not keep ``jax.checkpoint``'s recomputation (6 attention blocks:
   211 MiB of temporaries with and without it, 32.5 MiB forward only), so ``--remat=on`` rows
   measured here show no saving and say nothing about a TPU compile; the default is off.

4. With ``--plan``: the compiled memory plan of the training itself. The stage-one and
   stage-two train steps of ``configs/sd15.py`` (teacher forwards, student forward and
   backward, Adam, EMA; ``distill.train.make_train_step``), compiled on abstract shapes on a
   ``('data', 'fsdp')`` mesh of ``fsdp`` forced CPU devices (data 1: a larger data axis adds
   no memory per chip) at each per-chip batch (``--plan_batches``) and ``--fsdp`` size. Per
   chip: the arguments (the state's and frozen teacher's shards, the batch's), temporaries,
   and the peak, arguments + temporaries + outputs − the donated state the outputs reuse.
   Attention is the chunked one (``"auto"`` on a CPU at 4096 tokens); a TPU takes the flash
   kernel. ``--plan_dtype=bfloat16`` compiles with bfloat16 activations (``latent.dtype``). Remat rows are asked for with ``--plan_remat``; the CPU compiler shows no saving
   from them (above).

``--quick`` runs a tiny U-Net config instead (for the test suite), and the plan of stage two
on the tiny SD-like fixture with fsdp 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
if __name__ == "__main__":  # the plan's meshes: as many CPU devices as the largest fsdp
  import cpu_devices  # pylint: disable=wrong-import-position
  cpu_devices.force_for_fsdp(default="8,16")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import layout, losses, sharding, train  # noqa: E402
from distill.config_utils import load_config  # noqa: E402
from distill.latent import clip, reference_configs, unet, vae  # noqa: E402
from distill.latent import family as latent_family  # noqa: E402


CHIPS = {"TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "H100": 80}  # HBM GiB per chip
TINY_UNET = dict(reference_configs.SD15_UNET, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                 attention_head_dim=2)


def _params(module, *args):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def activation_bytes(module, params, batch: int, size: int, ctx_dim: int) -> dict:
  """Temporary bytes of ``grad`` of a squared-error loss through ``module`` (XLA analysis)."""
  def loss(p, z, t, c, target):
    return jnp.mean(jnp.square(module.apply({"params": p}, z, t, c) - target))

  args = (params, jax.ShapeDtypeStruct((batch, size, size, 4), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch, 77, ctx_dim), jnp.float32),
          jax.ShapeDtypeStruct((batch, size, size, 4), jnp.float32))
  t0 = time.time()
  compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
  mem = compiled.memory_analysis()
  return {"batch": batch, "temp_bytes": int(mem.temp_size_in_bytes),
          "compile_s": round(time.time() - t0, 1)}


def plan(config, *, batches, fsdps, remats=(False,), stages=("stage_one", "stage_two")):
  """Per-chip memory of the compiled train steps of ``config``'s latent family (section 4 of
  the module docstring); one row per fsdp size, remat, stage and per-chip batch."""
  fam = latent_family.from_config(config, shapes_only=True)
  teacher = fam.models.unet_params
  h, w_, c = fam.x_shape
  ctx = fam.context_table.shape[1:]
  wr = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  rows = []
  for fsdp in fsdps:
    mesh = sharding.make_mesh(fsdp, fsdp=fsdp)
    split = sharding.batch_sharded(mesh)
    for remat in remats:
      fam_r = dataclasses.replace(fam, teacher=fam.teacher.clone(remat=remat),
                                  student=fam.student.clone(remat=remat)) if remat else fam
      student = jax.eval_shape(lambda p, f=fam_r: f.student_from_teacher(p, None), teacher)
      for stage in stages:
        if stage == "stage_one":
          objective, section = losses.stage_one_objective(fam_r, **wr), config.stage_one
          frozen = teacher
        else:
          objective = losses.stage_two_objective(fam_r, **wr)
          section = layout.halving_section(config, 4)
          frozen = {"params": student,
                    "num_student_steps": jax.ShapeDtypeStruct((), jnp.int32)}
        tx, schedule = train.make_optimizer(section)
        step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay,
                                     mesh=mesh)
        state = sharding.abstract_params(mesh, jax.eval_shape(
            lambda s, tx=tx: train.init_state(s, tx), student))
        frozen = sharding.abstract_params(mesh, frozen)
        for b in batches:
          batch = {"latents": jax.ShapeDtypeStruct((b * fsdp, h, w_, c), jnp.float32,
                                                   sharding=split),
                   "context": jax.ShapeDtypeStruct((b * fsdp, *ctx), jnp.float32,
                                                   sharding=split)}
          rows.append({"stage": stage, "fsdp": fsdp, "remat": remat, "batch": b,
                       **common.step_memory(step, state, frozen, batch)})
          print(f"  {stage} fsdp {fsdp} remat {remat} batch {b}: compiled in "
                f"{rows[-1]['compile_s']} s", flush=True)
  return rows


def fits_on(nbytes: int) -> list[str]:
  """The chips of ``CHIPS`` whose memory holds ``nbytes`` with 10 % to spare."""
  return [c for c, hbm in CHIPS.items() if nbytes < 0.9 * hbm * 2**30]


def _print_plan(rows) -> None:
  gib = 2**30
  print("\n| stage | fsdp | remat | per-chip batch | state shards (GiB) | temporaries (GiB) "
        "| peak per chip (GiB) | fits on |\n|---|---|---|---|---|---|---|---|")
  for r in rows:
    fits = fits_on(r["peak_bytes"])
    print(f"| {r['stage']} | {r['fsdp']} | {'on' if r['remat'] else 'off'} | {r['batch']} | "
          f"{r['state_shard_bytes'] / gib:.2f} | {r['temp_bytes'] / gib:.2f} | "
          f"{r['peak_bytes'] / gib:.2f} | {', '.join(fits) or 'none'} |")


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,4")
  parser.add_argument("--remat", default="off", choices=("both", "on", "off"))
  parser.add_argument("--attention", default="xla,chunked",
                      help="comma-separated implementations of distill/attention.py")
  parser.add_argument("--plan", action="store_true",
                      help="also compile the SD 1.5 train steps on fsdp meshes (section 4)")
  parser.add_argument("--plan_batches", default="1,4,8")
  parser.add_argument("--fsdp", default="8,16")
  parser.add_argument("--plan_remat", default="off", choices=("both", "on", "off"))
  parser.add_argument("--plan_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the plan's activations (latent.dtype)")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")] if not args.quick else [1]
  remats = {"both": (False, True), "on": (True,), "off": (False,)}[
      "off" if args.quick else args.remat]
  unet_cfg = unet.UNetConfig.from_diffusers(TINY_UNET if args.quick else reference_configs.SD15_UNET)
  size = 16 if args.quick else 64
  attentions = ("auto",) if args.quick else tuple(args.attention.split(","))
  u_params = _params(unet.UNet2DConditionModel(unet_cfg), jnp.zeros((1, 8, 8, 4)),
                     jnp.zeros((1,)), jnp.zeros((1, 77, unet_cfg.cross_attention_dim)))
  n_unet = _count(u_params)
  n_text = _count(_params(clip.CLIPTextTransformer(clip.CLIPTextConfig.from_transformers(
      reference_configs.SD15_TEXT_ENCODER)), jnp.zeros((1, 77), jnp.int32)))
  n_vae = _count(_params(vae.AutoencoderKL(vae.VAEConfig.from_diffusers(
      reference_configs.SD15_VAE)), jnp.zeros((1, 8, 8, 3))))
  state = {"student params (f32)": 4 * n_unet, "gradients (f32)": 4 * n_unet,
           "Adam moments (f32, 2×)": 8 * n_unet, "EMA (f32)": 4 * n_unet,
           "teacher U-Net (bf16)": 2 * n_unet}
  state_total = sum(state.values())
  rows = []
  for attention in attentions:
    for remat in remats:
      module = unet.UNet2DConditionModel(unet_cfg, dtype=jnp.bfloat16, remat=remat,
                                         attention=attention)
      for b in batches:
        r = activation_bytes(module, u_params, b, size, unet_cfg.cross_attention_dim)
        r.update(remat=remat, attention=attention, total_bytes=state_total + r["temp_bytes"])
        rows.append(r)

  gib = 2**30
  print(f"# python bench/latent_memory.py {' '.join(argv or sys.argv[1:])}")
  print(f"# {common.machine_line()}")
  print(f"U-Net {n_unet:,} parameters, text encoder {n_text:,}, VAE {n_vae:,}"
        f"{' (tiny U-Net: --quick)' if args.quick else ''}\n")
  print("| state per chip | GiB |\n|---|---|")
  for k, v in state.items():
    print(f"| {k} | {v / gib:.2f} |")
  print(f"| **total** | **{state_total / gib:.2f}** |")
  print(f"| (text encoder + VAE in bf16, if resident) | {2 * (n_text + n_vae) / gib:.2f} |\n")
  print("| attention | per-chip batch | remat | activations (GiB) | state + activations (GiB) "
        "| fits on |\n|---|---|---|---|---|---|")
  for r in rows:
    fits = fits_on(r["total_bytes"])
    print(f"| {r['attention']} | {r['batch']} | {'on' if r['remat'] else 'off'} | "
          f"{r['temp_bytes'] / gib:.2f} | "
          f"{r['total_bytes'] / gib:.2f} | {', '.join(fits) or 'none (shard the state)'} |")
  result = {"unet_params": n_unet, "text_params": n_text, "vae_params": n_vae,
            "state_bytes": state_total, "rows": rows}
  if args.plan:
    stages = ("stage_one", "stage_two")
    if args.quick:
      config, fsdps, plan_batches = load_config("sd15:runlocal"), (2,), (1,)
      stages = ("stage_two",)
    else:
      config = common.on_sd15_layout(load_config("sd15"))
      config.latent.dtype = args.plan_dtype
      fsdps = tuple(int(n) for n in args.fsdp.split(","))
      plan_batches = tuple(int(n) for n in args.plan_batches.split(","))
    plan_remats = {"both": (False, True), "on": (True,), "off": (False,)}[args.plan_remat]
    result["plan"] = plan(config, batches=plan_batches, fsdps=fsdps, remats=plan_remats,
                          stages=stages)
    _print_plan(result["plan"])
  print("\n" + json.dumps(result))
  return result


if __name__ == "__main__":
  main()
