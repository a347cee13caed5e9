"""Model identity: what every cache keyed by a model must change with.

Two caches outlive a process and key their entries by the model: the score cache
(:mod:`crossrank.cache`, whose Redis entries several servers share) and the ONNX export cache
(:mod:`crossrank.onnx_backend`). Keyed by the path string alone, a Redis cache kept serving
the old model's scores after the weights in that directory were replaced. Both caches now key
by :func:`model_identity`, one rule:

- A local directory: its resolved path and every regular file at its top level (dotfiles
  skipped). A file of at most :data:`SMALL_FILE_BYTES` (config, tokenizer, prompt files) is
  identified by a hash of its bytes. A larger one (the weights) by its name, size and
  modification time, plus a hash of :data:`SAMPLE_BLOCKS` blocks spread over it, which also
  tells apart a same-size replacement whose times were normalised (reproducible image builds
  set every mtime to one value). Hashing gigabytes of weights on every start would cost as
  much as loading them.
- A Hugging Face Hub id: the id and the commit its cached ``config.json`` resolves to (the
  snapshot directory's name), so a new upstream revision is a new identity.

Local identities include file times, so replicas on several hosts share Redis entries only
when their copies of the model keep the files' times (``rsync -a``, ``tar``, one image); a
Hub model is shared by commit. Measured on the shared 2-core test VM under a load of 11
(warm page cache): the bge-reranker-v2-m3 skeleton (9.6 MB ``tokenizer.json`` hashed) 70-90
ms, a 2.2 GB weights file 2-22 ms (16 sampled 64 KiB blocks): small next to loading either.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: Files up to this size are identified by a hash of their whole content.
SMALL_FILE_BYTES = 32 * 1024 * 1024
#: Blocks read, evenly spread, from a larger file (the first and the last included).
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 * 1024


def model_identity(
    source: str, *, revision: str | None = None, hub: dict[str, Any] | None = None
) -> dict[str, str]:
    """The identity of a local model directory or a Hub model (see the module docstring).

    ``hub`` holds the loader's Hub options (``cache_dir``, ``local_files_only`` ...), used to
    find the cached snapshot of a Hub model.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return {"path": str(path.resolve()), "fingerprint": directory_fingerprint(path)}
    return {"hub_id": source, "revision": hub_commit(source, revision=revision, hub=hub)}


def directory_fingerprint(directory: Path) -> str:
    """A hex digest that changes when any top-level file of ``directory`` changes."""
    digest = hashlib.blake2b(digest_size=20)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        stat = entry.stat()
        digest.update(f"{entry.name}\0{stat.st_size}\0".encode("utf-8", "surrogateescape"))
        if stat.st_size <= SMALL_FILE_BYTES:
            digest.update(_file_digest(entry.path))
        else:
            digest.update(f"{stat.st_mtime_ns}\0".encode())
            digest.update(_sampled_digest(entry.path, stat.st_size))
    return digest.hexdigest()


def hub_commit(source: str, *, revision: str | None, hub: dict[str, Any] | None) -> str:
    """The commit a Hub model's cached ``config.json`` resolves to (``revision`` or
    ``"main"`` where the cache does not record one)."""
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    options = dict(hub or {})
    for key in ("trust_remote_code", "revision"):
        options.pop(key, None)
    resolved = cached_file(source, "config.json", revision=revision, **options)
    return extract_commit_hash(resolved, None) or revision or "main"


def _file_digest(path: str) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


def _sampled_digest(path: str, size: int) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    last = max(size - SAMPLE_BLOCK_BYTES, 0)
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.digest()
