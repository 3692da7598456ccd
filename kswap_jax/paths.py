"""Local paths and bucket URLs (`gs://bucket/run`, `s3://...`) alike, through `etils.epath`.

A local path is made absolute (symlinks kept); a URL is kept as given. Light to import (no
JAX), so the command line resolves paths before JAX starts.
"""
from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names a remote file system ("gs://...", "s3://..."), not a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (`os.path.abspath`), a URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def of(path: str | os.PathLike) -> epath.Path:
  """The `epath.Path` of a local path (absolute) or a URL."""
  return epath.Path(absolute(path))
