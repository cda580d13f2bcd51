"""The main job: fine-tune an MLP on MNIST-like data with a PEFT method, evaluate, save.

``METHODS`` maps a method name to a function that prepares a model in place and returns the optimizer's
parameter groups; everything else (data, loop, evaluation, metrics) is shared by all methods.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import functional as F
from .backend import Backend, get_backend
from .checkpoint import load_model, save_model
from .errors import ConfigError, Interrupted, MinitorchPeftError
from .outputs import check_output
from .schema import MAX_RANK, check_adapter_name
from .serialize import CheckpointError
from .data import iterate_batches, load_mnist_like, num_batches
from .distributed import Solo, World, agreement_record
from .nn.layers import MLP
from .optim import Adam
from .peft.config import AdapterError, LoraConfig
from .peft.loraplus import loraplus_param_groups
from .peft.model import add_adapter, count_parameters, inject_adapters, list_adapters, lora_layers, set_adapter
from .peft.qlora import base_weight_nbytes, quantized_layers
from .progress import EpochProgress
from .random import manual_seed
from .resume import RunState, read_run, save_run
from .tensor import Tensor, no_grad

DIMS = [784, 512, 256, 10]


@dataclass
class TrainConfig:
    """Every setting of one training run (the CLI's flags)."""

    backend: str = "numpy"
    dataset: str = "mnist"
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["fc1", "fc2", "fc3"])
    adapter_name: str = "default"
    loraplus_ratio: float = 16.0
    quant: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 42
    output: str = "./tmp/peft-mnist"
    data_dir: str | None = None
    base: str | None = None
    limit: int | None = None
    resume: str | None = None
    save_every_epoch: bool = False

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the flag."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rank > MAX_RANK:  # a folder saved with it could never be read back (and 10**9 runs out of memory)
            raise ConfigError(f"--rank must be an integer from 1 to {MAX_RANK}, got {self.rank}")
        for name in ("lr", "alpha", "dropout", "loraplus_ratio"):  # nan and inf pass '> 0'-style checks
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        try:
            check_adapter_name(self.adapter_name, "--adapter-name")
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.resume is not None and self.base is not None:
            raise ConfigError("--resume continues a saved run (its model is the start): drop --model-dir")
        if self.method in QUANTIZED_METHODS:
            from .backend import QUANT_TYPES, check_block_size

            if self.quant not in QUANT_TYPES:
                raise ConfigError(f"--quant {self.quant!r} is not supported; use one of: {', '.join(QUANT_TYPES)}")
            try:
                check_block_size(self.block_size)
            except ValueError:
                raise ConfigError(f"--block-size must be a power of two from 32 to 4096, got {self.block_size!r}") from None
        if self.method not in ("full", "head"):
            self.lora_config()  # rank, alpha, dropout, targets: checked before any data is read
            if not self.loraplus_ratio > 0:
                raise ConfigError(f"--loraplus-ratio must be > 0, got {self.loraplus_ratio}")
            if self.base is None and self.resume is None:  # the default flow's MLP: targets can be checked now
                shapes = {f"fc{i + 1}": (n_in, n_out) for i, (n_in, n_out) in enumerate(zip(DIMS[:-1], DIMS[1:]))}
                for target in self.targets:  # any rank fits (a rank above a layer's width is one warning line)
                    if target not in shapes:
                        raise AdapterError(f"target module {target!r} matches no Linear module; available: {', '.join(shapes)}")
        get_backend(self.backend)
        check_output(self.output, "--output")  # a folder we may replace, and writable: before any work
        if self.save_every_epoch:  # OUTPUT-best is replaced whole too, under the same policy
            check_output(self.best_output(), "--save-every-epoch (OUTPUT-best)")

    def best_output(self) -> Path:
        """Where ``--save-every-epoch`` keeps the epoch of best test accuracy: the output folder's name + ``-best``."""
        output = Path(self.output)
        if output.name in ("", ".."):  # '.' or '..': a sibling of the folder they name, not one inside it
            output = output.resolve()
        return output.with_name(output.name + "-best")

    def lora_config(self, **overrides: Any) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.rslora,
                          target_modules=list(self.targets), **overrides)


