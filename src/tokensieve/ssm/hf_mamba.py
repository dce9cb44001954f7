"""The one place that knows how ``transformers`` builds and calls a Mamba mixer.

Checked on transformers 5.2.0 and 5.24: both build ``MambaMixer(config, layer_idx)`` from a
``MambaConfig``; both take the hidden states ``(B, L, d)`` as the first positional argument (the cache
keyword is ``cache_params`` in 5.2, ``cache`` from 5.24 on; we pass none). On a CPU both run the
torch path: 5.2 its ``slow_forward`` (the CUDA kernels are used only when ``mamba_ssm`` and
``causal_conv1d`` import and the weights sit on a GPU), 5.24 ``forward`` with the hub-kernel
wrappers falling back to their torch bodies when the ``kernels`` package is absent; in training 5.24
asks ``mamba_inner_fn`` first, whose fallback returns None, so the same torch path runs.
5.24 initialises ``A_log``, ``D`` and the time-step bias in the constructor, 5.2 leaves that to
``MambaPreTrainedModel._init_weights``; :func:`init_mixer` does it for both (the S4D-real init of
Gu & Dao, as both releases and ``mamba_ssm`` do it).

Both versions feed the gated SSM output ``y * silu(z)``, shape ``(B, L, E)``, to ``out_proj``: a
forward pre-hook there reads it (:func:`capture_gated_output`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.utils.import_utils import is_mambapy_available

__all__ = ["mamba_config", "make_mixer", "init_mixer", "set_parallel_scan", "run_mixer", "capture_gated_output", "is_mambapy_available"]


def mamba_config(hidden: int, state: int, expand: int, conv_kernel: int, dt_rank: int, mixers: int) -> MambaConfig:
    """A config for ``mixers`` mixers of width ``hidden`` (no biases in the projections: a zero row stays
    zero through ``in_proj``, which the aligned pruning relies on)."""
    return MambaConfig(hidden_size=hidden, state_size=state, expand=expand, conv_kernel=conv_kernel,
                       time_step_rank=dt_rank, num_hidden_layers=mixers, use_bias=False, use_conv_bias=True,
                       use_mambapy=False, vocab_size=2)


def make_mixer(config: MambaConfig, index: int) -> MambaMixer:
    """One transformers Mamba mixer (``index``: its distinct layer index)."""
    mixer = MambaMixer(config, layer_idx=index)
    init_mixer(mixer, config)
    return mixer


@torch.no_grad()
def init_mixer(mixer: MambaMixer, config: MambaConfig) -> None:
    """S4D-real ``A`` (1..N per channel), ``D = 1``, time-step bias = softplus^-1 of a log-uniform draw
    in [time_step_min, time_step_max] (floored), time-step weight uniform in +-rank^-0.5."""
    n, e = config.state_size, config.intermediate_size
    mixer.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32))[None].expand(e, -1))
    mixer.D.fill_(1.0)
    std = config.time_step_rank ** -0.5 * config.time_step_scale
    nn.init.uniform_(mixer.dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(e) * (math.log(config.time_step_max) - math.log(config.time_step_min))
                   + math.log(config.time_step_min)).clamp(min=config.time_step_floor)
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def set_parallel_scan(mixer: MambaMixer, on: bool) -> None:
    """Training only: let the mixer run its recurrence as mamba.py's parallel scan (``mambapy.pscan``,
    the ``use_mambapy`` path of both releases; 5.2 takes it only in training mode, 5.24 whenever the
    flag is set). The sequential loop's backward costs O(L^2) memory traffic on a CPU (each step's
    slice of the ``(B, E, L, N)`` tensors back-propagates into a full-size zero tensor), 20 s a step
    for the shipped shape. Without ``mambapy`` installed this is a no-op (and training is slow).
    Inference leaves it off: the sequential loop is the reference path."""
    mixer.use_mambapy = bool(on) and is_mambapy_available()


def run_mixer(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, L, d) -> (B, L, d)``, no cache."""
    return mixer(hidden)


def capture_gated_output(mixer: MambaMixer, sink: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    """Call ``sink`` with the mixer's gated SSM output ``(B, L, E)`` (the input of ``out_proj``) on every
    forward; remove the returned handle to stop."""
    return mixer.out_proj.register_forward_pre_hook(lambda module, args: sink(args[0]))
