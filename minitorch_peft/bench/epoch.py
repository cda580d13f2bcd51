"""``bench --epoch``: one epoch of the real ``cli.py train`` loop over all 60,000 MNIST images, against the
same recipe in PyTorch.

Ours is ``minitorch_peft.train.train`` itself (epochs=1), read from its own ``train_seconds``, which times
only the training loop: the data loading, the evaluations and the save around it are excluded. PyTorch
runs the same recipe: the same starting weights, the same shuffled batches (``iterate_batches`` with the
same seed), cross-entropy, Adam(lr=1e-3), the loss summed on the device as our loop does, evaluation
excluded. The two alternate, round by round.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from typing import Any

from ..backend import Backend
from .timing import Stats, ratio

METHODS = ("lora", "full")


def bench_epoch(cfg: Any, backend: Backend, torch_device: str | None) -> dict[str, Any]:
    from ..data import load_mnist_like
    from ..train import TrainConfig

    rounds = 1 if cfg.quick else 3
    x, y = load_mnist_like("mnist", "train", cfg.data_dir)
    base = TrainConfig(backend=backend.name, epochs=1, batch_size=cfg.batch_size, data_dir=cfg.data_dir)
    cases: dict[str, Any] = {}
    for method in METHODS:
        cases[f"ours:{method}"] = lambda method=method: _ours(base, method)
        if torch_device is not None:
            cases[f"torch:{method}"] = lambda method=method: _torch(base, method, x, y, torch_device)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(0.2)  # let the previous run's BLAS / OpenMP workers go idle (see timing.interleaved)
            samples[name].append(cases[name]())
    res: dict[str, Any] = {"samples": int(len(y)), "batch_size": base.batch_size, "lr": base.lr, "seed": base.seed,
                           "rounds": rounds, "methods": {}}
    for method in METHODS:
        ours = Stats.of(samples[f"ours:{method}"])
        entry: dict[str, Any] = {"ours_s": ours.to_dict()}
        if torch_device is not None:
            theirs = Stats.of(samples[f"torch:{method}"])
            entry["torch_s"] = theirs.to_dict()
            entry["ratio"] = round(ratio(ours, theirs), 4)  # median of the per-round ratios
        res["methods"][method] = entry
    return res


def _ours(base: Any, method: str) -> float:
    """Seconds of training loop in one real epoch of ``train`` (its own clock, evaluation excluded)."""
    from dataclasses import replace

    from ..train import train

    with tempfile.TemporaryDirectory(prefix="minitorch_peft_bench_") as tmp:
        cfg = replace(base, method=method, output=f"{tmp}/model")
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch progress line
            metrics = train(cfg, log=lambda _line: None)
    return float(metrics["train_seconds"])


def _torch(base: Any, method: str, x: Any, y: Any, device: str) -> float:
    """Seconds of the same epoch in PyTorch: same weights at the start, same batches, same Adam."""
    import numpy as np

    from ..data import epoch_permutation
    from ..nn.layers import MLP
    from ..peft.model import inject_adapters
    from ..random import manual_seed
    from . import torch_ref

    torch = torch_ref.import_torch()
    manual_seed(base.seed)  # the model train() builds for this seed
    ours = MLP([784, 512, 256, 10])
    if method == "lora":
        inject_adapters(ours, base.lora_config())
    model, optimizer = torch_ref.build_model(ours, method, device)
    ce = torch.nn.functional.cross_entropy
    xt, yt = torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device)  # writable copies
    order = torch.from_numpy(epoch_permutation(len(y), base.seed, 0)).to(device)
    bs = base.batch_size
    model.train()
    sync = torch_ref.sync_for(device)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(y), bs):
        idx = order[start:start + bs]
        loss = ce(model(xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    float(loss_sum)  # as our loop: one host read of the summed loss at the end of the epoch
    if sync is not None:
        sync()
    return time.perf_counter() - t0
