"""Training LVPruning's decision modules on the task suite, the host VLM frozen.

What the paper states (Sun et al., Findings of NAACL 2025; see :mod:`tokensieve.methods.lvpruning`):
only the modules train, their keep/drop decisions are made differentiable with Gumbel-Softmax and act
as attention masks in training. The rest is chosen here, after DynamicViT (Rao et al., NeurIPS 2021;
raoyongming/DynamicViT ``losses.py`` and ``softmax_with_policy``), whose training LVPruning's follows:

* hard Gumbel-Softmax decisions (temperature 1) with the straight-through gradient; a token dropped
  at one module stays dropped (each module's decision multiplies the earlier ones);
* from a module's layer on, each visual key column carries its decision ``w`` (1 kept, 0 dropped) as
  DynamicViT's masked softmax (:mod:`tokensieve.learned.key_masks`), so gradients reach the decisions;
* loss: the answers' next-token cross-entropy plus ``ratio_weight`` (2.0) times the mean over modules
  of the squared gap between the fraction of visual tokens a sample keeps and the module's target;
* ``decisions="topk"`` (tokensieve's): each module keeps exactly its target count of the tokens
  still alive, those of highest Gumbel-perturbed keep margin (Gumbel-top-k), straight-through on the
  margin's sigmoid; the ratio loss is then zero. On the tiny LLaVA the paper's per-token decisions
  did not hold the budget: the answer loss's gradient through the masks (it asks for every dropped
  token back) outweighed the ratio loss, the kept fractions rising from 0.42 / 0.20 to 0.58 / 0.48
  within 60 steps for targets 0.5 / 0.1, alike at ratio weights 2, 20 and 200;
* data: training-split items of the five image tasks (:func:`tokensieve.tiny.data.build_pool`), AdamW.

Checkpoints: the modules (and the optimiser's moments) are saved every ``save_every`` steps to
``<out>.partial.safetensors``; ``resume=True`` continues from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..adapters import adapter_for
from . import loop
from .batches import Batch, batches_for
from .decision import DecisionConfig, DecisionModules
from .key_masks import KeyMasks, LayerInput

DECISIONS = ("gumbel", "topk")
"""How training decides: per token by Gumbel-Softmax with the ratio loss (the paper's mechanism), or
the target count by Gumbel-top-k (the ratio met by construction; tokensieve's)."""


class SoftDrop:
    """The modules' decisions applied as differentiable key masks during one forward (see the module
    docstring). ``kept[s]``: ``(B,)`` fraction of visual tokens kept after module ``s``."""

    def __init__(self, modules: DecisionModules, tau: float = 1.0, decisions: str = "gumbel") -> None:
        if decisions not in DECISIONS:
            raise ValueError(f"decisions must be one of {', '.join(DECISIONS)}, got {decisions!r}")
        self.modules, self.tau, self.decisions = modules, tau, decisions
        self.kept: list[torch.Tensor] = []

    def decide(self, logits: torch.Tensor, policy: torch.Tensor, keep: float) -> torch.Tensor:
        """``(B, N)`` straight-through decisions from ``(B, N, 2)`` logits: per token by hard
        Gumbel-Softmax (``"gumbel"``), or the ``round(keep * N)`` tokens still alive (``policy``) with
        the highest Gumbel-perturbed keep margin (``"topk"``; the soft value is its sigmoid)."""
        if self.decisions == "gumbel":
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., 0]
        margin = logits[..., 0] - logits[..., 1]
        noise = -torch.log(-torch.log(torch.rand_like(margin).clamp(1e-9, 1 - 1e-9)))
        perturbed = (margin.detach() + self.tau * noise).masked_fill(policy <= 0.5, float("-inf"))
        count = max(1, round(keep * margin.shape[1]))
        hard = torch.zeros_like(margin).scatter(1, perturbed.topk(count, dim=1).indices, 1.0)
        soft = torch.sigmoid(margin)
        return hard - soft.detach() + soft

    @contextmanager
    def applied(self, layers: torch.nn.ModuleList, visual: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, the decoder ``layers`` from the first module's on see the decisions
        (:mod:`tokensieve.learned.key_masks`). ``visual``: ``(B, N)`` indices of each row's visual tokens;
        ``text``: :func:`~tokensieve.learned.batches.instruction_rows`; ``attention_mask``: ``(B, L)`` the batch's padding mask."""
        config = self.modules.config

        def rule(seen: LayerInput) -> torch.Tensor:
            d = seen.hidden.shape[-1]
            vis = seen.hidden.gather(1, visual[..., None].expand(-1, -1, d))
            txt = seen.hidden.gather(1, text[0][..., None].expand(-1, -1, d))
            logits = self.modules.at(seen.index)(vis, txt, text[1])
            return self.decide(logits, seen.policy, config.keep[config.layers.index(seen.index)])

        masks = KeyMasks(config.layers, rule)
        self.kept = masks.kept
        with masks.applied(layers, visual, attention_mask):
            yield


def ratio_loss(kept: list[torch.Tensor], targets: tuple[float, ...]) -> torch.Tensor:
    """Mean over modules of the batch mean of ``(kept fraction - target) ** 2``."""
    return torch.stack([((k - t) ** 2).mean() for k, t in zip(kept, targets)]).mean()


def train(model: Any, processor: Any, layers: tuple[int, ...], keep: tuple[float, ...], out: Path, steps: int = 400,
          batch_size: int = 16, lr: float = 1e-3, warmup: int = 20, ratio_weight: float = 2.0, tau: float = 1.0,
          pool_per_task: int = 400, seed: int = 0, save_every: int = 50, resume: bool = False,
          decisions: str = "gumbel", progress: bool = True) -> tuple[DecisionModules, dict[str, Any]]:
    """Train decision modules for ``model`` (frozen) at ``layers`` with cumulative keep targets ``keep``;
    save them to ``out``. Returns the modules and the training record.

    Raises:
        ValueError: bad layers or targets (:class:`DecisionConfig`), non-positive steps or batch size,
            ``resume`` without a partial checkpoint.
    """
    adapter = adapter_for(model)
    text_config = adapter.text_config
    config = DecisionConfig(hidden=text_config.hidden_size, layers=tuple(layers), keep=tuple(keep),
                            num_layers=text_config.num_hidden_layers)
    torch.manual_seed(seed)
    modules = DecisionModules(config).train()
    model.eval().requires_grad_(False)
    drop = SoftDrop(modules, tau, decisions)

    def step_loss(batch: Batch) -> tuple[torch.Tensor, dict[str, float], list[float]]:
        with drop.applied(adapter.layers, batch.visual, batch.text, batch.inputs["attention_mask"]):
            answer = model(**batch.inputs).loss
        ratio = ratio_loss(drop.kept, config.keep)
        kept = [round(float(k.detach().mean()), 3) for k in drop.kept]
        return answer + ratio_weight * ratio, {"answer_loss": float(answer), "ratio_loss": float(ratio)}, kept

    history, seconds = loop.run(modules, step_loss, batches_for(model, processor, pool_per_task, seed, progress), out,
                                steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=0.01,
                                save_every=save_every, resume=resume, desc="train-lvpruning", progress=progress)
    record = {"decisions": decisions, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "ratio_weight": ratio_weight,
              "tau": tau, "pool_per_task": pool_per_task, "seed": seed, "train_seconds": seconds,
              "parameters": sum(p.numel() for p in modules.parameters()), "history": history}
    modules.eval().save(out, record)
    out.with_suffix(".partial.safetensors").unlink(missing_ok=True)
    return modules, record
