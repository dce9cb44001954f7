"""Replacing a method of one module instance, reversibly: how the engine wraps decoder layers, vision
blocks and ``generate`` without touching their classes."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def replace_method(module: nn.Module, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Set ``module.<name>`` (on this instance only) to ``wrapper(original)``; return the undo, which
    puts back whatever the instance had before (its own attribute, or none: the class's method)."""
    had = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, wrapper(getattr(module, name)))

    def undo() -> None:
        if had:
            setattr(module, name, previous)
        else:
            delattr(module, name)

    return undo


def shim_forward(module: nn.Module, handler: Callable[[Callable, Any, tuple, dict], Any]) -> Callable[[], None]:
    """Route ``module.forward(hidden_states, *args, **kwargs)`` through
    ``handler(original_forward, hidden_states, args, kwargs)``; return the undo."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            return handler(original, hidden_states, args, kwargs)

        return forward

    return replace_method(module, "forward", wrap)
