"""Readable, diff-friendly JSON: objects are indented, lists of scalars stay on one line."""

from __future__ import annotations

import json


def dumps(obj, indent: int = 1, _level: int = 0) -> str:
    pad = " " * (indent * (_level + 1))
    end = " " * (indent * _level)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj) or all(
            isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x) for x in obj
        ) and len(obj) <= 16:
            return json.dumps(obj, ensure_ascii=False)
        items = [pad + dumps(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    return json.dumps(obj, ensure_ascii=False)