def resumed_config(folder: str, **overrides: Any) -> TrainConfig:
    """The settings of the run saved in ``folder``, to continue it there (or to ``overrides["output"]``).

    The saved ``base`` (the first run's ``--model-dir``) is not taken: the saved run's own model is the start
    now, and ``validate`` refuses a resume with a base. The settings' types are checked by ``read_run``.
    """
    training, _ = read_run(folder)
    saved = {k: training[k] for k in TrainConfig.__dataclass_fields__ if k in training and k != "base"}
    if saved.get("method", "lora") not in METHODS:
        raise CheckpointError(f"{folder}/config.json: 'training.method' must be one of {', '.join(METHODS)}, "
                              f"got {saved['method']!r}")
    return TrainConfig(**{**saved, "output": folder, **overrides, "resume": folder})


ParamGroups = list[dict[str, Any]]


def _full(model: MLP, cfg: TrainConfig) -> ParamGroups:
    model.unfreeze()
    return [{"params": list(model.parameters())}]


def _head(model: MLP, cfg: TrainConfig) -> ParamGroups:
    """The linear probe: only the last layer trains, every other parameter stays frozen."""
    model.freeze()
    last = getattr(model, model.layer_names[-1])
    last.unfreeze()
    return [{"params": list(last.parameters())}]


def _adapt(model: MLP, cfg: TrainConfig, config: LoraConfig, quantize: bool = False) -> None:
    """Add adapter ``cfg.adapter_name`` and make it the one that trains.

    On a plain model this injects it (freezing the base; with ``quantize`` the base weights go to 4 bits
    per ``cfg.quant`` / ``double_quant`` / ``block_size``); on a model that already has adapters (``--model-dir``
    a folder saved by an adapter run) it is added beside them, and they stay frozen: that is how one
    folder comes to hold several named adapters for ``cli.py merge``.
    """
    if next(lora_layers(model), None) is None:
        quant = dict(quantize=cfg.quant, double_quant=cfg.double_quant, block_size=cfg.block_size) if quantize else {}
        inject_adapters(model, config, adapter_name=cfg.adapter_name, **quant)
        return
    if quantize and not any(hasattr(layer, "quant_config") for _, layer in lora_layers(model)):
        raise AdapterError(
            f"--model-dir {cfg.base} holds adapters on a full-precision base ({', '.join(list_adapters(model))}); "
            f"--method {cfg.method} needs a plain model (or one saved by a qlora/qdora run): fold them in first "
            "(cli.py merge --unload)"
        )
    if cfg.adapter_name in list_adapters(model):
        raise AdapterError(
            f"--model-dir already has an adapter named {cfg.adapter_name!r} ({', '.join(list_adapters(model))}); "
            "pass --adapter-name NEW to add another"
        )
    add_adapter(model, cfg.adapter_name, config)
    set_adapter(model, cfg.adapter_name)


def _lora(model: MLP, cfg: TrainConfig) -> ParamGroups:
    _adapt(model, cfg, cfg.lora_config())
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _dora(model: MLP, cfg: TrainConfig) -> ParamGroups:
    _adapt(model, cfg, cfg.lora_config(use_dora=True))
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _qlora(model: MLP, cfg: TrainConfig) -> ParamGroups:
    """LoRA over a frozen base stored in 4 bits (NF4 / FP4, optionally double-quantized)."""
    _adapt(model, cfg, cfg.lora_config(), quantize=True)
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _qdora(model: MLP, cfg: TrainConfig) -> ParamGroups:
    """DoRA over a frozen base stored in 4 bits."""
    _adapt(model, cfg, cfg.lora_config(use_dora=True), quantize=True)
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def _lora_plus(model: MLP, cfg: TrainConfig) -> ParamGroups:
    """LoRA whose B matrices learn ``loraplus_ratio`` times faster than the rest."""
    _adapt(model, cfg, cfg.lora_config())
    return loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio)


def _resumed_groups(model: MLP, cfg: TrainConfig) -> ParamGroups:
    """The parameter groups ``METHODS[cfg.method]`` gave the first run, on the reloaded model (whose adapter
    is already there: it is made active and trainable again, not added)."""
    if cfg.method in ("full", "head"):
        return METHODS[cfg.method](model, cfg)
    set_adapter(model, cfg.adapter_name)
    if cfg.method == "lora-plus":
        return loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio)
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


