"""Autograd from the ground up: a scalar engine in 30 lines, then the same idea on arrays, then a small MLP.

Run: python examples/01_autograd_from_scratch.py

Part 1 writes reverse-mode autograd for single numbers (as micrograd does): each Value remembers its inputs
and how to push a gradient back to them; backward() visits the nodes in reverse topological order.
Part 2 checks it against minitorch_peft's Tensor, which does the same on whole arrays (tensor.py, ops.py).
Part 3 trains a 2 -> 16 -> 2 MLP on a toy problem with the engine: forward, loss, backward, Adam.
"""

from __future__ import annotations

import math

import numpy as np

import minitorch_peft as mt
from minitorch_peft import functional as F


# ------------------------------------------------------------------------------ part 1: scalars


class Value:
    """A number that records the op that made it, for reverse-mode autograd."""

    def __init__(self, data: float, parents: tuple["Value", ...] = (), local_grads: tuple[float, ...] = ()) -> None:
        self.data, self.grad = data, 0.0
        self.parents, self.local_grads = parents, local_grads  # d(self)/d(parent) for each parent

    def __add__(self, other: "Value") -> "Value":
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def __mul__(self, other: "Value") -> "Value":
        return Value(self.data * other.data, (self, other), (other.data, self.data))

    def tanh(self) -> "Value":
        t = math.tanh(self.data)
        return Value(t, (self,), (1.0 - t * t,))

    def backward(self) -> None:
        order: list[Value] = []
        seen: set[int] = set()

        def visit(v: Value) -> None:  # every node after all of its inputs
            if id(v) not in seen:
                seen.add(id(v))
                for p in v.parents:
                    visit(p)
                order.append(v)

        visit(self)
        self.grad = 1.0
        for v in reversed(order):  # from the output back: each node's gradient is complete when visited
            for p, local in zip(v.parents, v.local_grads):
                p.grad += local * v.grad  # chain rule; += because a value may be used more than once


def part1() -> tuple[float, float, float]:
    a, b = Value(2.0), Value(-3.0)
    out = (a * b + a).tanh()
    out.backward()
    print(f"part 1  out = tanh(a*b + a) = {out.data:.6f};  d/da = {a.grad:.6f}, d/db = {b.grad:.6f}")
    return out.data, a.grad, b.grad


# ------------------------------------------------------------------------------ part 2: arrays


def part2(expected: tuple[float, float, float]) -> None:
    a = mt.tensor([2.0], requires_grad=True, dtype=np.float64)
    b = mt.tensor([-3.0], requires_grad=True, dtype=np.float64)
    z = a * b + a
    out = ((z.exp() - (-z).exp()) / (z.exp() + (-z).exp())).sum()  # tanh from exp, to exercise more ops
    out.backward()
    got = (out.item(), a.grad.item(), b.grad.item())
    assert np.allclose(got, expected, rtol=1e-12), (got, expected)
    print(f"part 2  the engine agrees: out = {got[0]:.6f}, d/da = {got[1]:.6f}, d/db = {got[2]:.6f}")


# ------------------------------------------------------------------------------ part 3: an MLP


def toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in the plane; class 1 inside a ring, class 0 outside: not separable by a line."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, (n, 2)).astype(np.float32)
    y = (np.linalg.norm(x, axis=1) < 1.0).astype(np.int64)
    return x, y


def part3(steps: int = 300) -> float:
    mt.manual_seed(0)
    model = mt.nn.MLP([2, 16, 2])
    optimizer = mt.optim.Adam(model.parameters(), lr=0.05)
    x, y = toy_data(256, seed=0)
    xt = mt.tensor(x)
    for step in range(steps):
        loss = F.cross_entropy(model(xt), y)  # forward: builds the graph
        optimizer.zero_grad()
        loss.backward()                       # backward: fills every parameter's .grad
        optimizer.step()                      # update
        if step % 100 == 0:
            print(f"part 3  step {step:3d}  loss {loss.item():.4f}")
    x_test, y_test = toy_data(512, seed=1)
    with mt.no_grad():
        accuracy = float((model(mt.tensor(x_test)).numpy().argmax(axis=1) == y_test).mean())
    print(f"part 3  test accuracy {accuracy:.1%} (always guessing the larger class: {max(y_test.mean(), 1 - y_test.mean()):.0%})")
    return accuracy


def main() -> None:
    expected = part1()
    part2(expected)
    accuracy = part3()
    assert accuracy > 0.9, f"the MLP did not learn the ring: {accuracy:.1%}"


if __name__ == "__main__":
    main()
