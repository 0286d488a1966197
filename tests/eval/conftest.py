"""Shared fixtures of the eval tests."""

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "print", "value", "None"]
  for i in range(24):
    lines = [" ".join(words[(i * 7 + j * k) % len(words)] for k in range(8)) for j in range(60)]
    (d / f"doc{i}.py").write_text("\n".join(lines))
  return d
