"""Move registry checkpoints to a GPU machine that has no network, in chunks.

A remote machine that cannot download receives files through a size-limited transfer. This
splits the registry's verified GGUF files into chunks of at most `--chunk-mb` MB, one chunk per
sub-folder (`.gpu/c_00/<file>.part000`, ...), so each transfer carries one sub-folder; on the
remote side `reassemble` concatenates the parts in order, checks each file's sha256 against
the registry and writes the `.sha256` marker the registry trusts, so `decoding.load(name)`
works there with `DECODING_CACHE_DIR` pointing at the output folder.

A tool of the repository, not part of the installed packages: run it as a script from a checkout.

    python tools/gpu_chunks.py split qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct
    # on the remote machine, after copying every chunk folder's files into PARTS:
    python tools/gpu_chunks.py reassemble PARTS OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the checkout's decoding package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decoding import registry  # noqa: E402


def split(names, out=".gpu", chunk_mb: int = 40) -> list[Path]:
    """Write `out/c_XX/<gguf name>.partNNN` chunks for the registry models `names`."""
    out = Path(out)
    folders, index = [], 0
    for name in names:
        path = registry.fetch(name)
        with open(path, "rb") as f:
            part = 0
            while True:
                data = f.read(chunk_mb * 1_000_000)
                if not data:
                    break
                folder = out / f"c_{index:02d}"
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                (folder / f"{path.name}.part{part:03d}").write_bytes(data)
                folders.append(folder)
                index += 1
                part += 1
    return folders


def reassemble(parts_dir, out_dir) -> list[Path]:
    """Concatenate `<name>.partNNN` files, verify each against the registry, write markers."""
    parts_dir, out_dir = Path(parts_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list[Path]] = {}
    for p in sorted(parts_dir.glob("*.part[0-9][0-9][0-9]")):
        by_file.setdefault(p.name.rsplit(".part", 1)[0], []).append(p)
    expected = {e.filename: e for e in registry.list_models()}
    done = []
    for fname, parts in by_file.items():
        if fname not in expected:
            raise SystemExit(f"{fname} is not a registry file; known: {sorted(expected)}")
        entry = expected[fname]
        target = out_dir / fname
        digest = hashlib.sha256()
        with open(target, "wb") as f:
            for p in parts:
                data = p.read_bytes()
                digest.update(data)
                f.write(data)
        if digest.hexdigest() != entry.sha256 or target.stat().st_size != entry.size:
            target.unlink()
            raise SystemExit(f"{fname}: sha256 {digest.hexdigest()} / size mismatch; expected {entry.sha256}. "
                             "A chunk is missing or damaged: send it again.")
        registry.verify(target, entry.sha256, entry.size)  # writes the marker the registry trusts
        done.append(target)
        print(f"{fname}: {len(parts)} parts, sha256 ok")
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("names", nargs="+")
    s.add_argument("--out", default=".gpu")
    s.add_argument("--chunk-mb", type=int, default=40)
    r = sub.add_parser("reassemble")
    r.add_argument("parts_dir")
    r.add_argument("out_dir")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        for folder in split(args.names, args.out, args.chunk_mb):
            print(folder)
    else:
        reassemble(args.parts_dir, args.out_dir)


if __name__ == "__main__":
    main()
