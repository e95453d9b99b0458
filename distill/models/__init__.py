"""Denoising networks and their construction from configs."""

from distill.models.factory import build_unet, init_params, model_input_shape, param_count
from distill.models.student import student_params_from_teacher
from distill.models.unet import UNet, W_EMBED_NAME

__all__ = ["UNet", "W_EMBED_NAME", "build_unet", "init_params", "model_input_shape", "param_count",
           "student_params_from_teacher"]
