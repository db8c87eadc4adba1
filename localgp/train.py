"""Training of a gated model, for every backbone (TrainConfig.backbone: OWSM or Whisper base):
ASR + ST multitask with the backbone's prompts, Adam with a warm-up learning-rate schedule,
gradient clipping, the sparsity target, optional distillation from the dense model; a frozen
backbone (only the gates, and chosen backbone parameters, train); progress, a JSONL log, and
checkpoints that resume exactly (trainable state, optimizer, schedule, step).

Under torchrun, DDP over the trainable parameters: a step's batch (batch_size examples, the global
batch) is split into micro_batches parts, each process computes its share of them (gradients
accumulated under no_sync but for its last) and DDP averages the gradients; rank 0 writes the log
and the checkpoints. Each micro-batch draws its random numbers (Gumbel noise) from a seed of its
own, so a run trains the same on any number of processes and resumes on another number."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from localgp import distributed
from localgp.backbones import get_backbone
from localgp.context.feeder import ContextFeeder
from localgp.data.examples import join_examples, load_corpus, make_examples
from localgp.model.convert import (
    GATE_KEY,
    force_keep,
    last_record,
    pruning_loss,
    set_execution,
)
from localgp.errors import UserError
from localgp.runs import (
    LOG,
    PREVIOUS,
    TrainConfig,
    check_device,
    checkpoint_path,
    claim_run_dir,
    last_whole_checkpoint,
    model_state,
    record_config,
    restore_model,
    truncate_log,
    write_checkpoint,
)

log = logging.getLogger(__name__)


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """ESPnet's WarmupLR: linear warm-up to `peak`, then inverse square-root decay."""
    step = max(step, 1)
    warmup = max(warmup, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def batch_order(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of training step `step` (0-based): a seeded permutation per epoch, so a
    resumed run sees exactly the batches the uninterrupted one would."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    picked = order[index * batch_size : (index + 1) * batch_size]
    return picked if picked else order[:batch_size]


def split_batch(picked: list[int], parts: int) -> list[list[int]]:
    """A step's batch in `parts` consecutive micro-batches, their sizes differing by one at most."""
    return [picked[r.start : r.stop] for r in (distributed.shard(len(picked), i, parts) for i in range(parts))]


def micro_batch_seed(seed: int, step: int, part: int) -> int:
    """The RNG seed of micro-batch `part` of step `step` (0-based): the same whichever process
    computes it, and however the run was interrupted."""
    return ((seed * 1_000_003 + step) * 1_000_003 + part) % 2**63


def select_trainable(model: torch.nn.Module, frozen: bool, unfreeze: tuple[str, ...] = ()) -> list[str]:
    """Names of the parameters that train: all of them, or with a frozen backbone the gates'
    (key containing "pruning.") and those under an `unfreeze` prefix. Sets requires_grad."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in unfreeze:
        if not any(name.startswith(prefix) for name in names):
            raise UserError(f"TrainConfig.unfreeze: {prefix!r} is the prefix of no parameter of the model "
                             f"(its keys look like {names[0]!r}, {names[-1]!r})")
    trainable = [n for n in names if not frozen or GATE_KEY in n or n.startswith(tuple(unfreeze))]
    chosen = set(trainable)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    if not trainable:
        raise UserError("training: no parameter trains (a frozen backbone without gates?)")
    return trainable


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softmax distributions at temperature T, averaged over
    the target positions (B, L) bool of logits (B, L, V)."""
    s = F.log_softmax(student[targets].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[targets].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class StepLoss(torch.nn.Module):
    """A micro-batch's loss as a module's forward, the module DDP wraps: its gradient hooks need
    the forward to go through it (a backbone calls the model's parts directly), and the total
    holds every path to the trainable parameters (the sparsity loss's too)."""

    def __init__(self, model: torch.nn.Module, backbone, config: TrainConfig):
        super().__init__()
        self.model, self.backbone, self.config = model, backbone, config

    def forward(self, batch: dict, teacher: torch.Tensor | None):
        """(task + distillation + sparsity loss, task loss, distillation loss or None, sparsity)."""
        cfg = self.config
        out = self.backbone.forward(self.model, batch)
        loss, distill = out.loss, None
        if teacher is not None:
            distill = distillation_loss(out.logits, teacher, out.targets, cfg.distill_temperature)
            loss = loss + cfg.distill_weight * distill
        total, sparsity = pruning_loss(self.model, loss, cfg.target_sparsity, cfg.sparsity_weight,
                                       cfg.decoder_target_sparsity, cfg.decoder_sparsity_weight)
        return total, out.loss, distill, sparsity


class Trainer:
    def __init__(self, config: TrainConfig, overwrite: bool = False):
        """Sets up the run (resuming from out_dir's checkpoint). Nothing is written before the
        corpus and its audio are checked and out_dir is known to hold no other config's run
        (runs.claim_run_dir; overwrite: start that run over); out_dir records the config once
        the whole setup has succeeded. Under torchrun, rank 0 alone writes to out_dir."""
        self.config = config
        self.out = Path(config.out_dir)
        self.backbone = get_backbone(config)
        utterances = load_corpus(config.data, config.skip_bad_audio, self.backbone.max_seconds)
        self.examples = join_examples(make_examples(utterances, config.tasks, self.backbone.supports),
                                      config.join_clips, self.backbone.max_seconds or 30.0, config.seed)
        self.dist = distributed.setup(check_device(config.device, "TrainConfig.device"), "TrainConfig.device")
        self.device = self.dist.device
        if config.micro_batches % self.dist.world:
            raise UserError(f"TrainConfig.micro_batches ({config.micro_batches}) cannot be shared by the "
                            f"{self.dist.world} processes torchrun started: make it a multiple of {self.dist.world}")
        if len(self.examples) < config.micro_batches:
            raise UserError(f"TrainConfig.micro_batches: {config.micro_batches} micro-batches, but the corpus gives "
                            f"{len(self.examples)} examples")
        distributed.on_main(self.dist, lambda: claim_run_dir(config, overwrite))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        # OWSM trains its tokenizer into out_dir when it is not there: rank 0 first, the others read it
        self.model, self.tokenizer = distributed.main_first(self.dist, lambda: self.backbone.build(
            lambda: [e.target_text for e in self.examples] + [e.utterance.text for e in self.examples]))
        self.backbone.check_examples(self.examples)
        self.model.to(self.device)
        self.contexts = ContextFeeder(self.model, config.context_extractors, self.out / "context",
                                      self.backbone.prompt_context)
        set_execution(self.model, "masked")
        self.trainable = select_trainable(self.model, config.frozen, config.unfreeze)
        # Frozen backbone weights that can be re-read are not saved: the checkpoint names them.
        self.weights = self.backbone.weights_identity() if config.frozen else None
        parameters = dict(self.model.named_parameters())
        groups = [[n for n in self.trainable if config.backbone_lr is None or GATE_KEY in n]]
        if config.backbone_lr is not None:  # the backbone's trained parameters at their own peak
            groups.append([n for n in self.trainable if GATE_KEY not in n])
        peaks = (config.lr, config.backbone_lr)
        self.optimizer = torch.optim.Adam([{"params": [parameters[n] for n in names], "lr": peak, "peak": peak}
                                           for names, peak in zip(groups, peaks) if names])
        self.step = 0
        self.keep_previous = True  # False: checkpoint.pth is damaged, and PREVIOUS is the whole one
        self._resume()
        if self.step == 0:  # a fresh run (a resumed one has it in its checkpoint)
            self.backbone.prepare_gates(self.model, self.examples)  # every rank alike: the same clips
        distributed.on_main(self.dist, lambda: (truncate_log(self.out / LOG, self.step), record_config(config)))
        self.step_loss = StepLoss(self.model, self.backbone, config)
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            # DDP keeps the trainable parameters alone in step: every rank reads the same frozen
            # weights and seeds alike, and Whisper has a sparse buffer that DDP cannot broadcast.
            chosen = set(self.trainable)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.step_loss, [
                f"model.{name}" for name, _ in [*self.model.named_parameters(), *self.model.named_buffers()]
                if name not in chosen])
            # find_unused_parameters: a trainable parameter that a batch leaves out of its graph must
            # not hold up the reduction of the others' gradients
            self.step_loss = DistributedDataParallel(
                self.step_loss, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

    def _checkpoint_path(self) -> Path:
        return checkpoint_path(self.out)

    def save(self) -> None:
        """Writes the checkpoint (rank 0; the other ranks hold the same state). No RNG state: each
        micro-batch seeds its own (micro_batch_seed)."""
        if not self.dist.main:
            return
        state = {"model": model_state(self.model, set(self.trainable), self.weights), "weights": self.weights,
                 "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": dataclasses.asdict(self.config)}
        write_checkpoint(state, self._checkpoint_path(), self.keep_previous)
        self.keep_previous = True

    def _resume(self) -> None:
        """From out_dir's last whole checkpoint: checkpoint.pth, or where that is damaged the
        previous one (said, and checkpoint.pth's next save does not keep the damaged one)."""
        if not self._checkpoint_path().exists() and not (self.out / PREVIOUS).exists():
            return
        path, state, damage = last_whole_checkpoint(self.out)
        restore_model(self.model, state, self.backbone, path)
        peaks = [group["peak"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, peak in zip(self.optimizer.param_groups, peaks, strict=True):  # the config's, not the saved ones
            group["peak"] = peak
        self.step = state["step"]
        self.keep_previous = damage is None
        if damage is not None:
            log.warning("%s is damaged (%s): resumed from %s, the last whole checkpoint, at step %d",
                        damage.path, damage.why, path, self.step)
        else:
            log.info("resumed from %s at step %d", path, self.step)

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The dense model's logits: the same model with every gate keeping (which computes what
        the plain backbone computes), in eval mode (no dropout, no Gumbel noise), no gradient."""
        force_keep(self.model, 1.0)
        self.model.eval()
        try:
            return self.backbone.forward(self.model, batch).logits
        finally:
            force_keep(self.model, None)
            self.model.train()

    def _micro_batch(self, picked: list[int], part: int, sync: bool) -> tuple[dict, dict]:
        """Forward and backward of micro-batch `part` of this step (examples `picked`), adding its
        share to the gradients; DDP reduces them across ranks at the backward where `sync`.
        Returns its losses and its sparsity per module."""
        cfg = self.config
        examples = [self.examples[i] for i in picked]
        self.contexts(examples)
        batch = {k: v.to(self.device) for k, v in self.backbone.collate(examples).items()}
        # The teacher first: the student's pass must be the last one, its masks give the sparsity.
        teacher = self.teacher_logits(batch) if cfg.distill_weight > 0 else None
        torch.manual_seed(micro_batch_seed(cfg.seed, self.step, part))
        quiet = self.dist.active and not sync
        with self.step_loss.no_sync() if quiet else contextlib.nullcontext():
            total, loss, distill, sparsity = self.step_loss(batch, teacher)
            # The step's gradient is the mean of its micro-batches'; DDP divides the ranks' sum by world.
            (total * self.dist.world / cfg.micro_batches).backward()
        losses = {"loss": loss.item(), "total": total.item(), "sparsity": sparsity.item()}
        if distill is not None:
            losses["distill"] = distill.item()
        return losses, last_record(self.model).sparsity_per_module()

    def train(self, steps: int | None = None) -> dict:
        """Runs until max_steps (or `steps` more, or max_minutes); returns the last log row (its
        losses and sparsities: means over the step's micro-batches, on every rank)."""
        from tqdm import tqdm

        cfg, ctx = self.config, self.dist
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        parts = list(distributed.shard(cfg.micro_batches, ctx.rank, ctx.world))  # this rank's micro-batches
        started = time.monotonic()
        self.model.train()
        row = {}
        with open(self.out / LOG, "a") if ctx.main else contextlib.nullcontext() as log_file, tqdm(
                total=None if cfg.max_minutes is not None else end,  # a time limit: no step count to aim at
                initial=self.step, desc="train", disable=not ctx.main) as bar:
            while self.step < end:
                step_started = time.monotonic()
                micro = split_batch(batch_order(len(self.examples), cfg.batch_size, self.step, cfg.seed),
                                    cfg.micro_batches)
                lr = warmup_lr(self.step + 1, cfg.lr, cfg.warmup_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = warmup_lr(self.step + 1, group["peak"], cfg.warmup_steps)
                self.optimizer.zero_grad()
                losses, modules = {}, {}
                for part in parts:
                    part_losses, part_modules = self._micro_batch(micro[part], part, sync=part == parts[-1])
                    for into, values in ((losses, part_losses), (modules, part_modules)):
                        for name, value in values.items():
                            into[name] = into.get(name, 0.0) + value
                grad_norm = torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                           cfg.grad_clip)
                finite = bool(torch.isfinite(grad_norm))  # the same on every rank: the gradients are reduced
                if finite:
                    self.optimizer.step()
                else:
                    log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
                self.step += 1
                bar.update(1)
                # Means over the step's micro-batches, every rank's (the same names everywhere: the model's)
                names = sorted(losses), sorted(modules)
                sums = distributed.sum_over_ranks(ctx, [losses[n] for n in names[0]] + [modules[n] for n in names[1]])
                means = dict(zip(names[0] + names[1], (v / cfg.micro_batches for v in sums), strict=True))
                row = {"step": self.step, "loss": means["loss"], "total": means["total"], "sparsity": means["sparsity"],
                       "lr": lr, "grad_norm": float(grad_norm) if finite else None,  # None: the update was skipped
                       "seconds": time.monotonic() - step_started,
                       "sparsity_per_module": {n: means[n] for n in names[1]}}
                if "distill" in means:
                    row["distill"] = means["distill"]
                bar.set_postfix(loss=f"{row['loss']:.3f}", sparsity=f"{row['sparsity']:.3f}")
                out_of_time = cfg.max_minutes is not None and distributed.any_rank(
                    ctx, time.monotonic() - started > 60 * cfg.max_minutes)  # every rank stops at the same step
                if ctx.main and (self.step % cfg.log_every == 0 or self.step == end or out_of_time):
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if self.step % cfg.save_every == 0 or self.step == end or out_of_time:
                    self.save()
                if out_of_time:
                    break
        return row
