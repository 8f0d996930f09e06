"""Pulls and builds that cannot collide or leak: concurrent pulls in real processes, a pull
killed with SIGKILL, a corrupt file in the store, temporaries of dead writers, file modes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from edge_readme.fsutil import atomic_write, pid_alive, remove_orphans
from tests.tiny_models import tiny_config, tiny_tensors, write_gguf

HERE = Path(__file__).parent


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """(env for driver processes, wheel, sha256, log) over a fresh EDGE_README_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_README_HOME", str(home))
    c = tiny_config(layers=1)
    gguf = write_gguf(tmp_path / "tiny.gguf", c, tiny_tensors(c))
    wheel = tmp_path / "tiny_gguf-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, "tiny/model.gguf")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    env = dict(os.environ, EDGE_README_HOME=str(home),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return env, wheel, sha, tmp_path / "downloads.log"


def driver(store, delay: float = 0.0) -> subprocess.Popen:
    env, wheel, sha, log = store
    return subprocess.Popen([sys.executable, str(HERE / "pull_driver.py"), str(wheel), sha,
                             str(log), str(delay)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def downloads(store) -> int:
    log = store[3]
    return len(log.read_text().splitlines()) if log.exists() else 0


def models(store) -> Path:
    return Path(store[0]["EDGE_README_HOME"]) / "models"


def test_concurrent_pulls_wait_and_share_one_download(store):
    first = driver(store, delay=1.5)
    time.sleep(0.5)
    second = driver(store)
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert out1 == out2 and out1.strip().endswith("tiny-gguf.gguf")
    assert downloads(store) == 1  # the second pull waited, then returned the first's result
    assert sorted(p.name for p in models(store).iterdir()) == ["tiny-gguf.gguf",
                                                                 "tiny-gguf.gguf.sha256"]


def test_a_killed_pull_is_cleaned_by_the_next_one(store):
    victim = driver(store, delay=30)
    deadline = time.monotonic() + 20
    while not list(models(store).glob(".pull-*")) if models(store).exists() else True:
        assert time.monotonic() < deadline, "the pull never started"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list(models(store).glob(".pull-*"))  # what kill -9 leaves behind
    after = driver(store)
    out, err = after.communicate(timeout=60)
    assert after.returncode == 0, err
    assert not list(models(store).glob(".pull-*"))
    assert downloads(store) == 2


def test_a_corrupt_file_in_the_store_is_fetched_again(store):
    assert driver(store).wait(60) == 0
    path = models(store) / "tiny-gguf.gguf"
    good = path.read_bytes()
    path.write_bytes(good[:1000])  # truncated, stamp still there
    assert driver(store).wait(60) == 0
    assert downloads(store) == 2 and path.read_bytes() == good
    assert driver(store).wait(60) == 0
    assert downloads(store) == 2  # intact now: no third download


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead, live = dead_pid(), os.getpid()
    for name in (f".m.tmp-{dead}", f".m.tmp-{live}", f".m.old-{dead}", f".pull-{dead}-abc",
                 f".pull-{live}-xyz", "m"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"x" * 100)
    removed = remove_orphans(tmp_path, ".m.tmp-") + remove_orphans(tmp_path, ".m.old-") \
        + remove_orphans(tmp_path, ".pull-")
    assert sorted(p.name for p in removed) == sorted([f".m.tmp-{dead}", f".m.old-{dead}",
                                                     f".pull-{dead}-abc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".m.tmp-{live}", f".pull-{live}-xyz", "m"])


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "bench.json", lambda f: f.write("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "bench.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_atomic_write_removes_a_dead_writers_temporary(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".bench.json.{dead}-x1y2.tmp"
    stale.write_text("half a file")
    live = tmp_path / f".bench.json.{os.getpid()}-a1b2.tmp"
    live.write_text("a write in progress")
    atomic_write(tmp_path / "bench.json", lambda f: f.write("{}"))
    assert not stale.exists() and live.exists()
