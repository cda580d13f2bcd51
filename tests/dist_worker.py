"""Twenty training steps of a tiny MLP, on one process or as one rank of an MPI job (the equality tests).

``python tests/dist_worker.py OUT_DIR`` under ``mpiexec -n N`` trains every (method, dtype) case with batch
``B`` per rank through ``World.shard`` and ``DistributedOptimizer``; rank 0 writes each case's final weights to
``OUT_DIR/<method>-<dtype>.npz``. ``reference(method, dtype, batch)`` trains the same case in this process
with the plain loop and the plain Adam, batch ``N x B``: the weights must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minitorch_peft.backend import get_backend  # noqa: E402
from minitorch_peft.data import iterate_batches  # noqa: E402
from minitorch_peft.nn.layers import MLP  # noqa: E402
from minitorch_peft.optim import Adam  # noqa: E402
from minitorch_peft.peft.config import LoraConfig  # noqa: E402
from minitorch_peft.peft.model import inject_adapters  # noqa: E402
from minitorch_peft.random import manual_seed  # noqa: E402
from minitorch_peft.tensor import Tensor  # noqa: E402
from minitorch_peft.train import train_epoch  # noqa: E402

DIMS = [20, 16, 12, 4]
METHODS = ("lora", "dora", "full")
DTYPES = ("float64", "float32")
BATCH = 8                      # per rank
GLOBAL = 2 * BATCH             # the one-process batch it must match
N_SAMPLES = 19 * GLOBAL + 5    # 20 steps; the last global batch holds 5 samples (shards of 3 and 2)
SEED = 3


def setup(method: str, dtype: str) -> tuple[MLP, Adam, np.ndarray, np.ndarray]:
    """The seeded model for ``method`` with its Adam, and the seeded data (labels learnable from x)."""
    manual_seed(SEED)
    model = MLP(DIMS, dtype=np.dtype(dtype))
    if method == "full":
        model.unfreeze()
    else:
        inject_adapters(model, LoraConfig(r=4, lora_alpha=8, use_dora=method == "dora", target_modules="all-linear"))
        rng = np.random.default_rng(SEED + 1)  # B starts at zero; make it non-zero so every path carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data[...] = rng.normal(0.0, 0.1, p.shape).astype(dtype)
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((N_SAMPLES, DIMS[0])).astype(dtype)
    y = (np.abs(x[:, :DIMS[-1]]).argmax(axis=1)).astype(np.int64)
    optimizer = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, x, y


def batches(x: np.ndarray, y: np.ndarray, batch: int) -> Any:
    be = get_backend("numpy")
    for xb, yb in iterate_batches(x, y, batch, shuffle=True, seed=SEED, epoch=0):
        yield Tensor._make(xb, be, False), Tensor._make(yb, be, False)


def weights(model: MLP) -> dict[str, np.ndarray]:
    return {n: np.array(p.data) for n, p in model.named_parameters()}


def reference(method: str, dtype: str, batch: int = GLOBAL) -> dict[str, np.ndarray]:
    model, optimizer, x, y = setup(method, dtype)
    train_epoch(model, optimizer, batches(x, y, batch))
    return weights(model)


def main(out: Path) -> None:
    from minitorch_peft.distributed import DistributedOptimizer, World

    world = World.start(timeout=60)
    for method in METHODS:
        for dtype in DTYPES:
            model, optimizer, x, y = setup(method, dtype)
            dist = DistributedOptimizer(optimizer, world)
            steps = sum(1 for _ in train_epoch_steps(model, dist, world.shard(batches(x, y, BATCH * world.size))))
            if world.is_main:
                np.savez(out / f"{method}-{dtype}.npz", steps=steps, nbytes=dist.nbytes, **weights(model))
    world.finish()


def train_epoch_steps(model: MLP, optimizer: Any, sharded: Any) -> Any:
    """``train_epoch`` (the real five-line loop), yielding once per step taken."""
    count = []
    train_epoch(model, optimizer, sharded, on_step=lambda i, loss: count.append(i))
    yield from count


if __name__ == "__main__":
    main(Path(sys.argv[1]))
