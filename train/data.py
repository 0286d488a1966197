"""Training data for the MoE language model: a local corpus, a byte-level BPE tokenizer, and a packed,
resumable stream of [B, T+1] token windows.

Default corpus (no download): the Python standard library's source files of the running interpreter,
split into train and validation by file. The tokenizer and the tokenized corpus are cached in the run
directory, so a resumed run sees exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import site
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
EOS = "<|endoftext|>"
STDLIB = "stdlib"
PYTHON = "python"  # `data` keyword: the stdlib and every installed package's Python sources
_CONTROL = [chr(i) for i in range(32) if chr(i) not in "\t\n\r\f\v"] + ["\x7f"]
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", ".hg", ".svn"}


class Document(NamedTuple):
  name: str  # stable identity (relative path, path:line, split:row): decides the train/val split
  text: str
  split: str | None = None  # "train" / "validation" when the source fixes it


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Tokenized train and validation streams (documents joined by EOS)."""
  train: np.ndarray  # [N_train] token ids
  val: np.ndarray  # [N_val] token ids
  vocab_size: int  # size of the tokenizer's vocabulary (<= the model's)
  eos_id: int
  info: dict  # source, documents, bytes, tokens: written to data/corpus.json


# ------------------------------------------------------------------------------------- documents

def load_documents(data: str | os.PathLike | None = None) -> tuple[str, list[Document]]:
  """(source description, documents) of `data`: None (the stdlib), a directory or file of text, or a
  dataset saved with `datasets.save_to_disk`."""
  if data is None:
    root = Path(sysconfig.get_paths()["stdlib"])
    return f"{STDLIB}:{root}", _read_dir(root, (".py",))
  if str(data) == PYTHON:
    roots = python_source_roots()
    return f"{PYTHON}:{','.join(map(str, roots))}", read_roots(roots, (".py",))
  path = Path(data).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"--data {data!s}: no such file or directory")
  if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json",
                                                          "state.json")):
    return f"datasets:{path.absolute()}", _read_hf_dataset(path)
  if path.is_dir():
    docs = _read_dir(path, TEXT_SUFFIXES)
  elif path.suffix in TEXT_SUFFIXES:
    docs = _read_file(path, path.name)
  else:
    raise ValueError(f"--data {path}: unsupported file type {path.suffix!r}; give a directory or a "
                     f"{'/'.join(TEXT_SUFFIXES)} file, or a dataset saved with datasets.save_to_disk")
  docs = [d for d in docs if d.text.strip()]
  if not docs:
    raise ValueError(f"--data {path}: found no non-empty text ({'/'.join(TEXT_SUFFIXES)} files)")
  return f"path:{path.absolute()}", docs


