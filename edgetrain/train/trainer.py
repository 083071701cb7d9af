"""The Trainer: steps or epochs of a model on a data split, with an optimizer and LR schedule, a precision
controller, periodic evaluation, a JSON-lines log, checkpoints, and a bit-identical resume.

Everything a step computes is a function of the step number and the checkpointed state: the batch
(`Loader.batch_at(step)`, augmentation keyed by step), the learning rate (a pure schedule), dropout and
stochastic rounding (keyed by `model.step`). So a run resumed from step N's checkpoint ends with the
same weights, bit for bit, as one that never stopped.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgetrain import preprocess
from edgetrain.data import Loader, Split, check_fits, iterate_eval
from edgetrain.data.dataset import Dataset
from edgetrain.data.transforms import CIFAR_AUGMENT
from edgetrain.errors import EdgetrainError, Interrupted
from edgetrain.export import export_onnx, to_onnx
from edgetrain.fileio import write_atomic
from edgetrain.finite import check_finite_weights, first_nonfinite
from edgetrain.kernels import detfloat
from edgetrain.losses import softmax_cross_entropy
from edgetrain.model import Model
from edgetrain.precision.control import PrecisionController, PrecisionSpec, make_controller
from edgetrain.precision.dfq.controller import DFQ
from edgetrain.precision.dfq.export import export_gates, gates_path
from edgetrain.precision.dfq.recalibrate import recalibrate
from edgetrain.preprocess import Preprocess
from edgetrain.signals import StopFlag
from edgetrain.train.checkpoint import Checkpoint, CheckpointManager, file_sha256, list_checkpoints
from edgetrain.train.config import (
    CONFIG_JSON,
    DEFAULT_EPOCHS,
    DEFAULT_MILESTONE_FRACTIONS,
    SGD_DEFAULT_MOMENTUM,
    TrainConfig,
    write_config_json,
)
from edgetrain.train.finetune import trainable_names
from edgetrain.train.loop import TrainStep
from edgetrain.train.optim import make_optimizer
from edgetrain.train.runfolder import (
    EXPORT_NAME,
    GATES_NAME,
    RunFolder,
    check_inputs,
    check_run_dir,
    run_inputs,
    run_outputs,
)
from edgetrain.train.runlog import LOG_NAME, RunLog, precision_summary
from edgetrain.train.runstate import (
    PENDING_AIM,
    PRECISION,
    apply_precision,
    output_classes,
    pack_state,
    prepare_model,
    stored_spec,
    unpack_state,
)
from edgetrain.train.schedules import make_schedule

EVAL_BATCH_SIZE = 256
PROGRESS_EVERY = 5  # steps between progress-bar refreshes: formatting costs more than a small step
LOSS_WINDOW = 10  # steps the progress bar's loss averages over
NONFINITE_MARKER = "NaN or infinite"  # how the quantiser reports a non-finite tensor
# Overflow in a diverging step: we detect its inf/NaN ourselves and say so in one line, without numpy's warnings.
QUIET_NUMPY = {"over": "ignore", "invalid": "ignore", "divide": "ignore"}


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    steps: int
    total_steps: int
    final_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    bitops: int
    fp32_bitops: int
    percent_of_fp32: float
    seconds: float
    precision: str
    run_dir: str
    checkpoint: str | None
    log: str
    config: str
    model: str | None
    interrupted: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)
    full_depth_accuracy: float | None = None  # a gated run's exported network, every block computing

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self.__dict__)


def evaluate(model: Model, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Eval-mode mean cross-entropy and top-1 accuracy over a whole dataset."""
    total_loss, correct = 0.0, 0
    for x, y in iterate_eval(dataset, batch_size):
        logits = model(x)
        with detfloat.using(model.deterministic_float):  # the reported loss: the same bits on the board too
            loss, _ = softmax_cross_entropy(logits, y)
        total_loss += loss * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
    n = len(dataset)
    return {"loss": total_loss / n, "accuracy": correct / n, "samples": n}


def recalibrate_for_export(model: Model, x: np.ndarray, config: TrainConfig) -> bool:
    """A gated model's statistics re-estimated at full depth with the run's settings (batches, batch size,
    seed: a run, its later export and a fleet client draw alike); False where there is nothing to do."""
    if DFQ.of(model) is None or config.dfq_recalibration_batches <= 0 or not len(x):
        return False
    recalibrate(model, x, batches=config.dfq_recalibration_batches, batch_size=config.batch_size, seed=config.seed)
    return True


