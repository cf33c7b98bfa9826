"""Reading the small JSON files this project writes (manifests, options, results, run records).

Each is a JSON object. A truncated copy, a file edited by hand or something else saved under the
same name must be an error naming the file, what is wrong with it and what to do, never a
`JSONDecodeError` traceback or a `KeyError` further on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CorruptJSONError(ValueError):
    """A JSON file that is not valid JSON, or not the JSON object it should be."""


def read_json_object(path: str | Path, *, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; CorruptJSONError naming the file, the problem and `fix`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptJSONError(f"{path} is not valid JSON ({error}): {fix}") from None
    if not isinstance(data, dict):
        raise CorruptJSONError(
            f"{path} should hold a JSON object but holds a {type(data).__name__}: {fix}"
        )
    return data
