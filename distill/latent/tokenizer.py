"""The CLIP BPE tokenizer of a diffusers ``tokenizer/`` folder, through the ``tokenizers`` library.

Reads ``tokenizer.json`` when the folder has one, otherwise builds the standard CLIP tokenizer
from ``vocab.json`` + ``merges.txt``: NFC, whitespace runs → one space, lowercase; split on
CLIP's pattern (contractions, letter runs, single digits, other symbol runs), byte-level
alphabet; BPE with ``</w>`` word ends; ``<|startoftext|>`` … ``<|endoftext|>`` around each
prompt. Prompts are cut to ``max_length`` (77) keeping the end token and padded with the pad
token (``<|endoftext|>`` in Stable Diffusion 1.x), as SD pipelines do.
"""

from __future__ import annotations

import collections
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


def _clip_pipeline(tok: Tokenizer) -> Tokenizer:
  """CLIP's normaliser and split around a BPE model."""
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  return tok


def _with_ends(tok: Tokenizer) -> Tokenizer:
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}",
      special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
  return tok


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
  return _with_ends(_clip_pipeline(tok))


def train_bpe(texts, vocab_size: int) -> Tokenizer:
  """A CLIP-style BPE tokenizer learnt from ``texts``: ``vocab_size`` entries, the 512 byte
  symbols (with and without ``</w>``) first, then one per merge, then ``<|startoftext|>`` and
  ``<|endoftext|>`` last, as in CLIP's vocabulary. Fewer when the texts run out of pairs seen
  twice.

  The words are what the tokenizer's own normaliser and split make of the texts. The merges are
  learnt here rather than by the library's ``BpeTrainer``, whose choice between equally frequent
  pairs varies from run to run (and with it the vocabulary): each merge joins the most frequent
  adjacent pair, ties going to the first pair in string order, so the same texts always give
  the same tokenizer. Encoding is the library's ``BPE`` model."""
  if vocab_size < 2 * 256 + 2:
    raise ValueError(f"vocab_size={vocab_size} must be at least 514 (the 512 byte symbols and the "
                     "two end tokens).")
  splitter = _clip_pipeline(Tokenizer(models.BPE()))
  words = collections.Counter()
  for text in texts:
    for word, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)):
      words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
  alphabet = byte_alphabet()
  ordered = alphabet + [a + "</w>" for a in alphabet]
  known = set(ordered)
  merges = []
  while len(ordered) < vocab_size - 2:
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda pair: (-pairs[pair], pair))
    if pairs[best] < 2:
      break
    merges.append(best)
    joined = best[0] + best[1]
    if joined not in known:  # ("a", "bc") after ("ab", "c"): one token, two merges
      ordered.append(joined)
      known.add(joined)
    words = collections.Counter({_merge(word, best, joined): count
                                 for word, count in words.items()})
  ordered += [BOS, EOS]
  bpe = models.BPE(vocab={token: i for i, token in enumerate(ordered)}, merges=merges,
                   continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS,
                   fuse_unk=False)
  return _with_ends(_clip_pipeline(Tokenizer(bpe)))


def _merge(word: tuple, pair: tuple, joined: str) -> tuple:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(joined)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
         "tokenizer_config.json")


def copy_files(src, dst) -> None:
  """The tokenizer files of folder ``src`` into folder ``dst`` (created)."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for name in FILES:
    if (src / name).exists():
      (dst / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")


def save(tok: Tokenizer, folder, *, max_length: int) -> None:
  """A ``tokenizer/`` folder: ``tokenizer.json``, ``vocab.json`` and ``merges.txt`` (what
  transformers' ``CLIPTokenizer`` reads), and the special tokens, ``<|endoftext|>`` padding."""
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  spec = json.loads(tok.to_str())["model"]
  (folder / "vocab.json").write_text(json.dumps(spec["vocab"], ensure_ascii=False))
  merges = [" ".join(p) if isinstance(p, list) else p for p in spec["merges"]]
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                     encoding="utf-8")
  special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special},
      indent=2))


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
    self.bos_id = self._tok.token_to_id(BOS)
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

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
