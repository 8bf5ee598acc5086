"""Small C kernels for the CPU, built with the system's C compiler on first use.

torch has no CPU kernel for two of peerlab's inner loops (AdamW on a sparse gradient's rows,
`peerlab.train.row_adamw`; the product-key search, `peerlab.model.search`), so each keeps a
few dozen lines of C here-compiled: `load(name, source)` builds `source` once per machine into
~/.cache/peerlab (PEERLAB_CACHE_DIR), keyed by the source's hash (under a second), and loads it
with ctypes. The loops run on torch's OpenMP runtime (torch ships libgomp, which the loader
reuses) with torch's thread count. Where there is no C compiler, or the build fails, `load`
returns None and the caller uses torch's ops; PEERLAB_NATIVE=0 turns every kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("peerlab")

FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]


def cache_dir() -> Path:
    """Where peerlab keeps what it builds or measures once per machine: ~/.cache/peerlab, or PEERLAB_CACHE_DIR."""
    return Path(os.environ.get("PEERLAB_CACHE_DIR", Path.home() / ".cache" / "peerlab"))


@functools.cache
def load(name: str, source: str) -> ctypes.CDLL | None:
    """The library built from `source` (once per machine, then from the cache), or None where it cannot be built."""
    if os.environ.get("PEERLAB_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("%s: no C compiler found; torch's ops are used", name)
        return None
    key = hashlib.sha256((source + " ".join(FLAGS)).encode()).hexdigest()[:16]
    cache = cache_dir()
    path = cache / f"{name}-{key}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent builders each rename a whole file
                src, built = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([compiler, *FLAGS, str(src), "-o", str(built)], check=True, capture_output=True)
                os.replace(built, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.info("%s: kernel not built (%s %s); torch's ops are used", name, error, detail.decode()[-500:])
        return None
