"""``--model_args`` of ``lmms-eval --model tokensieve`` read into :class:`Settings`, checked before
any model loads.

lmms-eval splits ``--model_args`` on commas and types each value itself (``true``/``false`` become
bools, digits an int, anything ``float()`` reads a float, the rest text), and passes ``batch_size`` as
text from its command line. Here every method option is read again from its text as the type the
method declares (``keep=1`` is the float 1.0 for FastV; ``pdrop.layers="2,6,12"`` a tuple: a value with
commas is quoted), so a model_args string means what the same values mean to ``tokensieve eval``.

A single method takes its options by name (``method=fastv,layer=2,keep=0.25``); a composition takes
each member's as ``member.option`` (``method=divprune+fastv,divprune.keep=0.5,fastv.layer=2``), the
spelling ``tokensieve bench`` uses, plus ``flops``: one budget split among the members.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import methods, models, protocols
from ...cli.options import Kind, check_output_file, registry_options

PROMPTS: tuple[str, ...] = ("auto", "tokensieve", "task")
"""How a request becomes a prompt: ``tokensieve`` exactly as ``tokensieve eval`` prompts its tasks (one
image, the question, one-word answers), ``task`` the request's own text and images through the
model's chat template with the answer decoded up to the task's stop strings, ``auto`` the first for
the exported ``tokensieve_*`` tasks and the second for every other task."""

RUN_ARGS: tuple[str, ...] = ("pretrained", "method", "device", "dtype", "protocol", "prompt", "report", "batch_size")
"""The model_args that are not method options."""


def default_report() -> Path:
    """Where the report goes without ``report=``: ``tokensieve_reports/<UTC time>_report.json`` in the
    working directory (lmms-eval tells a model neither its ``--output_path`` nor its run's time stamp)."""
    return Path("tokensieve_reports") / f"{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}_report.json"


@dataclass(frozen=True)
class Settings:
    """One tokensieve model in lmms-eval.

    Attributes:
        pretrained: ``tiny``, ``tiny-text``, a checkpoint directory or a hub id (:func:`tokensieve.models.load`).
        method: a method name, or members joined by ``+``.
        options: the method's options as :func:`tokensieve.methods.get` takes them (a composition's
            under each member's name).
        calibrate: for ``fitprune`` given ``flops`` and no recipe, the FLOPs budget whose recipe is
            fitted on the task suite's training split first (as ``tokensieve eval`` does); else None.
        device, dtype: where and in what the model runs (:func:`tokensieve.models.load`).
        protocol: ``auto``, ``whole`` or ``question-after`` (:mod:`tokensieve.protocols`).
        prompt: one of :data:`PROMPTS`.
        report: the per-sample report's JSON file, None for no report.
        batch_size: requests generated together.
    """

    pretrained: str = "tiny"
    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    calibrate: float | None = None
    device: str = "auto"
    dtype: str | None = None
    protocol: str = "auto"
    prompt: str = "auto"
    report: Path | None = None
    batch_size: int = 1


def parse(args: dict[str, Any]) -> Settings:
    """Settings from lmms-eval's model arguments (``--model_args`` plus ``batch_size`` and ``device``).

    Raises:
        ValueError / TypeError: a bad run argument (batch size, dtype, protocol, prompt, report path),
            or the error :func:`tokensieve.methods.get` gives for an unknown method or option or a
            value out of range.
    """
    given = dict(args)
    if given.get("max_batch_size") is not None:
        raise ValueError("max_batch_size bounds lmms-eval's batch_size=auto, which tokensieve does not take; "
                         "give batch_size=N")
    given.pop("max_batch_size", None)
    run = {k: given.pop(k) for k in RUN_ARGS if k in given}
    method = str(run.get("method", "none"))
    options = _composition_options(method, given) if "+" in method else _method_options(method, given)
    calibrate = _check_method(method, options)
    dtype = run.get("dtype")
    if dtype is not None and dtype not in models.DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(models.DTYPES)}")
    protocol = str(run.get("protocol", "auto"))
    protocols.check_protocol(protocol)
    prompt = str(run.get("prompt", "auto"))
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r}: use one of {', '.join(PROMPTS)}")
    return Settings(pretrained=str(run.get("pretrained", "tiny")), method=method, options=options, calibrate=calibrate,
                    device=str(run.get("device") or "auto"), dtype=dtype, protocol=protocol, prompt=prompt,
                    report=_report(run.get("report")), batch_size=_batch_size(run.get("batch_size", 1)))


def _batch_size(value: Any) -> int:
    """lmms-eval's ``batch_size`` (text from its command line, e.g. ``"4"``) as a positive integer."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size must be a positive integer (tokensieve takes no 'auto'), got {value!r}")
    return int(text)


def _report(value: Any) -> Path | None:
    """``report=false``: no report; a path; or by default :func:`default_report`. Checked writable now."""
    if value is False:
        return None
    path = default_report() if value is None or value is True else Path(str(value)).expanduser()
    check_output_file(path, "report=")
    return path


def _text(value: Any) -> str:
    """A model-arg value back as the text it was written as, one pair of surrounding quotes removed."""
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


def _read(method: str, key: str, value: Any) -> Any:
    """``value`` as the type ``method`` declares for its option ``key``."""
    try:
        return registry_options()[key].kinds[method].parse(_text(value))
    except ValueError as err:
        raise ValueError(f"{key} for {method}: {err}") from None


def _method_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """A single method's options; an option it does not take is left for :func:`methods.get` to refuse."""
    if method not in methods.REGISTRY:
        methods.get(method)  # raises, naming the closest methods
    dotted = [k for k in given if "." in k]
    if dotted:
        raise ValueError(f"{', '.join(dotted)}: member.option names are for compositions (method=a+b); "
                         f"give {method}'s options by name, as in layer=2")
    taken = methods.REGISTRY[method].options()
    return {k: _read(method, k, v) if k in taken else v for k, v in given.items()}


def _composition_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """A composition's options: ``member.option`` values under each member's name, ``flops`` its budget."""
    members = method.split("+")
    for name in members:
        if name not in methods.REGISTRY:
            methods.get(name)  # raises, naming the closest methods
    options: dict[str, Any] = {name: {} for name in members}
    for key, value in given.items():
        member, dot, option = key.partition(".")
        if key == "flops":
            try:
                options["flops"] = Kind("float").parse(_text(value))
            except ValueError as err:
                raise ValueError(f"flops for {method}: {err}") from None
        elif not dot:
            raise ValueError(f"{key}={value}: with a composition give each member's options as member.option, "
                             f"as in {members[0]}.{key}={value}")
        elif member not in members:
            raise ValueError(f"{key}: {member!r} is not one of the members of {method}")
        else:
            taken = methods.REGISTRY[member].options()
            options[member][option] = _read(member, option, value) if option in taken else value
    return options


def _check_method(method: str, options: dict[str, Any]) -> float | None:
    """Build the method once to check it; FitPrune given ``flops`` and no recipe is checked after its
    recipe is fitted, and its budget returned."""
    if method == "fitprune" and "recipe" not in options and "flops" in options:
        flops = options["flops"]
        if not 0 < flops < 1:
            raise ValueError(f"flops must be in (0, 1), got {flops}")
        return flops
    methods.get(method, **options)
    return None
