"""Shared fixtures: a private TFDS data dir so tests never touch the user's, one on-disk
compilation cache for the session (and the processes it starts), so the many runs of the same
tiny configs compile each program once, and XLA's quick compilation (below)."""
import os

import jax
import pytest

# The suite compiles hundreds of programs for tiny models, and compiling costs more CPU time
# than running them: XLA's backend optimisation is turned off for the session and the processes
# it starts (jax_disable_most_optimizations: LLVM at -O0; the same HLO, its results equal within
# float rounding). JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment runs the suite fully
# optimised.
QUICK_COMPILE = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


@pytest.fixture(autouse=True, scope="session")
def _tfds_data_dir(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("tfds")))
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  for name, value in (("jax_compilation_cache_dir", cache),
                      ("jax_persistent_cache_min_compile_time_secs", 0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    mp.setenv(name.upper(), str(value))  # processes the tests start
    jax.config.update(name, value)
  mp.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", QUICK_COMPILE)
  jax.config.update("jax_disable_most_optimizations",
                    QUICK_COMPILE.lower() in ("1", "true", "yes", "on"))
  yield
  mp.undo()


@pytest.fixture(autouse=True)
def _fresh_sources():
  """Each test opens its own (often mocked) datasets, not one cached by an earlier test."""
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  builders.source_cache_clear()
  yield
