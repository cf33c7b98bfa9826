"""Reading tensor files as data: the one place this project calls `torch.load`, and finite checks.

A `.pth` / `.pt` / `.bin` file is a pickle, and a pickle can run any code while it is read
(`torch.load(..., weights_only=False)` with the stock pickle module does exactly that). Every
checkpoint this project reads goes through `safe_torch_load`, which unpickles with torch's own
weights-only unpickler: tensors, containers and numbers load; a class or function (a "global")
loads only if the caller allows it by name. The callers pass exactly what their files need:
nothing for adapters, mmengine's and DeepSpeed's bookkeeping for training checkpoints
(`llava_moslora.train.checkpoints.checkpoint_globals`).

The allowed globals are private to the call. torch keeps one allow-list per process
(`torch.serialization.add_safe_globals`, and `safe_globals`, which adds to that same list for the
duration of a `with` block): anything registered there widens every other `torch.load` in the
process, and two threads entering and leaving `safe_globals` can leave it widened for good. So
`safe_torch_load` leaves that list alone (unless TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, see there):
it hands `torch.load` a private instance of torch's weights-only unpickler module
(`_restricted_unpickler`), whose allow-list is the caller's and nothing else, as `pickle_module`
-- what `torch.load(weights_only=True)` does with the shared one. A list registered process-wide
by someone else is therefore not honoured here either.

A diverged run saves NaN/inf tensors without complaint, and a cast to float16 turns finite values
above 65504 into inf; `require_finite` (tensors in memory) and `non_finite_keys_in_file` (a
written `.safetensors` file) find them at every boundary (export, `load_adapter`, eval), and the
errors name the tensor and the file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch._weights_only_unpickler

# torch's weights-only unpickler names the refused global in one of these forms:
#   "Unsupported global: GLOBAL os.system was not an allowed global by default ..."
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
# and an allowed stand-in that refuses its arguments (`llava_moslora.train.checkpoints`) as
#   "GLOBAL builtins.getattr(<builtin_function_or_method>, '__self__') is not allowed ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+(?:\([^)]*\))?)")
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


def private_module_copy(module: types.ModuleType, name: str) -> types.ModuleType:
    """A fresh instance of `module`, run from its own source file, that only the caller holds.

    Its globals are its own: rebinding one (an allow-list, the `torch` a loader calls) changes
    nothing for `module` or anyone else in the process, so there is nothing to restore and no
    other thread can see it half-done. The copy is not put in `sys.modules`.
    """
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def _weights_only_forced() -> bool:
    """Whether TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, read as torch.load reads it."""
    return os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")


@functools.cache
def _restricted_unpickler(allowed: frozenset) -> types.ModuleType:
    """torch's weights-only unpickler module with `allowed` as its (private) user allow-list."""
    unpickler = private_module_copy(
        torch._weights_only_unpickler, "llava_moslora._weights_only_unpickler"
    )
    unpickler._add_safe_globals(list(allowed))  # the copy's own list: torch's stays as it is
    return unpickler


def safe_torch_load(
    path: str | Path,
    *,
    allowed_globals: Iterable[Any] = (),
    map_location: Any = "cpu",
    mmap: bool | None = None,
) -> Any:
    """`torch.load(path, weights_only=True)` with exactly `allowed_globals` allowed, for this call.

    Raises UnsafeCheckpointError naming the refused global and the file, CorruptCheckpointError for
    a file torch cannot read, FileNotFoundError for a missing one. Never runs the file's code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    allowed = list(allowed_globals)
    try:
        if _weights_only_forced():
            # TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch refuse any `pickle_module`: its own
            # unpickler then, with `allowed` in the shared list for this call (classes, and a
            # getattr that answers HistoryBuffer's statistics only: nothing that runs code).
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        # weights_only=False only because torch refuses a `pickle_module` with True: the module
        # passed is torch's weights-only unpickler itself (a private copy, `allowed` its list).
        return torch.load(
            path,
            map_location=map_location,
            weights_only=False,
            pickle_module=_restricted_unpickler(frozenset(allowed)),
            mmap=mmap,
        )
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


DIVERGED = (
    "the run diverged. Use an earlier checkpoint (or a lower learning rate); a non-finite adapter "
    "cannot be exported or evaluated."
)


def non_finite_error(
    bad: list[str], source: str | Path, why: str = DIVERGED
) -> NonFiniteTensorError:
    """The error naming the non-finite keys `bad` of `source` (the first SHOWN_KEYS of them)."""
    more = f" and {len(bad) - SHOWN_KEYS} more" if len(bad) > SHOWN_KEYS else ""
    return NonFiniteTensorError(
        f"{source}: {len(bad)} tensor(s) hold non-finite (NaN/inf) values, e.g. "
        f"`{'`, `'.join(bad[:SHOWN_KEYS])}`{more}: {why}"
    )


def require_finite(
    tensors: Mapping[str, torch.Tensor], source: str | Path, why: str = DIVERGED
) -> None:
    """Raise NonFiniteTensorError naming the keys of `tensors` (read from `source`) with NaN/inf."""
    bad = non_finite_keys(tensors)
    if bad:
        raise non_finite_error(bad, source, why)


def non_finite_keys_in_file(path: str | Path) -> list[str]:
    """The keys of a `.safetensors` file's floating-point tensors that hold a NaN or an inf.

    One tensor in memory at a time (a merged model's shards are gigabytes), as written on disk.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        keys = file.keys()  # safe_open is not iterable
        return [key for key in keys if non_finite_keys({key: file.get_tensor(key)})]
