"""benchmarks/long_run.py's sampling and verdict (the long run itself is a benchmark, not a test)."""

import os
import subprocess
import sys
import time

from test_end_to_end import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
# pylint: disable=g-import-not-at-top,wrong-import-position
import long_run


def test_sample_counts_the_process_tree_files_and_threads():
  alone = long_run.sample(os.getpid())
  child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 << 20); "
                            "x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"])
  try:
    with_child = alone
    for _ in range(100):  # until the child has touched its 200 MiB
      with_child = long_run.sample(os.getpid())
      if with_child["rss_mib"] > alone["rss_mib"] + 150:
        break
      time.sleep(0.1)
  finally:
    child.kill()
    child.wait()
  assert with_child["rss_mib"] > alone["rss_mib"] + 150
  assert alone["files"] >= 3 and alone["threads"] >= 1


def samples(rss):
  return [dict(seconds=i, step=100 * i, rss_mib=r, files=9, threads=4) for i, r in enumerate(rss)]


def test_growth_after_warm_up_is_held_to_the_bound(capsys):
  # Warm-up (steps below 200) may grow freely; afterwards 0.5 GiB of growth exceeds 100 MiB.
  assert long_run.report(samples([100, 900, 1000, 1010, 1005]), 200, 100.0)
  assert not long_run.report(samples([100, 900, 1000, 1200, 1500]), 200, 100.0)
  assert "growth +500.0" in capsys.readouterr().out
