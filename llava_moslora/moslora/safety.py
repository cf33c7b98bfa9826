"""Reading tensor files as data: the one place this project calls `torch.load`, and finite checks.

A `.pth` / `.pt` / `.bin` file is a pickle, and a pickle can run any code while it is read
(`torch.load(..., weights_only=False)` does exactly that). Every checkpoint this project reads goes
through `safe_torch_load`, which uses torch's weights-only unpickler: tensors, containers and
numbers load; a class or function (a "global") loads only if the caller allows it by name, for the
duration of this one call (`torch.serialization.safe_globals`, not the process-wide list). The
callers pass exactly what their files need: nothing for adapters, mmengine's and DeepSpeed's
bookkeeping for training checkpoints (`llava_moslora.train.checkpoints.checkpoint_globals`).

A diverged run saves NaN/inf tensors without complaint; `require_finite` refuses them at every
boundary (export, `load_adapter`, eval), naming the tensor and the file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# torch's weights-only unpickler names the refused global in one of these forms:
#   "Unsupported global: GLOBAL os.system was not an allowed global by default ..."
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
SHOWN_KEYS = 3  # non-finite keys named per error


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks for a global (class or function) that is not allowed."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read at all (truncated, not a torch file)."""


class NonFiniteTensorError(ValueError):
    """A tensor holds NaN or inf values (a diverged run, an overflowed cast)."""


def _global_name(item: Any) -> str:
    if isinstance(item, tuple):  # (object, "module.name") pairs are accepted by safe_globals
        return item[1]
    return f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', item)}"


def _refused_global(path: Path, error: Exception, allowed: list[Any]) -> str | None:
    """The global the unpickler refused, or None when the file is no pickle at all (corrupt)."""
    found = _REFUSED_GLOBAL.search(str(error))
    if found:
        return found.group(1)
    try:  # other wordings (REDUCE of an unknown function ...): list the file's globals instead
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not even a pickle: "invalid load key", a text file, ...
        return None
    unexpected = sorted(set(names) - {_global_name(item) for item in allowed})
    return ", ".join(unexpected) or None


def _corrupt(path: Path, error: BaseException) -> CorruptCheckpointError:
    if isinstance(error, (pickle.UnpicklingError, KeyError, IndexError)):
        reason = "its bytes are not a torch file"  # torch's own wording is about weights_only
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CorruptCheckpointError(
        f"{path} is not a readable torch checkpoint ({reason}): the file is truncated or "
        "corrupt. Copy it again or use an earlier checkpoint."
    )


def safe_torch_load(
    path: str | Path,
    *,
    allowed_globals: Iterable[Any] = (),
    map_location: Any = "cpu",
    mmap: bool | None = None,
) -> Any:
    """`torch.load(path, weights_only=True)` with `allowed_globals` allowed for this call only.

    Raises UnsafeCheckpointError naming the refused global and the file, CorruptCheckpointError for
    a file torch cannot read, FileNotFoundError for a missing one. Never runs the file's code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    allowed = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = _refused_global(path, error, allowed)
        if refused is None:
            raise _corrupt(path, error) from None
        raise UnsafeCheckpointError(
            f"{path} asks to load `{refused}`, which is not a tensor, "
            "container or one of the globals allowed in a checkpoint: loading it could run code, "
            "so it was not loaded. Load only checkpoints you trust; if this one is yours, report "
            "the global so it can be reviewed and allowed."
        ) from None
    # A file that is no torch checkpoint at all fails inside the legacy unpickler in many ways
    # (KeyError for a stray opcode byte, ValueError, UnicodeDecodeError ...): all mean "corrupt".
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as error:
        raise _corrupt(path, error) from None


def unreadable_safetensors(path: str | Path, error: Exception) -> CorruptCheckpointError:
    """The error for a `.safetensors` file (or a folder holding some) that cannot be read.

    safetensors' own error does not name the file; for a folder (a model loaded with transformers'
    `from_pretrained`) every `*.safetensors` file under it is opened to find the broken one(s).
    """
    from safetensors import safe_open

    path = Path(path)
    broken = [path]
    if path.is_dir():
        broken = []
        for file in sorted(path.rglob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception:  # noqa: BLE001 - any failure to open it is what is reported
                broken.append(file)
    names = ", ".join(map(str, broken)) or f"a .safetensors file under {path}"
    return CorruptCheckpointError(
        f"{names} is not a readable safetensors file ({error}): the file is truncated or "
        "corrupt. Copy it again, or export the checkpoint again."
    )


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors in `tensors` that hold a NaN or an inf."""
    return [
        key
        for key, tensor in tensors.items()
        if torch.is_tensor(tensor)
        and tensor.is_floating_point()
        and not torch.isfinite(tensor).all()
    ]


def require_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Raise NonFiniteTensorError naming the keys of `tensors` (read from `source`) with NaN/inf."""
    bad = non_finite_keys(tensors)
    if bad:
        more = f" and {len(bad) - SHOWN_KEYS} more" if len(bad) > SHOWN_KEYS else ""
        raise NonFiniteTensorError(
            f"{source}: {len(bad)} tensor(s) hold non-finite (NaN/inf) values, e.g. "
            f"`{'`, `'.join(bad[:SHOWN_KEYS])}`{more}: the run diverged. Use an earlier checkpoint "
            "(or a lower learning rate); a non-finite adapter cannot be exported or evaluated."
        )