def _read_dir(root: Path, suffixes: tuple[str, ...], skip: set | None = None) -> list[Document]:
  """Text files under `root` (package directories nested in it left out); `skip`: resolved paths
  already read, extended with these."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    for f in sorted(filenames):
      p = Path(dirpath) / f
      if p.suffix in suffixes:
        if skip is not None:
          real = p.resolve()
          if real in skip:
            continue
          skip.add(real)
        docs.extend(_read_file(p, p.relative_to(root).as_posix()))
  return docs


def python_source_roots() -> list[Path]:
  """This Python's stdlib and its package directories (site-packages / dist-packages), existing ones,
  each once, outermost first."""
  paths = sysconfig.get_paths()
  candidates = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
  roots = []
  for c in candidates:
    root = Path(c).resolve()
    if root.is_dir() and root not in roots:
      roots.append(root)
  return roots


def read_roots(roots: list[Path], suffixes: tuple[str, ...]) -> list[Document]:
  """The text files of several directories, named by root index and relative path (a file reachable
  from two roots counts once, under the first)."""
  docs, seen = [], set()
  for i, root in enumerate(roots):
    for d in _read_dir(root, suffixes, skip=seen):
      docs.append(d._replace(name=f"{i}:{d.name}"))
  return docs


def control_share(text: str) -> float:
  """The share of a text's characters that are control characters other than whitespace: about 11 % in
  random bytes, none in prose or code (the Python standard library's source has at most 0.1 %)."""
  return sum(map(text.count, _CONTROL)) / len(text) if text else 0.0


def _read_file(path: Path, name: str) -> list[Document]:
  text = path.read_text(encoding="utf-8", errors="replace")
  share = control_share(text)
  if share > 0.01:
    raise ValueError(f"--data {path}: not text ({share:.0%} control characters); give UTF-8 text files")
  if path.suffix != ".jsonl":
    return [Document(name, text)]
  docs = []
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
      raise ValueError(f"{path}:{i + 1}: each .jsonl line must be an object with a string \"text\" field")
    docs.append(Document(f"{name}:{i}", row["text"]))
  return docs


def _read_hf_dataset(path: Path) -> list[Document]:
  try:
    import datasets  # optional: only for --data pointing at a saved dataset
  except ImportError as e:
    raise ImportError(f"--data {path} is a saved Hugging Face dataset; reading it needs the `datasets` "
                      f"package (pip install datasets)") from e
  loaded = datasets.load_from_disk(str(path))
  splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
  fixed = {"train": "train", "validation": "validation", "valid": "validation", "test": "validation"}
  has_val = any(fixed.get(s) == "validation" for s in splits)
  docs = []
  for split_name, ds in splits.items():
    if "text" not in ds.column_names:
      raise ValueError(f"dataset {path} split {split_name!r} has no \"text\" column ({ds.column_names})")
    split = fixed.get(split_name, "train") if has_val else None
    docs.extend(Document(f"{split_name}:{i}", t, split) for i, t in enumerate(ds["text"]) if t)
  if not docs:
    raise ValueError(f"dataset {path} holds no text")
  return docs


def _hash(name: str, salt: str) -> float:
  """A stable number in [0, 1) for a document name."""
  return zlib.crc32(f"{salt}:{name}".encode()) / 2 ** 32


def select_documents(docs: list[Document], max_bytes: int | None) -> list[Document]:
  """At most `max_bytes` of text, documents taken in a fixed pseudo-random order (diverse, stable)."""
  if not max_bytes:
    return docs
  chosen, total = [], 0
  for d in sorted(docs, key=lambda d: _hash(d.name, "select")):
    if total >= max_bytes:
      break
    chosen.append(d)
    total += len(d.text)
  return chosen


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
  """Train / validation split by document (file), deterministic in the documents' names."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
  if any(d.split for d in docs):
    train = [d for d in docs if d.split != "validation"]
    val = [d for d in docs if d.split == "validation"]
  else:
    train = [d for d in docs if _hash(d.name, "split") >= val_fraction]
    val = [d for d in docs if _hash(d.name, "split") < val_fraction]
  if len(docs) == 1:  # one document: cut it at a line boundary
    lines = docs[0].text.splitlines(keepends=True)
    cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - val_fraction))))
    if len(lines) < 2:
      raise ValueError(f"the corpus is a single one-line document ({docs[0].name}); cannot split it")
    return ([Document(docs[0].name, "".join(lines[:cut]))],
            [Document(docs[0].name + "#val", "".join(lines[cut:]))])
  if not val:  # always hold out at least one document
    first = min(train, key=lambda d: _hash(d.name, "split"))
    train, val = [d for d in train if d is not first], [first]
  if not train:
    raise ValueError("the validation split took every document; give more data")
  return train, val


# ------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` with at most `vocab_size` ids (EOS included)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < 258:
    raise ValueError(f"a byte-level BPE needs vocab_size >= 258, got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def save_tokenizer(tok, run_dir: str | os.PathLike, model_max_length: int | None = None):
  """Save `tok` so that `transformers.AutoTokenizer.from_pretrained(run_dir)` loads it."""
  from transformers import PreTrainedTokenizerFast
  kwargs = {"model_max_length": model_max_length} if model_max_length else {}
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                 pad_token=EOS, **kwargs)
  fast.save_pretrained(str(run_dir))
  # Name the class every transformers version knows (5.x writes its new backend's name).
  cfg_path = Path(run_dir) / "tokenizer_config.json"
  tok_cfg = json.loads(cfg_path.read_text())
  tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def load_tokenizer(run_dir: str | os.PathLike):
  """The run's tokenizer as a `tokenizers.Tokenizer` (fast batch encoding)."""
  from tokenizers import Tokenizer
  path = Path(run_dir) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer at {path}")
  return Tokenizer.from_file(str(path))


def encode_documents(tok, docs: list[Document]) -> np.ndarray:
  """Token ids of the documents, each followed by EOS: [N]."""
  eos = tok.token_to_id(EOS)
  ids = []
  for start in range(0, len(docs), 256):  # bounded memory, parallel inside each batch
    for enc in tok.encode_batch([d.text for d in docs[start:start + 256]]):
      ids.append(np.asarray(enc.ids, np.int32))
      ids.append(np.asarray([eos], np.int32))
  dtype = np.uint16 if tok.get_vocab_size() <= 2 ** 16 else np.int32
  return np.concatenate(ids).astype(dtype) if ids else np.zeros((0,), dtype)


# -------------------------------------------------------------------------------------- prepare

def prepare_corpus(run_dir: str | os.PathLike, vocab_size: int, data: str | os.PathLike | None = None, *,
                   val_fraction: float = 0.05, max_bytes: int | None = None,
                   tokenizer_bytes: int = 4 << 20, model_max_length: int | None = None,
                   log=print) -> Corpus:
  """Tokenizer + tokenized train/val streams of `data`, created once and cached in the run directory.

  The cache is keyed by (source, vocab_size, val_fraction, max_bytes); a run directory prepared from
  other data is refused rather than silently mixed.
  """
  run_dir = Path(run_dir)
  data_dir = run_dir / "data"
  key = {"data": None if data is None else data if str(data) == PYTHON else str(Path(data).expanduser().absolute()),
         "vocab_size": vocab_size, "val_fraction": val_fraction, "max_bytes": max_bytes}
  info_path = data_dir / "corpus.json"
  if info_path.is_file() and (run_dir / "tokenizer.json").is_file():
    info = json.loads(info_path.read_text())
    if info.get("key") != key:
      raise ValueError(f"run directory {run_dir} was prepared with other data settings "
                       f"{info.get('key')} (now {key}); use a new --workdir")
    tok = load_tokenizer(run_dir)
    try:
      train = np.load(data_dir / "train_tokens.npy")
      val = np.load(data_dir / "val_tokens.npy")
    except (OSError, ValueError) as e:
      raise ValueError(f"tokenized corpus cache under {data_dir} is corrupt ({e}); delete {data_dir}") from e
    return Corpus(train, val, tok.get_vocab_size(), tok.token_to_id(EOS), info)

  source, docs = load_documents(data)
  docs = select_documents(docs, max_bytes)
  train_docs, val_docs = split_documents(docs, val_fraction)
  log(f"corpus {source}: {len(train_docs)} train / {len(val_docs)} validation documents, "
      f"{sum(len(d.text) for d in docs) / 1e6:.1f} M characters")
  tok_texts = [d.text for d in select_documents(train_docs, tokenizer_bytes)]
  tok = train_tokenizer(tok_texts, vocab_size)
  train = encode_documents(tok, train_docs)
  val = encode_documents(tok, val_docs)
  data_dir.mkdir(parents=True, exist_ok=True)
  save_tokenizer(tok, run_dir, model_max_length)
  np.save(data_dir / "train_tokens.npy", train)
  np.save(data_dir / "val_tokens.npy", val)
  info = {"key": key, "source": source, "train_documents": len(train_docs),
          "val_documents": len(val_docs), "train_chars": sum(len(d.text) for d in train_docs),
          "val_chars": sum(len(d.text) for d in val_docs), "train_tokens": int(train.size),
          "val_tokens": int(val.size), "tokenizer_vocab": tok.get_vocab_size(),
          "tokenizer_train_chars": sum(map(len, tok_texts))}
  tmp = info_path.with_suffix(".tmp")
  tmp.write_text(json.dumps(info, indent=2) + "\n")
  os.replace(tmp, info_path)  # written last: the cache counts only once complete
  log(f"tokenized: {train.size:,} train / {val.size:,} validation tokens "
      f"({info['train_chars'] / max(train.size, 1):.2f} characters per token)")
  return Corpus(train, val, tok.get_vocab_size(), tok.token_to_id(EOS), info)


# -------------------------------------------------------------------------------------- batches

class BatchStream:
  """Packed [B, T+1] windows of a token stream, shuffled per epoch, addressed by a batch position.

  The stream is cut into non-overlapping windows of T+1 tokens (consecutive windows share one token,
  so every token is a target once per epoch). Batch `position` of epoch `position // batches_per_epoch`
  takes windows from a permutation seeded by (seed, epoch): a position alone resumes the stream exactly.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
    self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
    self.n_windows = (len(tokens) - 1) // seq_len
    self.batches_per_epoch = self.n_windows // batch_size
    if self.batches_per_epoch < 1:
      raise ValueError(f"the training corpus ({len(tokens):,} tokens) is too small for one batch of "
                       f"{batch_size} x {seq_len + 1} tokens; lower --batch-size / --seq-len or give more data")
    self._epoch, self._perm = -1, None

  def batch(self, position: int) -> np.ndarray:
    """Batch number `position` (0-based): int32 [B, T+1]."""
    epoch, j = divmod(position, self.batches_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
    starts = self._perm[j * self.batch_size:(j + 1) * self.batch_size] * self.seq_len
    return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
  """The first windows of the validation stream, in order, as at most `max_batches` [b, T+1] batches."""
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise ValueError(f"the validation split ({len(tokens)} tokens) is shorter than one window of "
                     f"{seq_len + 1} tokens; lower --seq-len or give more validation data")
  b = min(batch_size, n)
  count = min(max_batches, n // b)
  windows = np.arange(count * b) * seq_len
  all_ = tokens[windows[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return [all_[i * b:(i + 1) * b] for i in range(count)]


def unigram_nll(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
  """Mean negative log-likelihood (nats) of `targets` under the add-one unigram model of `train`."""
  counts = np.bincount(train.astype(np.int64), minlength=vocab_size)[:vocab_size].astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[targets.astype(np.int64).reshape(-1)].mean())
