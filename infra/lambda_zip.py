#!/usr/bin/env python3
"""The Lambda package: assemble a byte-reproducible zip (bootstrap, libonnxruntime.so, model/) and check it.

  python infra/lambda_zip.py build --out ZIP --bootstrap B --lib L --model-dir D --arch x86_64
  python infra/lambda_zip.py check build/lambda/http-function.zip [--arch x86_64]

`check` is what a test of `make lambda` needs: the layout, executable bits, ELF machine, and Lambda's size limits.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

# Lambda's quota: 250 MB unzipped for the function and all its layers together ("smaller than 262144000 bytes").
UNZIPPED_LIMIT = 250 * 1024 * 1024
# Above this a zip cannot be uploaded directly with CreateFunction/UpdateFunctionCode; it must go through S3.
DIRECT_UPLOAD_LIMIT = 50 * 1024 * 1024
BOOTSTRAP = "bootstrap"
LIBRARY = "libonnxruntime.so"
MODEL_PREFIX = "model/"
MODEL_REQUIRED = ("manifest.json", "model.onnx", "tokenizer.json")
ELF_MACHINES = {"x86_64": 62, "arm64": 183}  # e_machine: EM_X86_64, EM_AARCH64
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: identical inputs give identical bytes, so sam deploy skips re-upload


class PackageError(Exception):
    """The package cannot be built, or breaks a rule."""


def elf_machine(data: bytes) -> int | None:
    """e_machine of a 64-bit little-endian ELF file, else None."""
    if len(data) < 20 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    return struct.unpack_from("<H", data, 18)[0]


def check_elf(path_or_name: str, head: bytes, arch: str) -> None:
    machine = elf_machine(head)
    if machine is None:
        raise PackageError(f"{path_or_name}: not a 64-bit little-endian ELF file")
    if machine != ELF_MACHINES[arch]:
        names = {v: k for k, v in ELF_MACHINES.items()}
        raise PackageError(f"{path_or_name}: built for {names.get(machine, f'e_machine {machine}')}, package is {arch}")


def _add(zf: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    info.create_system = 3  # unix, so external_attr carries the mode
    info.external_attr = mode << 16
    if name.endswith("/"):
        info.compress_type = zipfile.ZIP_STORED
        zf.writestr(info, b"")
    else:
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data, compresslevel=6)


def build(out: Path, bootstrap: Path, lib: Path, model_dir: Path, arch: str) -> None:
    """Writes the zip atomically. Files of the model directory are included whatever their names (symlinks followed)."""
    for required in MODEL_REQUIRED:
        if not (model_dir / required).is_file():
            raise PackageError(f"{model_dir}: {required} missing (run `make setup`)")
    model_files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    check_elf(str(bootstrap), bootstrap.read_bytes()[:64], arch)
    check_elf(str(lib), lib.read_bytes()[:64], arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            _add(zf, BOOTSTRAP, bootstrap.read_bytes(), 0o100755)
            _add(zf, LIBRARY, lib.read_bytes(), 0o100755)
            _add(zf, MODEL_PREFIX, b"", 0o40755)
            for f in model_files:
                _add(zf, MODEL_PREFIX + f.name, f.read_bytes(), 0o100644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check(path: Path, arch: str | None, limit: int = UNZIPPED_LIMIT) -> list[tuple[str, int]]:
    """Checks a package; returns (name, size) of its files. Raises PackageError naming the first broken rule."""
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for name in (BOOTSTRAP, LIBRARY, *(MODEL_PREFIX + m for m in MODEL_REQUIRED)):
            if name not in infos:
                raise PackageError(f"{path}: {name} missing (layout: bootstrap, {LIBRARY}, {MODEL_PREFIX}...)")
        for name in (BOOTSTRAP, LIBRARY):
            mode = infos[name].external_attr >> 16
            if not mode & 0o111:
                raise PackageError(f"{path}: {name} is not executable (mode {oct(mode)})")
        unexpected = [n for n in infos if n not in (BOOTSTRAP, LIBRARY) and not n.startswith(MODEL_PREFIX)]
        if unexpected:
            raise PackageError(f"{path}: unexpected entries {unexpected}")
        if arch:
            for name in (BOOTSTRAP, LIBRARY):
                with zf.open(name) as f:
                    check_elf(f"{path}:{name}", f.read(64), arch)
        files = [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
    total = sum(size for _, size in files)
    if total > limit:
        raise PackageError(f"{path}: {total / 1e6:.1f} MB unzipped, over Lambda's limit of {limit / 1e6:.1f} MB")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--bootstrap", type=Path, required=True)
    b.add_argument("--lib", type=Path, required=True)
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--arch", choices=sorted(ELF_MACHINES), default="x86_64")
    c = sub.add_parser("check")
    c.add_argument("zip", type=Path)
    c.add_argument("--arch", choices=sorted(ELF_MACHINES))
    c.add_argument("--limit", type=int, default=int(os.environ.get("LAMBDA_UNZIPPED_LIMIT", UNZIPPED_LIMIT)))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.out, args.bootstrap, args.lib, args.model_dir, args.arch)
            print(f"wrote {args.out}")
            return 0
        files = check(args.zip, args.arch, args.limit)
    except PackageError as e:
        print(f"lambda_zip: {e}", file=sys.stderr)
        return 1
    for name, size in files:
        print(f"  {size / 1e6:9.1f} MB  {name}")
    total, zipped = sum(s for _, s in files), args.zip.stat().st_size
    print(f"  {total / 1e6:9.1f} MB  unzipped (limit {args.limit / 1e6:.1f} MB, function + layers)")
    note = (
        " (over 50 MB: deploy through S3, as sam deploy does with resolve_s3)" if zipped > DIRECT_UPLOAD_LIMIT else ""
    )
    print(f"  {zipped / 1e6:9.1f} MB  zipped{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
