"""Shared fixtures: a private TFDS data dir so tests never touch the user's."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _tfds_data_dir(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
  yield
  mp.undo()


@pytest.fixture(autouse=True)
def _fresh_sources():
  """Each test opens its own (often mocked) datasets, not one cached by an earlier test."""
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  builders.source_cache_clear()
  yield