METHODS: dict[str, Callable[[MLP, TrainConfig], ParamGroups]] = {
    "lora": _lora,
    "dora": _dora,
    "lora-plus": _lora_plus,
    "qlora": _qlora,
    "qdora": _qdora,
    "head": _head,
    "full": _full,
}
QUANTIZED_METHODS = ("qlora", "qdora")


def evaluate(model: MLP, x: Any, y: Any, batch_size: int = 1000) -> float:
    """Share of correctly classified samples (eval mode, no graph)."""
    was_training = model.training
    model.eval()
    correct = 0
    with no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(Tensor._make(x[start:start + batch_size], model.backend, False)).data
            correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / int(x.shape[0])


def predict(model: MLP, x: Any) -> np.ndarray:
    model.eval()
    with no_grad():
        logits = model(Tensor._make(x, model.backend, False))
    return logits.backend.to_numpy(logits.data).argmax(axis=1)


@dataclass
class Data:
    """The train and test splits, already on the backend's device (batches are views or gathers there)."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])


def load_data(cfg: TrainConfig, backend: Backend, log: Callable[[str], None] = print) -> Data:
    """Read the dataset (``--limit`` first training samples) and move it to the device once."""
    log(f"📦 Loading {cfg.dataset} dataset...")
    x_train, y_train = load_mnist_like(cfg.dataset, "train", cfg.data_dir, limit=cfg.limit)
    x_test, y_test = load_mnist_like(cfg.dataset, "test", cfg.data_dir)
    log(f"   {len(y_train):,} training and {len(y_test):,} test images")
    return Data(backend.asarray(x_train), backend.asarray(y_train), backend.asarray(x_test), backend.asarray(y_test))


def build_model(cfg: TrainConfig, backend: Backend, data: Data, log: Callable[[str], None] = print,
                state: RunState | None = None) -> tuple[MLP, Adam, dict[str, int]]:
    """The model (new, ``--model-dir``, or the ``--resume`` run's) prepared for ``cfg.method``, its optimizer and
    its parameter counts. On resume (``state``) the optimizer is built over the same tensors in the same
    order as the first run's, then given the saved state."""
    if cfg.resume and state is not None:
        log(f"📊 Resuming {cfg.resume}: epoch {state.epoch} of {cfg.epochs} done")
        model, _ = load_model(cfg.resume)
        groups = _resumed_groups(model, cfg)
        model.to(backend)
        optimizer = Adam(groups, lr=cfg.lr)
        state.restore(optimizer)
        counts = {**count_parameters(model), "baseline": state.counts.get("baseline", model.num_parameters())}
        log(f"   Trainable parameters: {counts['trainable']:>9,}")
        return model, optimizer, counts
    if cfg.base:
        log(f"📊 Loading base model from {cfg.base}...")
        model, _ = load_model(cfg.base)
        if next(lora_layers(model), None) is not None and cfg.method in ("full", "head"):
            raise AdapterError(
                f"--model-dir {cfg.base} holds adapters ({', '.join(list_adapters(model))}); --method {cfg.method} needs a plain "
                "model: fold them in first (cli.py merge --unload) or train another adapter with --adapter-name"
            )
        n_in = int(data.x_train.shape[1])
        if model.dims[0] != n_in or model.dims[-1] != 10:
            raise AdapterError(
                f"--model-dir {cfg.base} has shape {' -> '.join(map(str, model.dims))}; this data needs {n_in} -> ... -> 10"
            )
    else:
        log("📊 Creating baseline MLP...")
        model = MLP(DIMS)
    baseline = model.num_parameters()
    log(f"   Baseline parameters: {baseline:,}")
    if cfg.base is None and cfg.method != "full":
        log(f"   Baseline accuracy before fine-tuning (random init): {evaluate(model.to(backend), data.x_test, data.y_test):.2%}")
    elif cfg.base:
        log(f"   Base accuracy on {cfg.dataset} before fine-tuning: {evaluate(model.to(backend), data.x_test, data.y_test):.2%}")

    label = cfg.method.upper() if cfg.method != "full" else "full fine-tuning"
    log(f"\n🎯 Preparing {label} (rank={cfg.rank}, alpha={cfg.alpha:g})..." if cfg.method not in ("full", "head") else f"\n🎯 Preparing {label}...")
    groups = METHODS[cfg.method](model, cfg)
    model.to(backend)
    counts = {**count_parameters(model), "baseline": baseline}
    log(f"   Total parameters:     {counts['total']:>9,}")
    log(f"   Trainable parameters: {counts['trainable']:>9,}  ({counts['trainable'] / baseline:.2%} of baseline)")
    log(f"   Frozen parameters:    {counts['frozen']:>9,}")
    quantized = quantized_layers(model)
    if quantized:
        q = quantized[0][1].quant_config()
        log(f"   Base weights in {q['quant_type']}{' + double quant' if q['double_quant'] else ''} (block {q['block_size']}): "
            f"{base_weight_nbytes(model):,} bytes (float32: {4 * sum(l.quantized_numel for _, l in quantized):,})")
    return model, Adam(groups, lr=cfg.lr), counts


def train_epoch(model: MLP, optimizer: Adam, batches: Iterable[tuple[Any, Any]],
                on_step: Callable[[int, Any], None] | None = None, step_losses: list[Any] | None = None) -> Any:
    """One pass over ``batches``; returns the summed loss as a device scalar (no host sync per step).

    ``step_losses``, if given, receives every step's loss as a device scalar (read back once, later).
    """
    loss_sum = None
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)  # forward: builds the graph
        optimizer.zero_grad()
        loss.backward()                       # backward: fills .grad of the trainable tensors only
        optimizer.step()                      # update: Adam on the trainable tensors
        loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
        if step_losses is not None:
            step_losses.append(loss.data)
        if on_step is not None:
            on_step(i, loss_sum)
    return loss_sum


