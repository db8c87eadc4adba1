"""Training of a gated model, for every backbone (TrainConfig.backbone: OWSM or Whisper base):
ASR + ST multitask with the backbone's prompts, Adam with a warm-up learning-rate schedule,
gradient clipping, the sparsity target, optional distillation from the dense model; a frozen
backbone (only the gates, and chosen backbone parameters, train); progress, a JSONL log, and
checkpoints that resume exactly (trainable state, optimizer, schedule, step, RNG state)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from localgp.backbones import get_backbone
from localgp.context.feeder import ContextFeeder
from localgp.data.examples import load_corpus, make_examples
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
    TrainConfig,
    check_device,
    checkpoint_path,
    claim_run_dir,
    model_state,
    read_checkpoint,
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


class Trainer:
    def __init__(self, config: TrainConfig, overwrite: bool = False):
        """Sets up the run (resuming from out_dir's checkpoint). Nothing is written before the
        corpus and its audio are checked and out_dir is known to hold no other config's run
        (runs.claim_run_dir; overwrite: start that run over); out_dir records the config once
        the whole setup has succeeded."""
        self.config = config
        self.out = Path(config.out_dir)
        self.backbone = get_backbone(config)
        utterances = load_corpus(config.data, config.skip_bad_audio, self.backbone.max_seconds)
        self.examples = make_examples(utterances, config.tasks, self.backbone.supports)
        self.device = check_device(config.device, "TrainConfig.device")
        claim_run_dir(config, overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.model, self.tokenizer = self.backbone.build(
            lambda: [e.target_text for e in self.examples] + [e.utterance.text for e in self.examples])
        self.backbone.check_examples(self.examples)
        self.model.to(self.device)
        self.contexts = ContextFeeder(self.model, config.context_extractors, self.out / "context",
                                      self.backbone.prompt_context)
        set_execution(self.model, "masked")
        self.trainable = select_trainable(self.model, config.frozen, config.unfreeze)
        # Frozen backbone weights that can be re-read are not saved: the checkpoint names them.
        self.weights = self.backbone.weights_identity() if config.frozen else None
        parameters = dict(self.model.named_parameters())
        self.optimizer = torch.optim.Adam([parameters[n] for n in self.trainable], lr=config.lr)
        self.step = 0
        self._resume()
        truncate_log(self.out / LOG, self.step)
        record_config(config)

    def _checkpoint_path(self) -> Path:
        return checkpoint_path(self.out)

    def save(self) -> None:
        state = {"model": model_state(self.model, set(self.trainable), self.weights), "weights": self.weights,
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "rng": torch.get_rng_state(),
                 "config": dataclasses.asdict(self.config)}
        if self.device.type == "cuda":  # the Gumbel noise of the gates is drawn there
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        write_checkpoint(state, self._checkpoint_path())

    def _resume(self) -> None:
        path = self._checkpoint_path()
        if not path.exists():
            return
        state = read_checkpoint(path, "cannot resume from {path}: {err}; move it away to start afresh")
        restore_model(self.model, state, self.backbone, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
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

    def train(self, steps: int | None = None) -> dict:
        """Runs until max_steps (or `steps` more, or max_minutes); returns the last log row."""
        from tqdm import tqdm

        cfg = self.config
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        started = time.monotonic()
        self.model.train()
        row = {}
        with open(self.out / LOG, "a") as log_file, tqdm(
                total=None if cfg.max_minutes is not None else end,  # a time limit: no step count to aim at
                initial=self.step, desc="train") as bar:
            while self.step < end:
                step_started = time.monotonic()
                picked = batch_order(len(self.examples), cfg.batch_size, self.step, cfg.seed)
                examples = [self.examples[i] for i in picked]
                self.contexts(examples)
                batch = {k: v.to(self.device) for k, v in self.backbone.collate(examples).items()}
                lr = warmup_lr(self.step + 1, cfg.lr, cfg.warmup_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                # The teacher first: the student's pass must be the last one, its masks give the sparsity.
                teacher = self.teacher_logits(batch) if cfg.distill_weight > 0 else None
                out = self.backbone.forward(self.model, batch)
                loss = out.loss
                distill = None
                if teacher is not None:
                    distill = distillation_loss(out.logits, teacher, out.targets, cfg.distill_temperature)
                    loss = loss + cfg.distill_weight * distill
                total, sparsity = pruning_loss(self.model, loss, cfg.target_sparsity, cfg.sparsity_weight)
                self.optimizer.zero_grad()
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], cfg.grad_clip)
                finite = bool(torch.isfinite(grad_norm))
                if finite:
                    self.optimizer.step()
                else:
                    log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
                self.step += 1
                bar.update(1)
                row = {"step": self.step, "loss": out.loss.item(), "total": total.item(), "sparsity": sparsity.item(),
                       "lr": lr, "grad_norm": float(grad_norm) if finite else None,  # None: the update was skipped
                       "seconds": time.monotonic() - step_started,
                       "sparsity_per_module": last_record(self.model).sparsity_per_module()}
                if distill is not None:
                    row["distill"] = distill.item()
                bar.set_postfix(loss=f"{row['loss']:.3f}", sparsity=f"{row['sparsity']:.3f}")
                out_of_time = cfg.max_minutes is not None and time.monotonic() - started > 60 * cfg.max_minutes
                if self.step % cfg.log_every == 0 or self.step == end or out_of_time:
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                if self.step % cfg.save_every == 0 or self.step == end or out_of_time:
                    self.save()
                if out_of_time:
                    break
        return row
