"""The main job: fine-tune an MLP on MNIST-like data with a PEFT method, evaluate, save.

``METHODS`` maps a method name to a function that prepares a model in place and returns the optimizer's
parameter groups; everything else (data, loop, evaluation, metrics) is shared by all methods.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import functional as F
from .backend import Backend, get_backend
from .checkpoint import load_model, save_model
from .errors import ConfigError
from .data import iterate_batches, load_mnist_like, num_batches
from .distributed import Solo, World, agreement_record
from .nn.layers import MLP
from .optim import Adam
from .peft.config import AdapterError, LoraConfig
from .peft.loraplus import loraplus_param_groups
from .peft.model import add_adapter, count_parameters, inject_adapters, list_adapters, lora_layers, set_adapter
from .peft.qlora import base_weight_nbytes, quantized_layers
from .random import manual_seed
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

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the flag."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("epochs", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.method in QUANTIZED_METHODS:
            from .backend import QUANT_TYPES, check_block_size

            if self.quant not in QUANT_TYPES:
                raise ConfigError(f"--quant {self.quant!r} is not supported; use one of: {', '.join(QUANT_TYPES)}")
            try:
                check_block_size(self.block_size)
            except ValueError:
                raise ConfigError(f"--block-size must be a power of two from 32 to 4096, got {self.block_size!r}") from None
        if self.method not in ("full", "head"):
            config = self.lora_config()  # rank, alpha, dropout, targets: checked before any data is read
            if not self.loraplus_ratio > 0:
                raise ConfigError(f"--loraplus-ratio must be > 0, got {self.loraplus_ratio}")
            if self.base is None:  # the default flow's MLP: targets and rank can be checked now
                shapes = {f"fc{i + 1}": (n_in, n_out) for i, (n_in, n_out) in enumerate(zip(DIMS[:-1], DIMS[1:]))}
                for target in self.targets:
                    if target not in shapes:
                        raise AdapterError(f"target module {target!r} matches no Linear module; available: {', '.join(shapes)}")
                    config.check_fits(target, *shapes[target])
        get_backend(self.backend)

    def lora_config(self, **overrides: Any) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, use_rslora=self.rslora,
                          target_modules=list(self.targets), **overrides)


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
    per ``cfg.quant`` / ``double_quant`` / ``block_size``); on a model that already has adapters (``--base``
    a folder saved by an adapter run) it is added beside them, and they stay frozen: that is how one
    folder comes to hold several named adapters for ``cli.py merge``.
    """
    if next(lora_layers(model), None) is None:
        quant = dict(quantize=cfg.quant, double_quant=cfg.double_quant, block_size=cfg.block_size) if quantize else {}
        inject_adapters(model, config, adapter_name=cfg.adapter_name, **quant)
        return
    if quantize and not any(hasattr(layer, "quant_config") for _, layer in lora_layers(model)):
        raise AdapterError(
            f"--base {cfg.base} holds adapters on a full-precision base ({', '.join(list_adapters(model))}); "
            f"--method {cfg.method} needs a plain model (or one saved by a qlora/qdora run): fold them in first "
            "(cli.py merge --unload)"
        )
    if cfg.adapter_name in list_adapters(model):
        raise AdapterError(
            f"--base already has an adapter named {cfg.adapter_name!r} ({', '.join(list_adapters(model))}); "
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


class Progress:
    """One line per epoch, redrawn in place on a terminal: bar, running loss, samples/s."""

    def __init__(self, label: str, total: int, stream: Any = None) -> None:
        self.label, self.total, self.stream = label, total, stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, samples: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and (not self.tty or now - self.last < 0.2):
            return
        self.last = now
        width = 30
        filled = int(width * done / self.total)
        rate = samples / max(now - self.start, 1e-9)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  loss {loss:.4f}  {rate:,.0f} samples/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


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


def build_model(cfg: TrainConfig, backend: Backend, data: Data,
                log: Callable[[str], None] = print) -> tuple[MLP, Adam, dict[str, int]]:
    """The model (new, or ``--base``) prepared for ``cfg.method``, its optimizer and its parameter counts."""
    if cfg.base:
        log(f"📊 Loading base model from {cfg.base}...")
        model, _ = load_model(cfg.base)
        if next(lora_layers(model), None) is not None and cfg.method in ("full", "head"):
            raise AdapterError(
                f"--base {cfg.base} holds adapters ({', '.join(list_adapters(model))}); --method {cfg.method} needs a plain "
                "model: fold them in first (cli.py merge --unload) or train another adapter with --adapter-name"
            )
        n_in = int(data.x_train.shape[1])
        if model.dims[0] != n_in or model.dims[-1] != 10:
            raise AdapterError(
                f"--base {cfg.base} has shape {' -> '.join(map(str, model.dims))}; this data needs {n_in} -> ... -> 10"
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
                on_step: Callable[[int, Any], None] | None = None) -> Any:
    """One pass over ``batches``; returns the summed loss as a device scalar (no host sync per step)."""
    loss_sum = None
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)  # forward: builds the graph
        optimizer.zero_grad()
        loss.backward()                       # backward: fills .grad of the trainable tensors only
        optimizer.step()                      # update: Adam on the trainable tensors
        loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
        if on_step is not None:
            on_step(i, loss_sum)
    return loss_sum


