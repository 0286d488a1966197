"""Training the MoE LM: loss goes down, an interrupted run resumes to the same parameters, the run
directory is self-contained, and bad data is reported clearly."""

import dataclasses
import json
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmoe import checkpoint, config
from train import data as data_lib, train_model

# save_optimizer=False as the main job trains (one setting for all tests: one compile of the step)
SETTINGS = train_model.TrainSettings(steps=24, batch_size=4, seq_len=32, lr=3e-3, warmup=4, eval_every=12,
                                     eval_batches=2, ckpt_every=8, log_every=4, max_minutes=10,
                                     save_optimizer=False)
QUIET = {"progress": False, "log": lambda msg: None}


def _write_corpus(root):
  """24 small files of sentences from a tiny grammar: learnable in a few dozen steps."""
  rng = np.random.default_rng(0)
  parts = [["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"],
           ["sees", "likes", "follows", "finds", "watches", "calls"],
           ["the ball", "a red car", "the river", "some bread", "the house", "a green tree"],
           ["today", "again", "in the morning", "every day", "slowly", "at night"]]
  root.mkdir()
  for f in range(24):
    lines = [" ".join(rng.choice(p) for p in parts) + "." for _ in range(150)]
    (root / f"doc{f:02d}.txt").write_text("\n".join(lines) + "\n")
  return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return _write_corpus(tmp_path_factory.mktemp("data") / "corpus")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus):
  workdir = tmp_path_factory.mktemp("runs") / "full"
  summary = train_model.train_and_evaluate(config.tiny(), workdir, SETTINGS, data=corpus, **QUIET)
  return workdir, summary


def _params(run_dir):
  return nnx.state(checkpoint.load_model(run_dir)[1], nnx.Param)


def test_tiny_run_lowers_validation_loss_and_leaves_a_complete_run_dir(full_run):
  workdir, summary = full_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in records if r["split"] == "val"]
  assert val[0]["step"] == 0 and val[-1]["step"] == SETTINGS.steps
  assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
  assert summary["val_ppl"] < summary["unigram_ppl"]
  assert len(summary["load_entropy"]) == config.tiny().n_layers
  assert all(0.5 < h <= 1.0 for h in summary["load_entropy"])
  assert summary["stopped_by"] == "steps" and summary["step"] == SETTINGS.steps
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "summary.json", "metrics.jsonl"):
    assert (workdir / name).is_file(), name
  assert json.loads((workdir / "summary.json").read_text())["val_loss"] == pytest.approx(summary["val_loss"])
  assert [s for s, _ in checkpoint.list_checkpoints(workdir)] == [16, 24]  # keep=2
  cfg, _ = checkpoint.load_model(workdir)
  assert cfg == config.tiny()


def test_tokenizer_loads_with_auto_tokenizer(full_run):
  from transformers import AutoTokenizer
  workdir, _ = full_run
  tok = AutoTokenizer.from_pretrained(str(workdir))
  text = "the cat sees a red car today.\nthe dog"
  ids = tok(text)["input_ids"]
  assert tok.decode(ids) == text
  assert max(ids) < config.tiny().vocab_size and tok.eos_token == data_lib.EOS


