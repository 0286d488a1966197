"""Fixtures shared by the offload tests: tiny models and their exact reference runs, built once."""

import pytest

from tests.offload.reference_runs import VARIANTS, build_reference


@pytest.fixture(scope="session")
def built_references():
  return {}


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def reference(request, built_references):
  return build_reference(built_references, request.param)


@pytest.fixture(scope="session")
def swiglu_reference(built_references):
  return build_reference(built_references, "swiglu")
