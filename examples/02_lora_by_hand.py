"""LoRA by hand on a toy regression, with nothing but the engine's public API.

Run: python examples/02_lora_by_hand.py

A "pretrained" layer W0 (16 -> 12) is frozen. The new task's true map is W0 plus a rank-2 change. We learn
that change as s * B @ A with A (r x in) and B (out x r), B starting at zero, and train only A and B:

    y = x @ W0^T + s * (x @ A^T) @ B^T

Then we check what LoRA promises: the frozen weight never got a gradient and did not move, the learned
update has rank <= r, and the library's LoRALinear computes exactly the same function.
"""

from __future__ import annotations

import numpy as np

import minitorch_peft as mt
from minitorch_peft.nn import Linear
from minitorch_peft.peft import LoRALinear

IN, OUT, R, ALPHA = 16, 12, 2, 4.0


def make_task(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((OUT, IN)) / np.sqrt(IN)
    delta = 0.5 * rng.standard_normal((OUT, 2)) @ rng.standard_normal((2, IN)) / np.sqrt(IN)  # rank 2
    x = rng.standard_normal((256, IN))
    return w0, x, x @ (w0 + delta).T


def main(steps: int = 400) -> dict[str, float]:
    w0, x_np, y_np = make_task()
    W0 = mt.tensor(w0)                                    # frozen: requires_grad=False (float64 here)
    rng = np.random.default_rng(1)
    A = mt.tensor(rng.uniform(-1, 1, (R, IN)) / np.sqrt(IN), requires_grad=True)
    B = mt.tensor(np.zeros((OUT, R)), requires_grad=True)  # zero: the model starts as the pretrained one
    s = ALPHA / R
    x, y = mt.tensor(x_np), mt.tensor(y_np)

    def model(inp: mt.Tensor) -> mt.Tensor:
        return inp @ W0.T + ((inp @ A.T) @ B.T) * s      # the update B @ A (OUT x IN) is never formed

    optimizer = mt.optim.Adam([A, B], lr=0.02)
    first = None
    for step in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        if step % 100 == 0:
            print(f"step {step:3d}  mse {loss.item():.2e}")
    final = ((model(x) - y) ** 2).mean().item()
    print(f"mse {first:.2e} -> {final:.2e}")

    # what LoRA promises
    assert W0.grad is None and np.array_equal(W0.numpy(), w0), "the frozen weight got a gradient or moved"
    update = s * B.numpy() @ A.numpy()
    singular = np.linalg.svd(update, compute_uv=False)
    print(f"the learned update s*B@A: rank {np.linalg.matrix_rank(update)} (r = {R}); "
          f"largest singular values {np.round(singular[:3], 4)}")
    print(f"W0 has no gradient: {W0.grad is None}; trained values: {A.size + B.size} of {W0.size + A.size + B.size}")

    # the library's layer is the same function
    layer = LoRALinear.from_linear(Linear(IN, OUT, bias=False, dtype=np.float64), r=R, alpha=ALPHA)
    layer.weight.data[...] = w0
    layer.lora_A["default"].data[...] = A.numpy()
    layer.lora_B["default"].data[...] = B.numpy()
    same = np.allclose(layer(x).numpy(), model(x).numpy(), rtol=1e-12, atol=1e-12)
    print(f"LoRALinear gives the same outputs: {same}")
    assert same and final < first / 100
    return {"first": first, "final": final}


if __name__ == "__main__":
    main()
