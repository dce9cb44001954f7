"""``tokensieve methods``: the methods with their stages, options, defaults, needs and papers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .. import methods


def describe() -> list[dict[str, Any]]:
    out = []
    for name, cls in sorted(methods.REGISTRY.items()):
        options = {
            f.name: {"type": str(f.type), "default": f.default if f.default is not dataclasses.MISSING else None}
            for f in cls.options().values()
        }
        out.append({"name": name, "stages": list(cls.stages), "options": options, "needs": list(cls.needs),
                    "paper": cls.paper, "summary": (cls.__doc__ or "").strip().splitlines()[0]})
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the pruning methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        opts = ", ".join(f"{k}={v['default']!r}" for k, v in row["options"].items())
        print(f"{row['name']:<14} [{'/'.join(row['stages'])}] {opts}")
        print(f"{'':<14} {row['paper']}")
    return 0
