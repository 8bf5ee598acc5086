"""The Hugging Face hub: can this machine reach it, and can a hub name be used without it?

`hub_reachable()` answers once per process. With HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)
set the answer is no. Otherwise it opens one TCP connection to the hub's endpoint
(HF_ENDPOINT, else https://huggingface.co; the proxy of HTTPS_PROXY when one is set), name
lookup included, and gives it PROBE_SECONDS in all: a machine without network says so in
seconds, where the Hugging Face libraries spend about a minute in retries (FACTS.md).
When the hub cannot be reached, `go_offline()` switches this process, and the Ray workers
it starts afterwards (`peerlab.train.worker.environment` passes the variables on), to the
libraries' offline mode: a cached tokenizer or dataset then loads from the cache at once.

`check_hub_dataset(entry)`: a hub dataset that cannot be read here (the hub is out of
reach and `datasets` holds no cached copy of it) is a one-line DataError before Ray starts.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PROBE_SECONDS = 5.0
TRUE = ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def offline_requested() -> bool:
    return any(os.environ.get(k, "").strip().lower() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _connects(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds (name lookup included).

    The lookup itself can hang on a machine without network, and no socket timeout bounds it:
    the attempt runs in a thread that is abandoned when the time is up.
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened = threading.Event()

    def attempt() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            opened.set()
        except OSError:
            pass

    threading.Thread(target=attempt, daemon=True).start()
    return opened.wait(timeout)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub can be asked for files (asked once per process); goes offline when it cannot."""
    return not unreachable_reason()


@functools.lru_cache(maxsize=1)
def unreachable_reason() -> str:
    """Why the hub is out of reach, for error messages; "" when it can be reached. Asked once per process."""
    if offline_requested():
        return "this run is offline (HF_HUB_OFFLINE)"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if _connects(proxy or endpoint(), PROBE_SECONDS):
        return ""
    go_offline()
    via = f" through the proxy {proxy}" if proxy else ""
    return f"the hub ({endpoint()}) cannot be reached from this machine{via}"


def go_offline() -> None:
    """The Hugging Face libraries' offline mode, for this process and the Ray workers it starts from now on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Libraries imported already read the variables at import: set their module switches too.
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def dataset_cached(path: str) -> bool:
    """Whether `datasets` holds a copy of hub dataset `path` that it loads offline (its own cache lookup)."""
    import logging

    from datasets.load import CachedDatasetModuleFactory

    if path.count("/") > 1:
        return False
    quiet = logging.getLogger("datasets.load")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns "Using the latest cached version" when it finds one
    try:
        CachedDatasetModuleFactory(path).get_module()
        return True
    except Exception:  # noqa: BLE001 - FileNotFoundError when there is no copy; anything else: no usable one
        return False
    finally:
        quiet.setLevel(level)


def check_hub_dataset(entry) -> None:
    """A hub dataset must be reachable or cached; DataError with one line otherwise. Local entries pass."""
    from peerlab.data.sources import DataError, is_local

    if is_local(entry) or hub_reachable() or dataset_cached(entry.path):
        return
    raise DataError(
        f"dataset '{entry.name}': '{entry.path}' is not a local path and not in the datasets cache, and "
        f"{unreachable_reason()}; run where the hub is reachable, or set the dataset's path to a local copy"
    )
