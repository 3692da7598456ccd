"""Shared fixtures: a private TFDS data dir so tests never touch the user's."""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _tfds_data_dir(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
  yield
  mp.undo()