def test_interrupted_run_stops_then_resumes_to_the_same_parameters(full_run, corpus, tmp_path, monkeypatch):
  workdir = tmp_path / "interrupted"
  batch = data_lib.BatchStream.batch

  def batch_then_ctrl_c(self, position):  # Ctrl-C arrives while step 11 is running
    if position == 10:
      signal.raise_signal(signal.SIGINT)
    return batch(self, position)

  def batch_then_fail(self, position):  # an error (or a second Ctrl-C) inside step 15
    if position == 14:
      raise KeyboardInterrupt
    return batch(self, position)

  handler_before = signal.getsignal(signal.SIGINT)
  for interrupt, step in ((batch_then_ctrl_c, 11), (batch_then_fail, 14)):
    monkeypatch.setattr(data_lib.BatchStream, "batch", interrupt)
    with pytest.raises(KeyboardInterrupt):  # the caller stops too: it never sees a half-trained model
      train_model.train_and_evaluate(config.tiny(), workdir, SETTINGS, data=corpus, **QUIET)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    saved = checkpoint.latest_checkpoint(workdir)
    assert saved.name == f"step_{step:08d}" and checkpoint.read_meta(saved)["has_opt_state"]
    assert not (workdir / "summary.json").exists()
  monkeypatch.setattr(data_lib.BatchStream, "batch", batch)

  # A planned stop (schedule unchanged) and a second resume reach the uninterrupted run's parameters.
  stopped = train_model.train_and_evaluate(config.tiny(), workdir, SETTINGS, data=corpus, stop_at=17,
                                           **QUIET)
  assert stopped["stopped_by"] == "stop_at" and stopped["step"] == 17
  final = train_model.train_and_evaluate(config.tiny(), workdir, SETTINGS, data=corpus, **QUIET)
  assert final["step"] == SETTINGS.steps and final["train_tokens_this_run"] == 7 * 4 * 32  # 17 -> 24
  for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(_params(full_run[0]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise: same steps, same data
  assert final["val_loss"] == full_run[1]["val_loss"]
  assert not checkpoint.read_meta(checkpoint.latest_checkpoint(workdir))["has_opt_state"]

  # The finished model (no optimizer state) is done: a further call trains nothing and returns its summary.
  metrics = (workdir / "metrics.jsonl").read_text()
  again = train_model.train_and_evaluate(config.tiny(), workdir, SETTINGS, data=corpus, **QUIET)
  assert again == json.loads((workdir / "summary.json").read_text()) and again["step"] == SETTINGS.steps
  assert (workdir / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_other_settings(full_run, corpus):
  other = dataclasses.replace(SETTINGS, batch_size=2, steps=30)
  with pytest.raises(ValueError, match="batch_size/seq_len/seed"):
    train_model.train_and_evaluate(config.tiny(), full_run[0], other, data=corpus, **QUIET)
  with pytest.raises(ValueError, match="--no-resume"):
    train_model.train_and_evaluate(config.tiny(), full_run[0], SETTINGS, data=corpus, resume=False, **QUIET)


def test_bad_data_paths_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    train_model.main(["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--data",
                      str(tmp_path / "missing")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="found no non-empty text"):
    data_lib.load_documents(tmp_path / "empty")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unsupported file type"):
    data_lib.load_documents(tmp_path / "x.csv")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    data_lib.load_documents(tmp_path / "bad.jsonl")


def test_help_explains_every_option(capsys):
  with pytest.raises(SystemExit):
    train_model.parse_args(["--help"])
  out = capsys.readouterr().out
  for opt in ("--preset", "--workdir", "--data", "--steps", "--batch-size", "--seq-len", "--lr", "--warmup",
              "--max-minutes", "--eval-every", "--ckpt-every", "--seed", "--resume", "--no-resume"):
    assert opt in out, opt


def test_documents_split_by_file_deterministically(tmp_path):
  root = _write_corpus(tmp_path / "c")
  (root / "more.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)) + "\n")
  _, docs = data_lib.load_documents(root)
  assert len(docs) == 24 + 5
  train, val = data_lib.split_documents(docs, 0.2)
  train2, val2 = data_lib.split_documents(list(reversed(docs)), 0.2)
  assert {d.name for d in val} == {d.name for d in val2} and val and train
  assert not {d.name for d in train} & {d.name for d in val}
  one_train, one_val = data_lib.split_documents([data_lib.Document("a.txt", "x\n" * 100)], 0.1)
  assert len(one_train[0].text) + len(one_val[0].text) == 200 and one_val[0].text


def test_default_corpus_is_the_standard_library():
  source, docs = data_lib.load_documents(None)
  assert source.startswith("stdlib:") and len(docs) > 100
  assert not any("site-packages" in d.name or "__pycache__" in d.name for d in docs)


def test_the_python_corpus_is_the_stdlib_and_the_package_directories(tmp_path, monkeypatch):
  """`data="python"`: every root's .py files, each file once (a package directory inside the stdlib,
  or a root reached twice, is read under its first root only), names unique across roots."""
  roots = [tmp_path / "lib", tmp_path / "lib" / "site-packages"]
  (roots[1] / "pkg").mkdir(parents=True)
  (roots[0] / "os.py").write_text("import sys\n")
  (roots[1] / "pkg" / "__init__.py").write_text("x = 1\n")
  (roots[1] / "os.py").write_text("y = 2\n")  # same relative name as the stdlib's
  (roots[1] / "notes.txt").write_text("not python\n")
  monkeypatch.setattr(data_lib, "python_source_roots", lambda: roots + [roots[0]])
  source, docs = data_lib.load_documents(data_lib.PYTHON)
  assert source.startswith("python:")
  assert sorted((d.name, d.text) for d in docs) == [("0:os.py", "import sys\n"), ("1:os.py", "y = 2\n"),
                                                     ("1:pkg/__init__.py", "x = 1\n")]
  assert all(r.is_dir() for r in data_lib.python_source_roots())  # this Python's, for real
  assert train_model.train_settings("gpu_fine").corpus == data_lib.PYTHON


def test_batch_stream_is_resumable_from_a_position():
  tokens = np.arange(1000, dtype=np.uint16)
  a = data_lib.BatchStream(tokens, 4, 16, seed=3)
  b = data_lib.BatchStream(tokens, 4, 16, seed=3)
  seen = [a.batch(p) for p in range(40)]  # crosses epochs (15 batches each)
  assert np.array_equal(b.batch(33), seen[33]) and np.array_equal(b.batch(2), seen[2])
  assert seen[0].shape == (4, 17) and seen[0].dtype == np.int32
  assert np.array_equal(seen[0][:, 1:], seen[0][:, :-1] + 1)  # contiguous windows
  epoch0 = np.concatenate(seen[:15])[:, 0]
  assert len(set(epoch0.tolist())) == 60  # each window once per epoch
  with pytest.raises(ValueError, match="too small"):
    data_lib.BatchStream(tokens[:40], 4, 16, seed=0)


def test_saved_dataset_without_the_datasets_package_is_a_clear_error(tmp_path):
  try:
    import datasets  # noqa: F401
  except ImportError:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ImportError, match="pip install datasets"):
      data_lib.load_documents(tmp_path / "ds")
  else:
    pytest.skip("datasets is installed")
