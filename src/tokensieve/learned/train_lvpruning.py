"""Training LVPruning's decision modules on the task suite, the host VLM frozen.

What the paper states (Sun et al., Findings of NAACL 2025; see :mod:`tokensieve.methods.lvpruning`):
only the modules train, their keep/drop decisions are made differentiable with Gumbel-Softmax and act
as attention masks in training. The rest is chosen here, after DynamicViT (Rao et al., NeurIPS 2021;
raoyongming/DynamicViT ``losses.py`` and ``softmax_with_policy``), whose training LVPruning's follows:

* hard Gumbel-Softmax decisions (temperature 1) with the straight-through gradient; a token dropped
  at one module stays dropped (each module's decision multiplies the earlier ones);
* from a module's layer on, each visual key column carries its decision ``w`` (1 kept, 0 dropped):
  ``log(w + 1e-6)`` is added to the attention scores, so attention is ``exp(a) w / sum exp(a) w``
  (DynamicViT's masked softmax) and gradients reach the decisions; every token still sees itself;
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

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..adapters import adapter_for
from .decision import DecisionConfig, DecisionModules

EPS = 1e-6
DECISIONS = ("gumbel", "topk")
"""How training decides: per token by Gumbel-Softmax with the ratio loss (the paper's mechanism), or
the target count by Gumbel-top-k (the ratio met by construction; tokensieve's)."""


def instruction_rows(input_ids: torch.Tensor, image_id: int, prompt_end: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` long indices of each row's instruction tokens (after its last image token, before
    ``prompt_end[b]``, the answer's index), left-aligned, and ``(B, T)`` bool of which are real."""
    rows = []
    for b in range(input_ids.shape[0]):
        last = int((input_ids[b] == image_id).nonzero().max())
        rows.append(torch.arange(last + 1, prompt_end[b]))
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        index[b, : len(r)], valid[b, : len(r)] = r, True
    return index, valid


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
        """Within the block, the decoder ``layers`` from the first module's on see the decisions.
        ``visual``: ``(B, N)`` indices of each row's visual tokens; ``text``: :func:`instruction_rows`;
        ``attention_mask``: ``(B, L)`` the batch's padding mask."""
        length = attention_mask.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        base = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)[:, None]  # (B, 1, L, L)
        eye = torch.eye(length, dtype=torch.bool)[None, None]
        first = self.modules.config.layers[0]
        state: dict[str, Any] = {"policy": torch.ones(visual.shape)}
        self.kept = []

        def hook(index: int):
            def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if index in self.modules.config.layers:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    d = hidden.shape[-1]
                    vis = hidden.gather(1, visual[..., None].expand(-1, -1, d))
                    txt = hidden.gather(1, text[0][..., None].expand(-1, -1, d))
                    logits = self.modules.at(index)(vis, txt, text[1])
                    target = self.modules.config.keep[self.modules.config.layers.index(index)]
                    state["policy"] = state["policy"] * self.decide(logits, state["policy"], target)
                    self.kept.append(state["policy"].mean(1))
                    weight = torch.ones(visual.shape[0], length).scatter(1, visual, state["policy"])
                    state["mask"] = base + torch.where(eye, 0.0, torch.log(weight + EPS)[:, None, None, :])
                kwargs["attention_mask"] = state["mask"]
                return args, kwargs
            return pre

        layers_after = list(enumerate(layers))[first:]
        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in layers_after]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


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
    from ..tiny.data import build_pool, collate
    from ..tiny.train import draw_rows

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch size must be positive")
    adapter = adapter_for(model)
    text_config = adapter.text_config
    config = DecisionConfig(hidden=text_config.hidden_size, layers=tuple(layers), keep=tuple(keep),
                            num_layers=text_config.num_hidden_layers)
    torch.manual_seed(seed)
    modules = DecisionModules(config).train()
    model.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.01)
    partial = out.with_suffix(".partial.safetensors")
    step = 0
    if resume:
        step = _load_partial(partial, modules, optimizer)
    tokenizer = processor.tokenizer
    image_id = model.config.image_token_index
    pool = build_pool(tokenizer, "train", pool_per_task, start=seed * pool_per_task, progress=progress)
    generator = torch.Generator().manual_seed(seed + step)
    drop = SoftDrop(modules, tau, decisions)
    start = time.time()
    history = []
    bar = tqdm(total=steps, initial=step, desc="train-lvpruning", disable=not progress)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = draw_rows(len(pool.ids), None, batch_size, generator)
        batch = collate(pool, index, tokenizer.pad_token_id, with_answer=True)
        batch.pop("patch_targets"), batch.pop("evidence")
        ids = batch["input_ids"]
        visual = torch.stack([(row == image_id).nonzero().squeeze(1) for row in ids])
        ends = [pool.prompt_len[i] + ids.shape[1] - len(pool.ids[i]) for i in index.tolist()]
        text = instruction_rows(ids, image_id, ends)
        with drop.applied(adapter.layers, visual, text, batch["attention_mask"]):
            answer = model(**batch).loss
        ratio = ratio_loss(drop.kept, config.keep)
        loss = answer + ratio_weight * ratio
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        kept = [round(float(k.mean()), 3) for k in drop.kept]
        bar.set_postfix(answer=f"{float(answer):.3f}", ratio=f"{float(ratio):.4f}", kept=kept)
        bar.update()
        if step % save_every == 0 or step == steps:
            history.append({"step": step, "answer_loss": float(answer), "ratio_loss": float(ratio), "kept": kept})
            _save_partial(partial, modules, optimizer, step)
    bar.close()
    record = {"decisions": decisions, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "ratio_weight": ratio_weight,
              "tau": tau, "pool_per_task": pool_per_task, "seed": seed, "train_seconds": round(time.time() - start, 1),
              "parameters": sum(p.numel() for p in modules.parameters()), "history": history}
    modules.eval().save(out, record)
    partial.unlink(missing_ok=True)
    return modules, record


def _save_partial(path: Path, modules: DecisionModules, optimizer: torch.optim.Optimizer, step: int) -> None:
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in modules.state_dict().items()}
    for i, p in enumerate(modules.parameters()):
        state = optimizer.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                tensors[f"optim.{i}.{name}"] = state[name].contiguous()
        if "step" in state:
            tensors[f"optim.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_file(tensors, str(path), metadata={"step": str(step)})


def _load_partial(path: Path, modules: DecisionModules, optimizer: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"nothing to resume: no partial checkpoint at {path}")
    tensors = load_file(str(path))
    modules.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
    for i, p in enumerate(modules.parameters()):
        if f"optim.{i}.exp_avg" in tensors:
            optimizer.state[p] = {"exp_avg": tensors[f"optim.{i}.exp_avg"], "exp_avg_sq": tensors[f"optim.{i}.exp_avg_sq"],
                                  "step": tensors[f"optim.{i}.step"][0].clone()}
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {})["step"])
