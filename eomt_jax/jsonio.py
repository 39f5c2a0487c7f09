"""Reading the project's JSON inputs (annotation files, checkpoint metadata) with one clear error per problem."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> Any:
    """The parsed file; FileNotFoundError when it is missing, ValueError naming the file when it is not valid
    JSON or lacks one of the top-level `keys`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{p}: missing the key(s) {missing}")
    return data