def tensor_batches(data: Data, backend: Backend, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The epoch's shuffled batches as constant tensors (the permutation is seeded by ``seed`` and ``epoch``)."""
    for xb, yb in iterate_batches(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, epoch=epoch):
        yield Tensor._make(xb, backend, False), Tensor._make(yb, backend, False)


def fit(cfg: TrainConfig, model: MLP, optimizer: Adam, data: Data, backend: Backend,
        log: Callable[[str], None] = print, world: Solo | World = Solo(), start_epoch: int = 0,
        losses: list[float] | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
        ) -> tuple[list[float], float]:
    """Epochs ``start_epoch`` .. ``cfg.epochs - 1`` of ``train_epoch``, each followed by a test-set evaluation.

    Returns the per-epoch test accuracies and the seconds spent training (evaluation excluded). With a
    ``World`` of N ranks, each step takes a global batch of N x ``cfg.batch_size`` and this rank trains on its
    shard of it; only rank 0 evaluates. ``losses`` gains every step's training loss (under N ranks, rank 0's
    shard's); ``on_epoch(epochs_done, accuracy, epoch_seconds)`` runs on rank 0 after each epoch (checkpoints).
    """
    accuracies: list[float] = []
    global_batch = cfg.batch_size * world.size
    steps = num_batches(data.n_train, global_batch)
    model.train()
    train_time = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        bar = EpochProgress(f"Epoch {epoch + 1}/{cfg.epochs}", steps, stream=None if world.is_main else io.StringIO())
        guard = LossGuard(backend, cfg, epoch, steps)

        def show(i: int, loss_sum: Any) -> None:
            guard.step(i, loss_sum)
            if bar.due():
                bar.update(i + 1, min((i + 1) * global_batch, data.n_train), lambda: float(loss_sum) / (i + 1))

        step_losses: list[Any] = []
        epoch_start = time.perf_counter()
        batches = world.shard(tensor_batches(data, backend, global_batch, cfg.seed, epoch))
        loss_sum = train_epoch(model, optimizer, batches, show, step_losses if losses is not None else None)
        running = world.mean(float(loss_sum) / steps if loss_sum is not None else 0.0)
        world.share_random_states()  # a save after this epoch holds every rank's dropout stream
        seconds = time.perf_counter() - epoch_start
        train_time += seconds
        bar.update(steps, data.n_train, running, force=True)
        bar.close()
        if not world.is_main:  # rank 0 evaluates, logs and saves
            continue
        if losses is not None and step_losses:
            losses.extend(float(v) for v in backend.to_numpy(backend.xp.stack(step_losses)))  # one read per epoch
        acc = evaluate(model, data.x_test, data.y_test)
        accuracies.append(acc)
        log(f"   Epoch {epoch + 1}: train loss {running:.4f}, test accuracy {acc:.2%}")
        if on_epoch is not None:
            on_epoch(epoch + 1, acc, seconds)
    return accuracies, train_time


class NonFiniteLoss(MinitorchPeftError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite; nothing more is saved (with ``--save-every-epoch``
    the epochs saved before stay, and the message says where)."""


class LossGuard:
    """Stops training at the first non-finite loss, naming the epoch and the step.

    Where the arrays live in host memory reading the 0-d running loss costs nothing, so every step is
    checked. On a device that would add a host sync per step, so the running losses are kept (device
    scalars) and checked in one transfer every ``every`` steps and at the end of the epoch; the first
    bad step is then found in that history. The running sum of non-negative losses stays non-finite
    once one step's loss is, so the first non-finite sum is the first bad step.
    """

    def __init__(self, backend: Backend, cfg: TrainConfig, epoch: int, steps: int, every: int = 50) -> None:
        self.backend, self.cfg, self.epoch, self.steps, self.every = backend, cfg, epoch, steps, every
        self.history: list[Any] = []
        self.first = 0  # step index of history[0]

    def step(self, i: int, loss_sum: Any) -> None:
        if self.backend.host_memory:
            value = float(loss_sum)
            if not math.isfinite(value):
                raise self._error(i, value)
            return
        if not self.history:
            self.first = i
        self.history.append(loss_sum)
        if (i + 1) % self.every == 0 or i == self.steps - 1:
            self.check()

    def check(self) -> None:
        if not self.history:
            return
        xp = self.backend.xp
        sums = self.backend.to_numpy(xp.stack(self.history))  # one transfer for the whole stretch
        self.history.clear()
        bad = np.flatnonzero(~np.isfinite(sums))
        if bad.size:
            raise self._error(self.first + int(bad[0]), float(sums[bad[0]]))

    def _error(self, i: int, value: float) -> NonFiniteLoss:
        cfg = self.cfg
        rates = f"--lr {cfg.lr:g}" + (f" with --loraplus-ratio {cfg.loraplus_ratio:g}" if cfg.method == "lora-plus" else "")
        return NonFiniteLoss(
            f"training stopped: the loss became {value} at epoch {self.epoch + 1}, step {i + 1} of {self.steps}; "
            f"likely cause: a learning rate too high for this model ({rates}) or non-finite input data; nothing was saved"
        )


def train(cfg: TrainConfig, log: Callable[[str], None] = print, world: Solo | World = Solo()) -> dict[str, Any] | None:
    """Run the whole job (load data, build, convert, train, evaluate, save) and return its metrics.

    With a ``World`` (``minitorch_peft.distributed``: data parallel over MPI) every rank runs this; rank 0
    logs, saves and returns the metrics, the other ranks return None.
    """
    cfg.validate()
    log = world.quiet(log)
    backend: Backend = get_backend(cfg.backend)
    state = RunState()
    if cfg.resume:
        _, state = read_run(cfg.resume)
        if state.epoch >= cfg.epochs:
            raise ConfigError(f"--resume {cfg.resume} has already trained {state.epoch} epoch(s); "
                              f"pass --epochs N above {state.epoch} (the total to reach)")
    manual_seed(cfg.seed)
    data = load_data(cfg, backend, log)
    model, optimizer, counts = build_model(cfg, backend, data, log, state if cfg.resume else None)
    optimizer = world.prepare(optimizer, model, agreement_record(asdict(cfg), data), log, state.rng_ranks)
    state.counts = {k: counts[k] for k in ("baseline", "total", "trainable", "frozen")}
    output = Path(cfg.output)
    best = cfg.best_output()
    start_epoch = state.epoch
    ranks = {"ranks": world.size} if world.size > 1 else {}

    saved: dict[Path, int] = {}  # folder -> the epoch this run saved there (what a Ctrl-C leaves)

    def checkpoint(epoch: int, accuracy: float, seconds: float) -> None:
        """--save-every-epoch: the folder holds the last epoch (resumable); OUTPUT-best the best test accuracy."""
        state.epoch, state.train_seconds = epoch, state.train_seconds + seconds
        state.rng_ranks = world.random_states  # every epoch (rank 0): the final save below reads it too
        state.accuracies.append(accuracy)
        if cfg.save_every_epoch:
            save_run(model, optimizer, output, {**asdict(cfg), **ranks}, state)
            saved[output] = epoch
            if accuracy > max(state.accuracies[:-1], default=-1.0):
                save_run(model, optimizer, best, {**asdict(cfg), **ranks}, state)
                saved[best] = epoch
                log(f"   Saved epoch {epoch} to {output} (best so far: also {best})")
            else:
                log(f"   Saved epoch {epoch} to {output}")

    batch = f"{world.size} x {cfg.batch_size} = {world.size * cfg.batch_size}" if world.size > 1 else cfg.batch_size
    log(f"\n🚀 Training for {cfg.epochs - start_epoch} epoch(s), batch {batch}, lr {cfg.lr:g}...")
    t0 = time.perf_counter()
    try:
        _, train_time = fit(cfg, model, optimizer, data, backend, log, world, start_epoch, state.losses, checkpoint)
        wall = time.perf_counter() - t0

        if not world.is_main:
            world.finish()
            return None
        if not cfg.save_every_epoch:  # else the last epoch is saved already
            save_run(model, optimizer, output, {**asdict(cfg), **ranks}, state)
        world.finish()
        metrics = report(cfg, backend, counts, state.accuracies, train_time, wall, output,
                         (cfg.epochs - start_epoch) * data.n_train, log)
    except KeyboardInterrupt:
        if saved:  # else nothing was written: the plain interruption says so
            raise Interrupted(_saved_note(saved, output, best, cfg.epochs)) from None
        raise
    except NonFiniteLoss as e:
        if saved:  # "nothing was saved" would be untrue: say what the earlier epochs left (resuming would diverge again)
            note = _saved_note(saved, output, best, cfg.epochs, hint=False)
            raise NonFiniteLoss(str(e).replace("nothing was saved", f"nothing more was saved ({note})")) from None
        raise
    metrics["loss_per_step"] = state.losses
    metrics["steps_per_epoch"] = num_batches(data.n_train, cfg.batch_size * world.size)
    if cfg.resume:
        metrics["resumed_from"] = {"model_dir": cfg.resume, "epoch": start_epoch}
    return metrics


def _saved_note(saved: dict[Path, int], output: Path, best: Path, epochs: int, hint: bool = True) -> str:
    """What a stopped ``--save-every-epoch`` run left: the last epoch it saved, where, and (``hint``) how to go on."""
    last = saved[output]
    note = f"epoch {last} of {epochs} is saved in {output}"
    if saved.get(best) == last:
        note += f" and {best} (the best so far)"
    elif best in saved:
        note += f"; the best so far, epoch {saved[best]}, in {best}"
    return f"{note}; continue with --resume {output} --epochs {epochs}" if hint and last < epochs else note


def report(cfg: TrainConfig, backend: Backend, counts: dict[str, int], accuracies: list[float], train_time: float,
           wall: float, output: Path, seen: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The run's metrics (what ``--json`` writes), and the closing lines of the log."""
    metrics = {
        "method": cfg.method,
        "backend": backend.name,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "test_accuracy": accuracies,
        "final_test_accuracy": accuracies[-1],
        "params": {k: counts[k] for k in ("baseline", "total", "trainable", "frozen")},
        "train_seconds": round(train_time, 3),
        "wall_seconds": round(wall, 3),
        "samples_per_second": round(seen / train_time, 1) if train_time > 0 else None,
        "output": str(output),
    }
    log("\n✅ Training complete!")
    log(f"   Final test accuracy: {accuracies[-1]:.2%}")
    log(f"   Training time: {train_time:.1f} s ({metrics['samples_per_second']:,.0f} samples/s); wall {wall:.1f} s")
    log(f"   Model saved to: {output}")
    return metrics
