"""The shipped image task suite written as lmms-eval tasks: one folder per task, loaded by lmms-eval
with ``--include_path DIR --tasks tokensieve_<task>``, from local files only (no hub).

Each folder ``tokensieve_<task>/`` holds ``tokensieve_<task>.yaml``, ``test.jsonl`` (one row per item:
``id``, ``image``, ``question``, ``answer``), ``images/<id>.png`` and ``utils.py`` (a copy of
:mod:`.task_utils`). The items are test split items ``0..N-1`` of
:func:`tokensieve.tasks.generate`, the items ``tokensieve eval --limit N`` evaluates. The YAML asks
for the generation ``tokensieve eval`` runs (greedy, 3 new tokens) and scores by strict exact match,
tokensieve's own rule, so lmms-eval's ``exact_match`` is ``tokensieve eval``'s accuracy. Task names
carry the ``tokensieve_`` prefix because lmms-eval ignores an included task named like a built-in one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ... import __version__
from ...evaluation import Prompting, resolve_tasks
from ...tasks import generate
from . import task_utils

TASK_PREFIX = "tokensieve_"
"""The name prefix of the exported tasks (an included task named like a built-in one is ignored)."""

YAML = """\
# {name}: test split items 0..{last} of tokensieve's {task} task (tokensieve.tasks.generate("{task}", "test", {limit})),
# written by `tokensieve export-lmms-tasks` (tokensieve {version}). Run with
#   lmms-eval --model tokensieve --include_path <this folder's parent> --tasks {name} ...
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def task_names(spec: str) -> list[str]:
    """The image tasks ``spec`` names: one task, several joined by commas, or ``all``."""
    names = [t for part in spec.split(",") for t in resolve_tasks(part.strip(), "image")]
    return list(dict.fromkeys(names))


def export(out: Path, limit: int, tasks: list[str]) -> list[Path]:
    """Write the folders of ``tasks`` (image task names) under ``out`` with ``limit`` items each; returns
    the YAML paths.

    Raises:
        ValueError: ``limit`` below 1, or a task folder that already exists (checked before writing).
    """
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    folders = {task: out / f"{TASK_PREFIX}{task}" for task in tasks}
    taken = [str(f) for f in folders.values() if f.exists()]
    if taken:
        raise ValueError(f"task folders already exist: {', '.join(taken)}; remove them or choose another --out")
    max_new_tokens = Prompting(processor=None, tiny=False).max_new_tokens
    written = []
    for task, folder in folders.items():
        (folder / "images").mkdir(parents=True)
        rows = []
        for i, example in enumerate(generate(task, "test", limit)):
            image = f"images/{i:05d}.png"
            example.image.save(folder / image)
            rows.append({"id": i, "image": image, "question": example.question, "answer": example.answer})
        (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        shutil.copyfile(task_utils.__file__, folder / "utils.py")
        yaml = folder / f"{folder.name}.yaml"
        yaml.write_text(YAML.format(name=folder.name, task=task, limit=limit, last=limit - 1, version=__version__,
                                    max_new_tokens=max_new_tokens))
        written.append(yaml)
    return written
