"""Tell a model file's format from its bytes, before anything loads it.

Part of the source stage that imports no torch: the command line refuses a path that holds
no model (missing, empty, a directory, an image, a text file) in a fraction of a second,
instead of after torch's start-up.
"""

from __future__ import annotations

import itertools
import os
import pickle
import pickletools
import zipfile

from modelcheck.errors import SourceError

__all__ = ["ARCHIVES", "sniff"]

ARCHIVES = frozenset({"torchscript", "torch-export", "torch"})
"""The formats that are zip archives, whose records can be checked before loading."""

# The first pickle of a legacy (pre-zip) torch.save file is this number; a plain pickle has none.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Leading bytes of files people mistake for model files.
_FOREIGN_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy array"),
)


def sniff(path: str) -> str:
    """Classify the file: "torchscript", "torch-export", "torch" (torch.save's zip
    archive), "torch-legacy" (torch.save before PyTorch 1.6), "safetensors" or "pickle"
    (a plain pickle). Reads its first KiB and, for an archive, the list of its records.

    Everything else is refused here, before any unpickling, with the reason it was recognised.
    """
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise SourceError(f"{path} is a directory, not a model file")
        with open(path, "rb") as file:
            head = file.read(1024)
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except OSError as error:
        raise SourceError(f"{path} cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise SourceError(f"{path} is empty")
    for signature, what in _FOREIGN_SIGNATURES:
        if head.startswith(signature):
            raise SourceError(f"{path} is not a PyTorch file (looks like {what})")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _archive_kind(path)
    if _looks_like_safetensors(head, size):
        return "safetensors"
    # torch.save always writes pickle protocol 2 or later, whose first byte is PROTO (0x80);
    # protocol 0 text pickles are not worth mistaking every text file for a model.
    if not head.startswith(pickle.PROTO):
        if _looks_like_text(head):
            raise SourceError(f"{path} is not a PyTorch file (looks like a text file)")
        raise SourceError(f"{path} is not a PyTorch file (unrecognised content)")
    return "torch-legacy" if _is_legacy_torch_file(path) else "pickle"


def _archive_kind(path: str) -> str:
    """Tell the zip archives torch writes apart by what they hold: TorchScript (code/ and
    constants.pkl), torch.export (archive_format, models/), torch.save (data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise SourceError(f"{path} is truncated or corrupted (incomplete zip archive)") from None
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "torch-export"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise SourceError(f"{path} is a zip archive but not a PyTorch file (no data.pkl inside)")
    return "torch"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    header_length = int.from_bytes(head[:8], "little")
    return len(head) > 8 and head[8:9] == b"{" and 8 + header_length <= size


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3  # a character cut off by the 1 KiB window
    return True


def _is_legacy_torch_file(path: str) -> bool:
    """Tell a pre-zip torch.save file from a plain pickle by its first pickle, unexecuted."""
    try:
        with open(path, "rb") as file:
            ops = itertools.islice(pickletools.genops(file), 4)  # stop early on a big pickle
            values = [arg for op, arg, _ in ops if op.name != "PROTO"]
    except Exception:  # unparseable: let torch.load report the damage
        return True
    return values == [_LEGACY_MAGIC, None]