def tensor_batches(data: Data, backend: Backend, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The epoch's shuffled batches as constant tensors (the permutation is seeded by ``seed`` and ``epoch``)."""
    for xb, yb in iterate_batches(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, epoch=epoch):
        yield Tensor._make(xb, backend, False), Tensor._make(yb, backend, False)


def fit(cfg: TrainConfig, model: MLP, optimizer: Adam, data: Data, backend: Backend,
        log: Callable[[str], None] = print, world: Solo | World = Solo()) -> tuple[list[float], float]:
    """``cfg.epochs`` epochs of ``train_epoch``, each followed by a test-set evaluation.

    Returns the per-epoch test accuracies and the seconds spent training (evaluation excluded). With a
    ``World`` of N ranks, each step takes a global batch of N x ``cfg.batch_size`` and this rank trains on its
    shard of it; only rank 0 evaluates.
    """
    accuracies: list[float] = []
    global_batch = cfg.batch_size * world.size
    steps = num_batches(data.n_train, global_batch)
    model.train()
    train_time = 0.0
    for epoch in range(cfg.epochs):
        bar = Progress(f"Epoch {epoch + 1}/{cfg.epochs}", steps, stream=None if world.is_main else io.StringIO())

        def show(i: int, loss_sum: Any) -> None:
            if bar.tty and (i % 50 == 0 or i == steps - 1):
                bar.update(i + 1, min((i + 1) * global_batch, data.n_train), float(loss_sum) / (i + 1))

        epoch_start = time.perf_counter()
        batches = world.shard(tensor_batches(data, backend, global_batch, cfg.seed, epoch))
        loss_sum = train_epoch(model, optimizer, batches, show)
        running = world.mean(float(loss_sum) / steps if loss_sum is not None else 0.0)
        train_time += time.perf_counter() - epoch_start
        bar.update(steps, data.n_train, running, force=True)
        bar.close()
        if not world.is_main:  # rank 0 evaluates, logs and saves
            continue
        acc = evaluate(model, data.x_test, data.y_test)
        accuracies.append(acc)
        log(f"   Epoch {epoch + 1}: train loss {running:.4f}, test accuracy {acc:.2%}")
    return accuracies, train_time


def train(cfg: TrainConfig, log: Callable[[str], None] = print, world: Solo | World = Solo()) -> dict[str, Any] | None:
    """Run the whole job (load data, build, convert, train, evaluate, save) and return its metrics.

    With a ``World`` (``minitorch_peft.distributed``: data parallel over MPI) every rank runs this; rank 0
    logs, saves and returns the metrics, the other ranks return None.
    """
    cfg.validate()
    log = world.quiet(log)
    backend: Backend = get_backend(cfg.backend)
    manual_seed(cfg.seed)
    data = load_data(cfg, backend, log)
    model, optimizer, counts = build_model(cfg, backend, data, log)
    optimizer = world.prepare(optimizer, model, agreement_record(asdict(cfg), data), log)

    batch = f"{world.size} x {cfg.batch_size} = {world.size * cfg.batch_size}" if world.size > 1 else cfg.batch_size
    log(f"\n🚀 Training for {cfg.epochs} epoch(s), batch {batch}, lr {cfg.lr:g}...")
    t0 = time.perf_counter()
    accuracies, train_time = fit(cfg, model, optimizer, data, backend, log, world)
    wall = time.perf_counter() - t0

    output = Path(cfg.output)
    if not world.is_main:
        world.finish()
        return None
    ranks = {"ranks": world.size} if world.size > 1 else {}
    save_model(model, output, extra={"training": {**asdict(cfg), **ranks, "test_accuracy": accuracies}})
    world.finish()
    return report(cfg, backend, counts, accuracies, train_time, wall, output, cfg.epochs * data.n_train, log)


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
