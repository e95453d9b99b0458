"""Stage-one student from a teacher (paper §3.1): the teacher's network plus a w-embedding."""

from __future__ import annotations

from flax import traverse_util

from distill.models.unet import W_EMBED_NAME


def _shape(x):
  return tuple(getattr(x, "shape", ()))


def student_params_from_teacher(teacher_params, student_init_params):
  """Copies every teacher parameter into a freshly initialised w-conditioned student.

  Only the student's ``w_embed`` subtree keeps its initial values; its last layer is
  zero-initialised, so the student equals the teacher's conditional model for every ``w``.
  Raises ``ValueError`` naming the first parameter path whose presence or shape differs.
  """
  teacher = traverse_util.flatten_dict(teacher_params, sep="/")
  student = traverse_util.flatten_dict(student_init_params, sep="/")
  for path in sorted(teacher):
    if path not in student:
      raise ValueError(f"teacher/student architecture mismatch at {path}: teacher shape "
                       f"{_shape(teacher[path])}, the student has no such parameter; build both "
                       "from the same model config.")
    if _shape(teacher[path]) != _shape(student[path]):
      raise ValueError(f"teacher/student architecture mismatch at {path}: teacher shape "
                       f"{_shape(teacher[path])} vs student shape {_shape(student[path])}; build "
                       "both from the same model config.")
  for path in sorted(student):
    if path not in teacher and not path.startswith(W_EMBED_NAME + "/"):
      raise ValueError(f"teacher/student architecture mismatch at {path}: student shape "
                       f"{_shape(student[path])}, the teacher has no such parameter; build both "
                       "from the same model config.")
  merged = {path: teacher.get(path, value) for path, value in student.items()}
  return traverse_util.unflatten_dict(merged, sep="/")
