"""ToP: token pruning for vision state-space models, and ViT-style baselines, on :class:`TinyVim`.

Zhan, Kong, Gong et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024
(arXiv 2409.18962); authors' code ZLKong/ToP-ViM (read at commit b5bc231). What the release does,
and what is taken from it here:

* **Where.** ``vim/models_mamba.py`` ``VisionMamba.forward_features``, the unidirectional-loop
  branch (each Vim "v2" layer scans both directions itself): after layers 5, 10 and 15 of Vim-S's 24
  (``(layernum - 5) % 5 == 0 and layernum < 20``, ``layernum`` counted from 1 after the layer ran),
  the same ratio at each stage (``token_keep_ratio = 0.8``), of the tokens alive there. Here: after
  the blocks in ``VimConfig.prune_after`` (the shipped model: blocks 1, 2, 3 of 6, 0-based, i.e. after
  a third, a half and two thirds of the depth, as 5/24, 10/24, 15/24 sit in the first two thirds).
* **Score.** The release reads ``layer.mixer.xai_b``, set in
  ``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`` ``Mamba.forward`` (``bimamba_type == "v2"``) to
  ``out_b``, the output of ``mamba_inner_fn_no_out_proj`` on the flipped sequence
  (``ops/selective_scan_interface.py`` ``MambaInnerFnNoOutProj.forward`` returns ``out_z``): the
  backward scan's SSM output *after* the gate, ``y * silu(z)``, before ``out_proj``, ``(B, E, L)``,
  summed over the channels (``xai_b.sum(dim=1)``). The paper's score clips first,
  ``s_i = sum_d max(y_{i,d}, 0)`` (its ablation: l1, l2, unclipped, clipped); the release's
  commented-out masking path clamps (``xai_b.clamp(min=0)``), its active gather path does not.
  Here ``score="clip"`` (default) is the paper's; ``"sum"`` the unclipped one, ``"l1"``, ``"l2"`` the
  ablation's norms, ``"random"`` seeded uniform scores. ``direction="backward"`` (default) reads the
  backward mixer as the release does, ``"forward"`` the forward one, ``"both"`` adds the two scores.
  The release indexes ``xai_b`` as it comes out of the flipped scan, so its score ``i`` belongs to
  token ``L - 1 - i`` (harmless there only for the middle class token); here the backward output is
  flipped back, so a token's score is its own (the paper's definition).
* **How many.** The release keeps ``ceil(n * r)`` of the ``n`` tokens alive, made odd with the class
  token so that it stays in the middle. Here (no class token, mean pooling; see :mod:`.model`)
  ``max(1, ceil(n * r))`` per stage. ``keep`` is the fraction of the patches alive after the last
  stage: each stage keeps ``r = keep ** (1 / stages)`` of what reaches it; ``flops`` finds the largest
  ``r`` whose FLOPs ratio (:func:`flops`) is within the budget. ``keep=1`` prunes nothing and gives
  the unpruned logits exactly. Ties in the score go to the lower position (a stable sort).
* **Alignment** (``alignment="aligned"``, the paper's "pruning-aware hidden state alignment": the
  survivors keep the scan neighbourhood they had). The release's masking path (commented out in
  ``forward_features``, marked "token masking") multiplies both the hidden states and the residual
  by the keep mask, so pruned tokens stay in the sequence as zero rows and every survivor keeps its
  position; later stages score only the rows still non-zero. Here the residual stream is one tensor
  and is multiplied by the mask after the pruning block and after every later block. A zero row stays
  zero through a block (RMSNorm of 0 is 0; ``in_proj`` has no bias, so ``x = z = 0``; the output is
  gated by ``silu(z) = 0``), yet still takes part in the scan: its causal-convolution output (the
  bias and its live predecessors) gives it a time step, ``B`` and ``C``, so the state decays across
  it and picks up a little input, as in the release. The paper's kernel skips the pruned rows'
  linear layers with a position map; :func:`flops` counts that: ``in_proj``/``out_proj`` on the
  survivors, the convolution, ``x_proj``, ``dt_proj`` and the scan on the whole sequence.
* **Naive** (``alignment="naive"``, ViT-style): the release's active path gathers the survivors in
  position order (``torch.sort`` of the top-k indices) and closes up the sequence; a survivor's scan
  neighbours become whichever survivors precede it. Every FLOP then scales with the survivors.
* ``method`` presets: ``aligned`` = clip score + alignment (ToP), ``naive`` = clip score + close-up,
  ``random`` = random score + close-up (ViT-style random drop); ``score``/``alignment`` override.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import hf_mamba
from .model import TinyVim, VimConfig

METHODS = {"aligned": ("clip", "aligned"), "naive": ("clip", "naive"), "random": ("random", "naive")}
SCORES = ("clip", "sum", "l1", "l2", "random")
ALIGNMENTS = ("aligned", "naive")
DIRECTIONS = ("backward", "forward", "both")


@dataclass(frozen=True)
class SsmPrune:
    """One pruning setting. Exactly one of ``keep`` (fraction of patch tokens alive after the last
    stage, in (0, 1]) and ``flops`` (target ratio of the whole model's analytic FLOPs, in (0, 1]).

    Raises:
        ValueError: unknown method, score, alignment or direction; no budget or both; a budget
            outside (0, 1].
    """

    method: str = "aligned"
    keep: float | None = None
    flops: float | None = None
    score: str | None = None
    alignment: str | None = None
    direction: str = "backward"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.score is not None and self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; valid scores: {', '.join(SCORES)}")
        if self.alignment is not None and self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; valid: {', '.join(ALIGNMENTS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; valid: {', '.join(DIRECTIONS)}")
        if (self.keep is None) == (self.flops is None):
            raise ValueError("give exactly one budget: keep (fraction of patch tokens kept) or flops (FLOPs ratio)")
        for name in ("keep", "flops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")

    @property
    def score_kind(self) -> str:
        return self.score or METHODS[self.method][0]

    @property
    def alignment_kind(self) -> str:
        return self.alignment or METHODS[self.method][1]


def stage_counts(config: VimConfig, ratio: float) -> list[int]:
    """Tokens alive after each pruning stage when each keeps ``max(1, ceil(n * ratio))`` of its ``n``."""
    counts, n = [], config.patches
    for _ in config.prune_after:
        n = n if ratio >= 1 else max(1, min(n, math.ceil(n * ratio - 1e-9)))
        counts.append(n)
    return counts


def block_lengths(config: VimConfig, counts: list[int]) -> list[int]:
    """Tokens alive at the input of every block, given the counts after each stage."""
    lengths, n = [], config.patches
    for b in range(config.depth):
        lengths.append(n)
        if b in config.prune_after:
            n = counts[config.prune_after.index(b)]
    return lengths


def mixer_flops(config: VimConfig, projected: int, scanned: int) -> int:
    """FLOPs (2 x multiply-accumulates) of one Mamba mixer whose ``in_proj``/``out_proj`` see
    ``projected`` tokens and whose convolution, ``x_proj``, ``dt_proj`` and scan see ``scanned``:

        in_proj  2 n_p d 2E      out_proj  2 n_p E d
        conv     2 n_s E K       x_proj    2 n_s E (R + 2N)      dt_proj  2 n_s R E
        scan     n_s E (8N + 3): per state exp(dt A), dt*A, dt*B, *u, a*h + b (2), C.h (2);
                 per channel D*u + y (2) and the gate product (1)

    Activations (SiLU, softplus), norms and residual adds are not counted."""
    d, e, n, k, r = config.hidden, config.inner, config.state, config.conv, config.dt_rank
    return (2 * projected * d * 2 * e + 2 * projected * e * d
            + 2 * scanned * e * k + 2 * scanned * e * (r + 2 * n) + 2 * scanned * r * e + scanned * e * (8 * n + 3))


def flops(config: VimConfig, counts: list[int] | None = None, aligned: bool = False) -> int:
    """Analytic FLOPs of one image through the whole classifier: patch embedding ``2 P (C p^2) d``,
    two mixers per block at the block's length, the head ``2 d classes``. ``counts``: tokens alive
    after each stage (None: unpruned); ``aligned``: the scan parts run on the whole sequence."""
    lengths = block_lengths(config, counts) if counts is not None else [config.patches] * config.depth
    total = 2 * config.patches * config.channels * config.patch ** 2 * config.hidden + 2 * config.hidden * config.classes
    for n in lengths:
        total += 2 * mixer_flops(config, n, config.patches if aligned else n)
    return total


@dataclass(frozen=True)
class Plan:
    """What a setting resolves to on a model: per-stage ratio, counts after each stage, FLOPs."""

    ratio: float
    counts: tuple[int, ...]
    lengths: tuple[int, ...]
    flops: int
    flops_unpruned: int

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_unpruned


def plan(config: VimConfig, setting: SsmPrune) -> Plan:
    """Resolve ``setting``'s budget on ``config``.

    Raises:
        ValueError: a ``flops`` budget below what one token per stage costs (the lowest is named).
    """
    aligned = setting.alignment_kind == "aligned"
    full = flops(config)

    def make(ratio: float) -> Plan:
        counts = stage_counts(config, ratio)
        return Plan(ratio, tuple(counts), tuple(block_lengths(config, counts)), flops(config, counts, aligned), full)

    if setting.keep is not None:
        return make(float(setting.keep) ** (1 / len(config.prune_after)))
    target = float(setting.flops)
    if target >= 1:
        return make(1.0)
    lowest = make(1e-9)
    if lowest.flops_ratio > target + 1e-12:
        raise ValueError(f"flops {target} is out of reach for {setting.alignment_kind} pruning on this model: "
                         f"the lowest ratio is {lowest.flops_ratio:.4f} (one token after each stage)")
    lo, hi = 1e-9, 1.0
    for _ in range(60):  # largest ratio whose FLOPs fit the budget
        mid = (lo + hi) / 2
        if make(mid).flops_ratio <= target + 1e-12:
            lo = mid
        else:
            hi = mid
    return make(lo)


def token_scores(outputs: dict[str, torch.Tensor], kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, L)`` scores from the gated SSM outputs ``(B, L, E)`` of the chosen direction(s), in token
    order (``outputs``: name -> tensor; their scores are added)."""
    first = next(iter(outputs.values()))
    if kind == "random":
        return torch.rand(first.shape[:2], generator=generator)
    total = torch.zeros(first.shape[:2], dtype=torch.float32)
    for y in outputs.values():
        y = y.float()
        if kind == "clip":
            total = total + y.clamp(min=0).sum(-1)
        elif kind == "sum":
            total = total + y.sum(-1)
        elif kind == "l1":
            total = total + y.abs().sum(-1)
        else:
            total = total + y.pow(2).sum(-1).sqrt()
    return total


def select(scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` positions of the ``count`` best-scored live tokens per row, in increasing
    position order (ties: the lower position)."""
    masked = scores.masked_fill(~alive, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :count]
    return order.sort(dim=1).values


def random_seed(seed: int, item: int, stage: int) -> int:
    """The generator seed of the random score of one image at one stage."""
    return (seed * 1_000_003 + item) * 101 + stage


@torch.no_grad()
def run(model: TinyVim, images: torch.Tensor, setting: SsmPrune, resolved: Plan | None = None,
        seeds: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``images`` under ``setting``, and per stage the ``(B, k)`` original positions kept.
    ``seeds``: one per image for the random score (default: the row index); the score of image ``i``
    at stage ``s`` is drawn from ``setting.seed``, ``seeds[i]`` and ``s`` alone, so it does not depend
    on the batch."""
    config = model.config
    resolved = resolved or plan(config, setting)
    aligned = setting.alignment_kind == "aligned"
    directions = ("backward", "forward") if setting.direction == "both" else (setting.direction,)
    x = model.embed(images)
    batch = x.shape[0]
    positions = torch.arange(config.patches).expand(batch, -1)  # original position of each row (naive)
    alive = torch.ones(batch, config.patches, dtype=torch.bool)  # live rows (aligned)
    kept: list[torch.Tensor] = []
    for b, block in enumerate(model.blocks):
        stage = config.prune_after.index(b) if b in config.prune_after else None
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        if stage is not None and setting.score_kind != "random":
            mixers = {"backward": block.backward_mixer, "forward": block.forward_mixer}
            for name in directions:
                flip = name == "backward"
                handles.append(hf_mamba.capture_gated_output(
                    mixers[name], lambda y, name=name, flip=flip: outputs.__setitem__(name, y.flip(1) if flip else y)))
        try:
            x = block(x)
        finally:
            for handle in handles:
                handle.remove()
        if aligned and kept:  # rows pruned earlier stay zero (x * 1.0 is exact for the live ones)
            x = x * alive[..., None].to(x.dtype)
        if stage is None:
            continue
        count = resolved.counts[stage]
        if setting.score_kind == "random":
            rows = []
            for i in range(batch):
                g = torch.Generator().manual_seed(random_seed(setting.seed, seeds[i] if seeds else i, stage))
                rows.append(torch.rand(x.shape[1], generator=g))
            scores = torch.stack(rows)
        else:
            scores = token_scores(outputs, setting.score_kind)
        if aligned:
            chosen = select(scores, alive, count)
            alive = torch.zeros_like(alive).scatter(1, chosen, True)
            x = x * alive[..., None].to(x.dtype)
            kept.append(chosen)
        else:
            chosen = select(scores, torch.ones_like(scores, dtype=torch.bool), count)
            x = x.gather(1, chosen[..., None].expand(-1, -1, x.shape[-1]))
            positions = positions.gather(1, chosen)
            kept.append(positions)
    all_alive = bool(alive.all()) or not aligned
    return model.head_logits(x, None if all_alive else alive), kept
