"""Training ATP's threshold heads on the task suite, the host VLM frozen.

What the paper states (Ye et al., CVPR 2025; see :mod:`tokensieve.methods.atp`): differentiable soft
masks in training, a budget-constrained loss that pushes the average number of kept tokens to a target
and penalises tokens kept in deeper layers. The paper also tunes the LLM; its frozen-LLM variant (the
issue's setting, and the only one a CPU affords here) trains the ATP modules alone. The equations
follow the public reimplementation (Sneha421/AI6103-ATP-LLaVA ``llava/model/atp_module.py``,
``ATPModule.generate_soft_mask`` and ``ATPLoss``), with these choices of ours:

* each module's soft mask ``max(sigmoid((S_red - theta_r) T), sigmoid((S_sp - theta_s) T))`` (zero
  spatial term off the sampled cells), ``T = 10``, multiplies the keep weights of the modules before it,
  and the weights act on the visual keys of every later layer (:mod:`tokensieve.learned.key_masks`);
  the scores are read from the soft-masked attention of the layer before, recomputed from its own
  projections (:func:`tokensieve.attention.attention_rows`) without gradient: only the thresholds learn;
* loss: the answers' next-token cross-entropy, plus ``target_weight`` (2.0) times
  ``|batch mean - target|`` of the budget (:class:`~tokensieve.learned.atp_heads.ATPConfig`: a sample's
  prefill FLOPs ratio, from its soft token counts through :func:`tokensieve.flops.layer_macs`, or its
  mean keep over the decoder layers; the reimplementation's ``L_target`` counts tokens), plus
  ``depth_weight`` (0.05, the reimplementation's) times the sum over modules of the batch-mean kept
  fraction times the module's depth (its layer over the number of layers: ``L_atp``);
* ``masks="straight-through"`` (tokensieve's option, not the paper's): the forward uses the inference
  rule's hard decisions (``S_red > theta_r`` or sampled and ``S_sp > theta_s``) and the backward the
  soft masks' gradient, so the budget loss counts what inference will keep. With the soft masks the
  two differ at the last module (the 0.5 heads: a mean weight of 0.063 in training against 0.028 of
  the tokens kept at inference);
* data: training-split items of the five image tasks, AdamW with warmup and cosine decay.

After training, the hard rule runs on 64 further training-split items per task; their mean kept
fractions after each module are recorded with the weights (``record["kept"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters import adapter_for
from ..attention import attention_rows
from ..flops import Shape, layer_macs
from ..methods.atp import attention_scores, grid_sample
from ..methods.schedule import scaled_layers
from . import loop
from .atp_heads import ATPConfig, ThresholdHeads
from .batches import Batch, batches_for
from .key_masks import KeyMasks, LayerInput

PUBLISHED_LAYERS = (4, 14, 24)
"""Attention layers of the modules on the 32-layer LLaMA of LLaVA-1.5-7B (the reimplementation's)."""


MASKS = ("soft", "straight-through")
"""Training masks: the soft sigmoids (the paper's), or the inference rule's hard decisions with the
soft masks' gradient (tokensieve's: the budget loss then counts what inference keeps)."""


class SoftThresholds:
    """ATP's training masks during one forward (module docstring). ``kept[s]``: ``(B,)`` mean keep
    weight after module ``s``."""

    def __init__(self, heads: ThresholdHeads, layers: torch.nn.ModuleList, masks: str = "soft") -> None:
        if masks not in MASKS:
            raise ValueError(f"masks must be one of {', '.join(MASKS)}, got {masks!r}")
        self.heads, self.layers, self.straight_through = heads, layers, masks == "straight-through"
        self.kept: list[torch.Tensor] = []

    def rule(self, batch: Batch):
        config = self.heads.config
        visual, (text, text_valid) = batch.visual, batch.text
        side = round(visual.shape[1] ** 0.5)
        if side * side != visual.shape[1]:
            raise ValueError(f"ATP training needs a square grid of visual tokens, got {visual.shape[1]}")
        sampled = grid_sample(side, side, config.stride)[None].expand(visual.shape[0], -1)
        length = batch.inputs["input_ids"].shape[1]
        instruction = torch.zeros(visual.shape[0], length, dtype=torch.bool).scatter(1, text, text_valid)

        def decide(seen: LayerInput) -> torch.Tensor:
            hidden, kwargs = seen.previous
            cos, sin = kwargs["position_embeddings"]
            queries = torch.arange(length).expand(visual.shape[0], length)
            with torch.no_grad():
                attention = attention_rows(self.layers[seen.index - 1], hidden, cos, sin, queries, seen.allowed,
                                           bias=seen.bias)
                weight = torch.zeros(visual.shape[0], length).scatter(1, visual, seen.policy.detach())
                red, shares = attention_scores(attention, weight, instruction)
            stats = torch.cat([shares, seen.policy.detach().mean(1, keepdim=True)], 1)
            theta_r, theta_s = self.heads(stats, config.pruned_layers.index(seen.index))
            t = config.temperature
            redundant = torch.sigmoid((red.gather(1, visual) - theta_r[:, None]) * t)
            spatial = torch.where(sampled, torch.sigmoid((config.spatial_score - theta_s[:, None]) * t), 0.0)
            soft = torch.maximum(redundant, spatial)
            if not self.straight_through:
                return soft
            hard = ((red.gather(1, visual) > theta_r[:, None])
                    | (sampled & (config.spatial_score > theta_s[:, None]))).float()
            return hard - soft.detach() + soft

        return decide

    def masks(self, batch: Batch) -> KeyMasks:
        masks = KeyMasks(self.heads.config.pruned_layers, self.rule(batch))
        self.kept = masks.kept
        return masks


def layer_fractions(kept: list[torch.Tensor], config: ATPConfig) -> list[torch.Tensor]:
    """Per decoder layer, ``(B,)`` the fraction of the visual tokens it processes, from the kept
    fractions after each module (layers before the first module process all)."""
    fractions, current = [], torch.ones_like(kept[0])
    for layer in range(config.num_layers):
        if layer in config.pruned_layers:
            current = kept[config.pruned_layers.index(layer)]
        fractions.append(current)
    return fractions


def budget_spent(kept: list[torch.Tensor], config: ATPConfig, shape: Shape, n_visual: int,
                 prompt: torch.Tensor) -> torch.Tensor:
    """``(B,)`` each sample's budget measure: its prefill FLOPs ratio (``prompt``: ``(B,)`` its prompt
    lengths, ``n_visual`` of them visual) or its mean keep."""
    fractions = layer_fractions(kept, config)
    if config.budget == "keep":
        return torch.stack(fractions).mean(0)
    text = (prompt - n_visual).float()
    spent = sum(layer_macs(shape, text + f * n_visual) for f in fractions)
    return spent / (config.num_layers * layer_macs(shape, prompt.float()))


def budget_losses(kept: list[torch.Tensor], config: ATPConfig, spent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target loss ``|batch mean of spent - target|`` and the depth penalty
    ``sum_s mean(kept_s) * layer_s / num_layers``."""
    target = (spent.mean() - config.target).abs()
    depth = sum(k.mean() * layer / config.num_layers for k, layer in zip(kept, config.pruned_layers))
    return target, depth


def train(model: Any, processor: Any, budget: str, target: float, out: Path, attention_layers: tuple[int, ...] | None = None,
          steps: int = 300, batch_size: int = 16, lr: float = 3e-3, warmup: int = 20, target_weight: float = 2.0,
          depth_weight: float = 0.05, pool_per_task: int = 400, seed: int = 0, save_every: int = 50,
          resume: bool = False, masks: str = "soft", progress: bool = True) -> tuple[ThresholdHeads, dict[str, Any]]:
    """Train ATP heads for ``model`` (frozen) to meet ``target`` of ``budget`` (``"flops"`` or ``"keep"``)
    on average; save them to ``out``. Returns the heads and the training record.

    Raises:
        ValueError: bad layers or target (:class:`ATPConfig`), non-positive steps or batch size,
            ``resume`` without a partial checkpoint.
    """
    adapter = adapter_for(model)
    num_layers = adapter.text_config.num_hidden_layers
    layers = attention_layers or scaled_layers(PUBLISHED_LAYERS, 32, num_layers)
    config = ATPConfig(attention_layers=tuple(layers), num_layers=num_layers, budget=budget, target=target)
    shape = Shape.from_config(adapter.text_config)
    torch.manual_seed(seed)
    heads = ThresholdHeads(config).train()
    model.eval().requires_grad_(False)
    soft = SoftThresholds(heads, adapter.layers, masks)

    def step_loss(batch: Batch) -> tuple[torch.Tensor, dict[str, float], list[float]]:
        with soft.masks(batch).applied(adapter.layers, batch.visual, batch.inputs["attention_mask"]):
            answer = model(**batch.inputs).loss
        spent = budget_spent(soft.kept, config, shape, batch.visual.shape[1], batch.prompt)
        off_target, depth = budget_losses(soft.kept, config, spent)
        kept = [round(float(k.detach().mean()), 3) for k in soft.kept]
        loss = answer + target_weight * off_target + depth_weight * depth
        return loss, {"answer_loss": float(answer), budget: float(spent.detach().mean())}, kept

    history, seconds = loop.run(heads, step_loss, batches_for(model, processor, pool_per_task, seed, progress), out,
                                steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=0.0,
                                save_every=save_every, resume=resume, desc="train-atp", progress=progress)
    record = {"masks": masks, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "target_weight": target_weight,
              "depth_weight": depth_weight, "pool_per_task": pool_per_task, "seed": seed,
              "train_seconds": seconds,
              "parameters": sum(p.numel() for p in heads.parameters()), "history": history}
    heads.eval().save(out, record)
    record["kept"] = measured_schedule(model, processor, out, (seed + 1) * pool_per_task, progress)
    heads.save(out, record)
    out.with_suffix(".partial.safetensors").unlink(missing_ok=True)
    return heads, record


def measured_schedule(model: Any, processor: Any, weights: Path, start: int, progress: bool,
                      per_task: int = 64) -> list[float]:
    """Mean fraction of the visual tokens kept after each module by the hard rule, on ``per_task``
    training-split items of every image task from ``start`` (not the test split)."""
    from .. import evaluation, prune
    from ..tasks import TASKS, generate

    prompting = evaluation.Prompting.for_processor(processor)
    examples = [e for t in TASKS for e in generate(t, "train", per_task, start=start)]
    pruned = ThresholdHeads.load(weights).config.pruned_layers
    sums = [0.0] * len(pruned)
    for i in range(0, len(examples), 16):
        chunk = examples[i : i + 16]
        inputs = evaluation.model_inputs(prompting.inputs(chunk), model)
        with torch.no_grad(), prune(model, "atp", weights=str(weights)) as run:
            model(**inputs)
        for sample in run.report.samples:
            for s, layer in enumerate(pruned):
                sums[s] += sample.visual_lengths[layer] / sample.visual_lengths[0]
    return [round(x / len(examples), 4) for x in sums]
