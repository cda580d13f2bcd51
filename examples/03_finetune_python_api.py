"""Fine-tuning through the Python API: build, pretrain, adapt, train, save, load, merge.

Run: python examples/03_finetune_python_api.py [OUTPUT_DIR]     (default: a temporary folder)

A small MLP is pretrained on task A (synthetic clusters, so the script needs no download), saved, then
adapted with LoRA to task B (the same classes, moved), with the base frozen. The adapter alone is saved
(a few KB) and loaded onto a fresh copy of the base; finally the adapter is merged into plain Linear
layers, saved as an ordinary model and loaded back. Every step checks that the outputs are unchanged.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import minitorch_peft as mt
from minitorch_peft import functional as F
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.nn import MLP
from minitorch_peft.peft import (LoraConfig, count_parameters, inject_adapters, load_adapters, merge_and_unload,
                                 save_adapters)

DIMS = [20, 64, 4]


def task(shift: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 Gaussian clusters in 20 dimensions; ``shift`` moves every centre (task B = task A, moved)."""
    centres = np.random.default_rng(123).standard_normal((4, DIMS[0])) * 0.6
    centres = centres + shift * np.random.default_rng(7).standard_normal((4, DIMS[0]))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = centres[y] + rng.standard_normal((n, DIMS[0]))
    return x.astype(np.float32), y


def train(model: MLP, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    optimizer = mt.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for epoch in range(epochs):
        for i in range(0, len(y), 64):
            loss = F.cross_entropy(model(mt.tensor(x[i:i + 64])), y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with mt.no_grad():
        return float((model(mt.tensor(x)).numpy().argmax(axis=1) == y).mean())


def outputs(model: MLP, x: np.ndarray) -> np.ndarray:
    with mt.no_grad():
        return model(mt.tensor(x)).numpy()


def main(out: Path) -> dict[str, float]:
    xa, ya = task(0.0, 2000, seed=0)
    xb, yb = task(1.5, 2000, seed=1)
    xb_test, yb_test = task(1.5, 1000, seed=2)

    # 1. build and pretrain on task A, then save the base
    mt.manual_seed(0)
    model = MLP(DIMS)
    train(model, xa, ya, epochs=3, lr=1e-2)
    save_model(model, out / "base")
    before = accuracy(model, xb_test, yb_test)
    print(f"pretrained on task A; accuracy on task B before fine-tuning: {before:.1%}")

    # 2. adapt: LoRA on every Linear, base frozen; train on task B
    inject_adapters(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    counts = count_parameters(model)
    print(f"LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    train(model, xb, yb, epochs=3, lr=1e-2)
    after = accuracy(model, xb_test, yb_test)
    print(f"after LoRA fine-tuning on task B: {after:.1%}")
    expected = outputs(model, xb_test)

    # 3. save the adapter alone, load it onto a fresh copy of the base
    save_adapters(model, out / "adapter")
    size = sum(f.stat().st_size for f in (out / "adapter").iterdir())
    base, _ = load_model(out / "base")
    print(f"adapter folder: {size:,} bytes; loaded: {load_adapters(base, out / 'adapter')}")
    assert np.allclose(outputs(base, xb_test), expected, rtol=1e-6, atol=1e-6)

    # 4. merge into plain Linear layers, save as an ordinary model, load it back
    merged = merge_and_unload(model)
    save_model(merged, out / "merged")
    reloaded, _ = load_model(out / "merged")
    kinds = sorted({type(m).__name__ for _, m in reloaded.named_modules() if _})
    print(f"merged model: {reloaded.num_parameters():,} parameters, layers {kinds}")
    assert np.allclose(outputs(reloaded, xb_test), expected, rtol=1e-5, atol=1e-5)
    print("the adapter loaded on the base and the merged model both give the fine-tuned outputs")
    assert after > before + 0.1, (before, after)
    return {"before": before, "after": after}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
