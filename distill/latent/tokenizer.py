"""The CLIP BPE tokenizer of a diffusers ``tokenizer/`` folder, through the ``tokenizers`` library.

Reads ``tokenizer.json`` when the folder has one, otherwise builds the standard CLIP tokenizer
from ``vocab.json`` + ``merges.txt``: NFC, whitespace runs → one space, lowercase; split on
CLIP's pattern (contractions, letter runs, single digits, other symbol runs), byte-level
alphabet; BPE with ``</w>`` word ends; ``<|startoftext|>`` … ``<|endoftext|>`` around each
prompt. Prompts are cut to ``max_length`` (77) keeping the end token and padded with the pad
token (``<|endoftext|>`` in Stable Diffusion 1.x), as SD pipelines do.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_alphabet() -> list[str]:
  """CLIP's (GPT-2's) 256 printable stand-ins for the bytes, in vocabulary order: the printable
  bytes ``!``–``~``, ``¡``–``¬``, ``®``–``ÿ`` as themselves, then the others as ``chr(256 + n)``.
  The first 512 vocabulary entries are these and the same with ``</w>``."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  extra = [256 + n for n in range(256 - len(keep))]
  return [chr(c) for c in keep + extra]


def _from_bpe_files(folder: epath.Path) -> Tokenizer:
  vocab = json.loads((folder / "vocab.json").read_text())
  merges = []
  for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
    if line.startswith("#version") or not line.strip():
      continue
    left, right = line.split()
    merges.append((left, right))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                             end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
  return tok


class CLIPTokenizer:
  """``tokenizer(prompts) -> int32 [B, max_length]`` ids, padded as Stable Diffusion pads."""

  def __init__(self, folder, max_length: int = 77):
    folder = epath.Path(folder)
    if (folder / "tokenizer.json").exists():
      self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
      self._tok = _from_bpe_files(folder)
    else:
      raise FileNotFoundError(f"{folder}: a tokenizer folder needs tokenizer.json or vocab.json "
                              "and merges.txt.")
    self._tok.no_padding()
    self._tok.no_truncation()
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      if (folder / name).exists():
        config.update(json.loads((folder / name).read_text()))
    pad = config.get("pad_token", EOS)
    pad = pad["content"] if isinstance(pad, dict) else pad
    self.pad_id = self._tok.token_to_id(pad)
    self.eos_id = self._tok.token_to_id(EOS)
    if self.pad_id is None or self.eos_id is None:
      raise ValueError(f"{folder}: the vocabulary lacks {pad!r} or {EOS!r}.")
    self.max_length = max_length

  def __call__(self, prompts) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    for row, enc in enumerate(self._tok.encode_batch(list(prompts))):
      ids = enc.ids
      if len(ids) > self.max_length:
        ids = ids[:self.max_length - 1] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out
