"""Hub ids given on the command line: local files first, a fast one-line failure without network.

transformers treats any name that is not a local folder as a hub id: not cached and with no
network, `from_pretrained` retries for minutes and ends in a traceback. `load_tokenizer` reads the
local folder or the cache without touching the network, and only downloads when the hub answers a
quick TCP connect; otherwise it raises HubUnreachableError with one line that says what to do.
`available_offline` and `unreachable` are that test and that line alone, for names a later process
loads (`train` checks the config's model paths before XTuner starts): one line whatever
HF_HUB_OFFLINE says.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class HubUnreachableError(OSError):
    """A hub id that is neither a local folder nor cached, and the hub cannot be reached."""


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub ($HF_ENDPOINT) accepts a TCP connection (or offline mode)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    if any(os.environ.get(name) for name in PROXY_ENV):
        return True  # through a proxy a direct connect proves nothing: let the download try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (transformers' connection errors span two)."""
    return " ".join(str(error).split()) or type(error).__name__


def is_cached(name: str, filename: str = "config.json") -> bool:
    """Whether hub repo `name` has `filename` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except HFValidationError:  # not a valid repo id either
        return False


def unreachable(name: str, argument: str) -> HubUnreachableError:
    """The one-line error for `name` (given as `argument`): not local, not cached, hub offline."""
    return HubUnreachableError(
        f"`{argument}` {name!r} is not a local folder nor in the Hugging Face cache, and the "
        "hub cannot be reached (offline). Pass a local folder, or download it first where "
        f"there is network: `huggingface-cli download {name}`."
    )


def available_offline(name: str, filename: str = "config.json") -> bool:
    """Whether `name` loads without the network: a local path, or a hub id with `filename` cached."""
    return Path(name).exists() or is_cached(name, filename)


def load_tokenizer(name: str, *, trust_remote_code: bool = False, argument: str = "--tokenizer"):
    """`AutoTokenizer.from_pretrained(name)`, never waiting on a network that is not there."""
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if Path(name).is_dir():
        return AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the cache: a download is needed
    if not hub_reachable():
        raise unreachable(name, argument)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as error:  # through a proxy that leads nowhere, a connection reset ...
        raise HubUnreachableError(
            f"`{argument}` {name!r} could not be downloaded ({one_line(error)}). Pass a local "
            f"folder, or download it first where there is network: `huggingface-cli download "
            f"{name}`."
        ) from None
