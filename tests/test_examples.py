"""The examples run as written."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_custom_loop_forgets_and_merges(tmp_path):
  out = subprocess.run([sys.executable, "examples/custom_loop.py", "--steps", "30",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  m = re.search(r"merged: retain top-1 ([\d.]+)% forget top-1 ([\d.]+)% max \|merged - "
                r"adapted\| ([\d.e+-]+)", out.stdout)
  assert m, out.stdout
  retain, forget, diff = map(float, m.groups())
  assert forget < retain and forget < 10.0
  assert diff < 1e-3