def clear_run_dir(path: str | Path) -> None:
    """Remove an earlier run's checkpoints, log, config and model from a folder a tool reuses for each new run
    (under the folder's lock: never while a run is using it)."""
    path = Path(path)
    if not path.is_dir():
        return
    with RunFolder(path):
        for _, ckpt in list_checkpoints(path):
            ckpt.unlink()
        for name in (LOG_NAME, CONFIG_JSON, EXPORT_NAME, GATES_NAME):
            (path / name).unlink(missing_ok=True)


def _milestones(config: TrainConfig, total: int) -> list[int]:
    if config.lr_milestones:
        return list(config.lr_milestones)
    # Default drops at fixed fractions of the run; dedupe for runs too short to separate them.
    return sorted({max(1, int(total * f)) for f in DEFAULT_MILESTONE_FRACTIONS})


def _optimizer_options(config: TrainConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if config.optimizer == "sgd":
        opts["momentum"] = SGD_DEFAULT_MOMENTUM if config.momentum is None else config.momentum
    if config.weight_decay is not None:
        opts["weight_decay"] = config.weight_decay
    return opts


def _augmentation(split: Split, config: TrainConfig):
    """The data source's own augmentation unless the config turns it off, or on (crop/flip) where it has none."""
    if config.augment is None:
        return split.augment
    return (split.augment or CIFAR_AUGMENT) if config.augment else None


class Trainer:
    """Trains one model on one data split as a TrainConfig says; see the module doc."""

    def __init__(self, model: Model, split: Split, config: TrainConfig, *,
                 controller: PrecisionController | None = None, head: list[str] | tuple[str, ...] = (),
                 progress: bool = False, desc: str = "train", resume_hint: str | None = None,
                 export_model: bool = True, report: Callable[[str], None] | None = None,
                 inputs: Sequence[str] = ()):
        self.model = model
        self.split = split
        self.config = config
        self.run_dir = Path(config.out)
        self.progress = progress
        self.desc = desc
        self.export_model = export_model
        self.report = report or (lambda text: print(text, file=sys.stderr))
        # The end of the "stopped" line: how to carry on (a run the demo made cannot resume; it says so).
        self.resume_hint = resume_hint or f"resume with: edgetrain train --out {self.run_dir} --resume"
        # Files the run reads, which none it writes may be (the model, the data, a cost table, a config file).
        self.inputs = run_inputs(config, inputs)
        check_finite_weights(model, config.model or "the model")
        classes = output_classes(model)
        check_fits(split.train, model.input_shape, classes)
        check_fits(split.test, model.input_shape, classes)
        double = preprocess.check_no_double(preprocess.normalizes_in_graph(model.graph.original), (split.train,))
        if double is not None:
            self.report(f"edgetrain: warning: {double}")
        self.loader = Loader(split.train, config.batch_size, seed=config.seed, augment=_augmentation(split, config))
        self.total_steps = config.steps or (config.epochs or DEFAULT_EPOCHS) * self.loader.steps_per_epoch
        self.eval_every = config.eval_every or self.loader.steps_per_epoch
        sched_opts: dict[str, Any] = {"warmup_steps": config.warmup_steps}
        if config.lr_schedule == "step":
            sched_opts.update(milestones=_milestones(config, self.total_steps), gamma=config.lr_gamma)
        elif config.lr_schedule == "cosine":
            sched_opts["min_lr"] = config.min_lr
        self.schedule = make_schedule(config.lr_schedule, config.lr, self.total_steps, **sched_opts)
        prepare_model(model, config)  # DFQ's gates join the parameters before the optimizer sees them
        dfq = DFQ.of(model)
        self.trainable = trainable_names(model, freeze=config.freeze, train_last=config.train_last,
                                         bias_only=config.bias_only, freeze_bn=config.freeze_bn,
                                         always=list(head) + (dfq.param_names if dfq is not None else []))
        chosen = set(self.trainable)
        self.optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr,
                                        trainable=chosen.__contains__, **_optimizer_options(config))
        self._update = TrainStep(model, self.optimizer, self.schedule, label_smoothing=config.label_smoothing,
                                 update_buffers=not config.freeze_bn, check=self._check_finite)
        self.controller = controller or make_controller(config)
        self.model_sha256 = file_sha256(config.model) if config.model else None
        self.step = 0
        self.spec: PrecisionSpec | None = None
        self._set_precision(self.controller.precision)  # now: a bad override pattern fails before any file
        self.last_loss: float | None = None
        self.elapsed = 0.0
        # FracTrain's next target, to point the gates at before the next step trains (None: nothing waiting).
        # Not at once: a switch on the last step would reset the head's bias the run then evaluates and exports.
        self.pending_aim: float | None = None
        self.resumed_from: int | None = None
        self.evals: list[dict[str, Any]] = []
        self._manager: CheckpointManager | None = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The run folder's checkpoint manager (creates the folder)."""
        if self._manager is None:
            self._manager = CheckpointManager(self.run_dir, keep=self.config.keep, every=self.config.checkpoint_every)
        return self._manager

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint of this run: tensors, optimizer, controller, eval ranges, step."""
        if self.model_sha256:
            ckpt.check_model(self.config.model)
        if ckpt.step > self.total_steps:
            raise EdgetrainError(f"{ckpt.path}: taken at step {ckpt.step}, past this run's {self.total_steps} steps")
        self.model.load_state_dict({**ckpt.params, **ckpt.buffers})
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        controller_state, trainer = unpack_state(self.model, ckpt.controller_state)
        self.controller.load_state_dict(controller_state)
        self._set_precision(self.controller.precision)
        if self.spec != stored_spec(trainer):
            raise EdgetrainError(f"{ckpt.path}: the run was at precision {stored_spec(trainer)!r}, but its "
                                 f"controller now says {self.spec!r}; was the checkpoint made with other settings?")
        self.last_loss = trainer.get("last_loss")
        self.elapsed = float(trainer.get("elapsed", 0.0))
        pending = trainer.get(PENDING_AIM)
        self.pending_aim = None if pending is None else float(pending)
        self.step = self.resumed_from = ckpt.step

    def add_gradient_term(self, term: Callable[[dict[str, np.ndarray]], None]) -> None:
        """Let `term(grads)` change every step's gradients after backward, before the checks and the optimizer."""
        check = self._update.check

        def with_term(step: int, loss: float, grads: dict[str, np.ndarray]) -> None:
            term(grads)  # first, so a term that overflows is caught by the finiteness check like any gradient
            if check is not None:
                check(step, loss, grads)

        self._update.check = with_term

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (never one holding a non-finite weight)."""
        # Finite gradients can still step a weight to inf (a huge --lr). Mid-run the next step's loss and
        # gradient checks catch that; here, at every save point (the final one too, before any export),
        # one pass over the weights makes sure nothing non-finite is ever saved.
        params = self.model.parameters()
        bad = first_nonfinite({n: params[n] for n in self.trainable if n in params})
        if bad is not None:
            raise self._diverged(max(self.step - 1, 0), f"the update left '{bad[0]}' holding {bad[1]}")
        trainer = {PRECISION: json.dumps(self.spec), "elapsed": float(self.elapsed)}
        if self.last_loss is not None:
            trainer["last_loss"] = float(self.last_loss)
        if self.pending_aim is not None:
            trainer[PENDING_AIM] = float(self.pending_aim)
        return self.manager.save(
            self.step, params=self.model.parameters(), buffers=self.model.buffers(),
            optimizer_state=self.optimizer.state_dict(),
            controller_state=pack_state(self.model, self.controller.state_dict(), trainer),
            meta={"epoch": self.step // self.loader.steps_per_epoch, "seed": self.config.seed,
                  "config": self.config.to_dict(), "model_sha256": self.model_sha256,
                  # what the data pipeline did to the inputs, so `edgetrain export` can put it in the model
                  "preprocess": preprocess.record(Preprocess.of_dataset(self.split.train))})

    # -- one step ---------------------------------------------------------------------------------
    def _diverged(self, step: int, what: str) -> EdgetrainError:
        return EdgetrainError(f"step {step}: {what}; training diverged (try a lower --lr, currently "
                              f"{self.optimizer.lr:.3g}, or --warmup-steps)")

    def _set_precision(self, spec: PrecisionSpec) -> None:
        if spec != self.spec:
            apply_precision(self.model, spec, self.config)
            self.spec = spec

    def train_step(self) -> float:
        """One update (number self.step, 0-based) at the precision in force; returns its loss."""
        s = self.step
        if self.pending_aim is not None:
            DFQ.of(self.model).aim(self.pending_aim)
            self.pending_aim = None
        x, y = self.loader.batch_at(s)
        try:
            with np.errstate(**QUIET_NUMPY):
                loss = self._update(s, x, y)
        except (ValueError, EdgetrainError) as exc:
            if NONFINITE_MARKER in str(exc):  # the integer path refuses to quantise inf/NaN activations
                raise self._diverged(s, "activations or gradients are not finite") from None
            raise
        self.step = s + 1
        self.last_loss = loss
        return loss

    def _check_finite(self, step: int, loss: float, grads: dict[str, np.ndarray]) -> None:
        """Stop before a non-finite loss or gradient reaches the weights."""
        if not math.isfinite(loss):
            raise self._diverged(step, f"loss is {loss}")
        bad = next((n for n in self.trainable
                    if grads.get(n) is not None and not np.isfinite(grads[n]).all()), None)
        if bad is not None:
            raise self._diverged(step, f"the gradient of '{bad}' is not finite")

    def control(self, loss: float) -> None:
        """Show the controller the step just done; a new spec takes effect from the next step."""
        spec = self.controller.on_step(self.step - 1, loss)
        if spec is not None:
            old = self.spec.get("dfq_target") if isinstance(self.spec, dict) else None
            self._set_precision(spec)
            new = spec.get("dfq_target") if isinstance(spec, dict) else None
            if new is not None and new != old:  # FracTrain's next target: the next step points the gates at it
                self.pending_aim = new

    def run_eval(self) -> dict[str, Any]:
        """Evaluate on the test split and remember the result."""
        try:
            with np.errstate(**QUIET_NUMPY):
                result = {"step": self.step, **evaluate(self.model, self.split.test)}
        except (ValueError, EdgetrainError) as exc:
            if NONFINITE_MARKER in str(exc):
                raise self._diverged(max(self.step - 1, 0), "the test set's activations are not finite") from None
            raise
        if not math.isfinite(result["loss"]):  # the last step's update overflowed what the model computes
            raise self._diverged(max(self.step - 1, 0), f"the test loss after it is {result['loss']}")
        self.evals.append(result)
        return result

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to total_steps (from the resumed step, if any); checkpoint, evaluate, log, export.

        The run folder is locked from the first check to the export: a second run on it fails at once.
        """
        # A stop signal ends the loop at the next step; one during the final evaluation, checkpoint and
        # export waits for them (the run is all but done); a second signal stops at once.
        with RunFolder(self.run_dir), StopFlag() as stop:
            check_inputs(run_outputs(self.run_dir), self.inputs)
            notice = check_run_dir(self.run_dir, self.resumed_from is not None)
            if notice is not None:
                self.report(f"edgetrain: warning: {notice}")
            return self._fit_locked(stop)

    def _fit_locked(self, stop: StopFlag) -> TrainResult:
        manager = self.manager  # clears a killed writer's temporary files: safe only under the lock
        # The log first: a resumed run's log is read and checked there, and a refusal must leave config.json
        # as the run had it.
        log = RunLog(self.run_dir, self.resumed_from)
        try:
            config_path = write_config_json(self.config, self.run_dir)
        except BaseException:
            log.close()
            raise
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        losses: list[float] = []
        checkpoint: Path | None = None
        started = time.perf_counter() - self.elapsed
        interrupted = False
        try:
            while self.step < self.total_steps:
                if stop.requested:
                    interrupted = True
                    break
                loss = self.train_step()
                self.elapsed = time.perf_counter() - started
                losses = (losses + [loss])[-LOSS_WINDOW:]
                self._log_step(log, loss)
                if self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self._log_eval(log, started)  # at the precision the step trained in
                self.control(loss)  # before the checkpoint, which must hold the controller's new state
                if manager.should_save(self.step) and self.step < self.total_steps:
                    checkpoint = self.save_checkpoint()
                bar.update(1)
                if self.step % PROGRESS_EVERY == 0 or self.step == self.total_steps:
                    bar.set_postfix_str(self._postfix(losses), refresh=False)
            if interrupted:
                checkpoint = self.save_checkpoint()
                raise Interrupted(f"stopped at step {self.step} of {self.total_steps} ({stop.requested}); "
                                  f"checkpoint {checkpoint}; {self.resume_hint}")
            if not self.evals or self.evals[-1]["step"] != self.step:
                # A run resumed at its last step has that evaluation logged already; its result is still needed.
                self._log_eval(log, started, write=self.step not in log.logged_evals())
            checkpoint = self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        full_depth = self._recalibrate()  # an interrupted run raised above: this one finished
        exported = None
        if self.export_model:
            exported = str(self.run_dir / EXPORT_NAME)
            pre = Preprocess.of_dataset(self.split.train)
            if pre is None:
                export_onnx(self.model, exported)
            else:
                # The run's own model.onnx keeps taking normalised input (what the run and its tests feed
                # it); its metadata says how to normalise. `edgetrain export` puts it in the graph.
                write_atomic(exported, preprocess.embed(to_onnx(self.model), pre, "metadata").SerializeToString())
            if DFQ.of(self.model) is not None:
                export_gates(self.model, gates_path(exported))
        last = self.evals[-1]
        cost = self.model.cost
        return TrainResult(
            steps=self.step, total_steps=self.total_steps, final_loss=self.last_loss, test_loss=last["loss"],
            test_accuracy=last["accuracy"], bitops=cost.bitops, fp32_bitops=cost.fp32_bitops,
            percent_of_fp32=cost.percent_of_fp32, seconds=self.elapsed,
            precision=precision_summary(self.model.precision), run_dir=str(self.run_dir),
            checkpoint=str(checkpoint) if checkpoint else None, log=str(log.path), config=str(config_path),
            model=exported, interrupted=interrupted, evals=list(self.evals),
            full_depth_accuracy=None if full_depth is None else full_depth["accuracy"])

    def _recalibrate(self) -> dict[str, float] | None:
        """A gated run's exported network (every block at the exported candidate): its statistics
        re-estimated at full depth (`recalibrate_for_export`), then its test metrics."""
        if not recalibrate_for_export(self.model, self.split.train.x, self.config):
            return None
        dfq = DFQ.of(self.model)
        with dfq.forced(dfq.most_precise()), np.errstate(**QUIET_NUMPY):
            return evaluate(self.model, self.split.test)

    def _log_step(self, log: RunLog, loss: float) -> None:
        cost = self.model.cost
        layers = {name: str(p) for name, p in self.model.precision.items()}
        if layers != log.last_layers:  # every layer's bits, whenever they change (edgetrain plot reads it)
            log.write({"type": "layers", "step": self.step, "layers": layers})
            log.last_layers = layers
        record = {"type": "step", "step": self.step, "loss": loss, "lr": self.optimizer.lr,
                  "precision": precision_summary(self.model.precision),
                  "bitops": sum(c.total for c in cost.last_step.values()),
                  "percent_of_fp32": cost.percent_of_fp32, "time": round(self.elapsed, 4)}
        dfq = DFQ.of(self.model)
        if dfq is not None:  # the gates' cost against its target, and the loss without the cost term
            record.update(task_loss=self.model.last_task_loss, dfq_percent=round(dfq.last_percent, 4),
                          dfq_target=dfq.target)
        log.write(record)

    def _log_eval(self, log: RunLog, started: float, write: bool = True) -> None:
        result = self.run_eval()
        self.elapsed = time.perf_counter() - started
        if write:
            log.write({"type": "eval", "step": self.step, "loss": result["loss"], "accuracy": result["accuracy"],
                       "time": round(self.elapsed, 4)})

    def _postfix(self, losses: list[float]) -> str:
        parts = [f"loss={sum(losses) / max(len(losses), 1):.3f}"]
        if self.evals:
            parts.append(f"acc={self.evals[-1]['accuracy']:.1%}")
        parts.append(f"bits={precision_summary(self.model.precision)}")
        return ", ".join(parts)
