"""The input benchmarks run against the library as it is, at tiny sizes: each script in a fresh
process, as its README command runs it."""
import json
import os
import subprocess
import sys

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _run(script: str, *args: str, env: dict | None = None) -> str:
  out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                       capture_output=True, text=True, check=False, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_input_speed_measures_every_crop_filter_and_worker_count(tmp_path):
  data_dir = str(tmp_path / "n40_c4")
  common = ["--data_dir", data_dir, "--images", "40", "--classes", "4", "--batch", "8",
            "--speed_batches", "2", "--raw_images", "8"]
  env = {**os.environ, "KSWAP_CACHE": str(tmp_path / "cache")}
  assert json.loads(_run("input_speed.py", "--phase", "build", *common,
                         env=env).splitlines()[-1])["images"] == 40
  speed = json.loads(_run("input_speed.py", "--phase", "speed", *common,
                          env=env).splitlines()[-1])
  assert set(speed["raw_decode"]) == {"pillow", "opencv"}
  rows = {(r["crop_filter"], r["workers"]): r for r in speed["pipeline"]}
  assert set(rows) == {(f, w) for f in ("antialias", "bilinear") for w in (0, 1, 2)}
  for row in rows.values():
    assert row["images"] == 16 and row["images_per_cpu_s"] > 0
    assert row["vs_pillow_decode_per_core_%"] > 0 and row["vs_opencv_decode_per_core_%"] > 0


def test_decode_options_checks_pixels_and_leaves_out_missing_libraries(tmp_path):
  out = tmp_path / "decode_options.json"
  _run("decode_options.py", "--images", "4", "--rounds", "1", "--out", str(out))
  result = json.loads(out.read_text())
  ways = [r["way"] for r in result["rows"]]
  assert ways[:2] == ["pillow decode", "pillow crop antialias"] and "opencv crop linear" in ways
  checks = result["max_abs_pixel_difference"]
  assert checks["opencv decode vs pillow decode"] == 0
  assert checks["opencv + pillow antialias vs pillow crop antialias"] == 0
