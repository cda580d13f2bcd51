"""``bench --epoch``: one epoch of the real ``cli.py train`` loop over all 60,000 MNIST images, against the
same recipe in PyTorch.

Ours is ``minitorch_peft.train.train`` itself (epochs=1), read from its own ``train_seconds``, which times
only the training loop: the data loading, the evaluations and the save around it are excluded. PyTorch
runs the same recipe: the same starting weights, the same shuffled batches (``iterate_batches`` with the
same seed), cross-entropy, Adam(lr=1e-3), the loss summed on the device as our loop does, evaluation
excluded. The two alternate, round by round, each in its own worker process (``worker``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from typing import Any

from .timing import Stats, ratio, ratio_quartiles

METHODS = ("lora", "full")

#: Rounds of each epoch (each method, each runtime). An epoch's time on a shared 2-core machine swings by a
#: third from round to round (one quiet run: ours 1.22-1.94 s for LoRA, PyTorch 2.12-3.54 s); the reported
#: ratio is the median of the per-round ratios, and with 3 rounds that is one round's ratio. 5 rounds cost
#: about 20 s more than 3.
ROUNDS = 5


def bench_epoch(cfg: Any, ours: Any, theirs: Any | None, tmp: str, n_samples: int | None) -> dict[str, Any]:
    """Alternate one epoch of ours (in the ``ours`` worker) and PyTorch's (in ``theirs``), round by round."""
    from ..train import TrainConfig

    rounds = 1 if cfg.quick else ROUNDS
    base = TrainConfig(backend=cfg.backend, epochs=1, batch_size=cfg.batch_size, data_dir=cfg.data_dir)
    cases: dict[str, Any] = {}
    for method in METHODS:
        cases[f"ours:{method}"] = (lambda method=method: ours.call(
            "epoch", method=method, batch_size=base.batch_size, data_dir=base.data_dir))
        if theirs is not None:
            spec = os.path.join(tmp, f"epoch_{method}.npz")
            ours.call("epoch_spec", method=method, seed=base.seed, path=spec)  # the weights train() starts from
            cases[f"torch:{method}"] = (lambda method=method, spec=spec: theirs.call(
                "epoch", method=method, spec=spec, batch_size=base.batch_size, seed=base.seed, lr=base.lr,
                data_dir=base.data_dir))
    samples: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(0.2)  # let the previous run's BLAS / OpenMP workers go idle (see timing.interleaved_blocks)
            samples[name].append(float(cases[name]()))
    res: dict[str, Any] = {"samples": n_samples, "batch_size": base.batch_size, "lr": base.lr, "seed": base.seed,
                           "rounds": rounds, "methods": {}}
    for method in METHODS:
        mine = Stats.of(samples[f"ours:{method}"])
        entry: dict[str, Any] = {"ours_s": mine.to_dict(), "ours_rounds": [round(v, 4) for v in mine.rounds]}
        if theirs is not None:
            other = Stats.of(samples[f"torch:{method}"])
            entry["torch_s"] = other.to_dict()
            entry["torch_rounds"] = [round(v, 4) for v in other.rounds]
            entry["ratio"] = round(ratio(mine, other), 4)  # median of the per-round ratios
            q = ratio_quartiles(mine, other)
            entry["ratio_quartiles"] = None if q is None else [round(q[0], 4), round(q[1], 4)]
        res["methods"][method] = entry
    return res


# ------------------------------------------------------------------------------------ in the workers


def ours_epoch(backend: str, method: str, batch_size: int, data_dir: str | None) -> float:
    """Seconds of training loop in one real epoch of ``train`` (its own clock, evaluation excluded)."""
    from ..train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="minitorch_peft_bench_") as tmp:
        cfg = TrainConfig(backend=backend, method=method, epochs=1, batch_size=batch_size, data_dir=data_dir,
                          output=f"{tmp}/model")
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch progress line
            metrics = train(cfg, log=lambda _line: None)
    return float(metrics["train_seconds"])


def write_start_weights(method: str, seed: int, path: str) -> None:
    """The weights ``train`` starts from for (method, seed), written for the PyTorch worker to read."""
    from ..nn.layers import MLP
    from ..peft.model import inject_adapters
    from ..random import manual_seed
    from ..train import DIMS, TrainConfig
    from .torch_ref import model_spec, save_spec

    manual_seed(seed)  # the model train() builds for this seed
    model = MLP(DIMS)
    if method == "lora":
        inject_adapters(model, TrainConfig(seed=seed).lora_config())
    save_spec(model_spec(model), path)


def torch_epoch(spec_path: str, method: str, batch_size: int, seed: int, lr: float, data_dir: str | None,
                device: str) -> float:
    """Seconds of the same epoch in PyTorch: same weights at the start, same batches, same Adam."""
    import numpy as np

    from ..data import epoch_permutation, load_mnist_like
    from . import torch_ref

    torch = torch_ref.import_torch()
    x, y = load_mnist_like("mnist", "train", data_dir)
    model, optimizer = torch_ref.build_model(torch_ref.load_spec(spec_path), method, device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    ce = torch.nn.functional.cross_entropy
    xt, yt = torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device)  # writable copies
    order = torch.from_numpy(epoch_permutation(len(y), seed, 0)).to(device)
    model.train()
    sync = torch_ref.sync_for(device)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        loss = ce(model(xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    float(loss_sum)  # as our loop: one host read of the summed loss at the end of the epoch
    if sync is not None:
        sync()
    return time.perf_counter() - t0
