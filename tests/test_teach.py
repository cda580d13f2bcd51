"""The graph made visible (Tensor.graph, cli.py graph), a training step traced (cli.py trace), cli.py gradcheck."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, cli_main
from minitorch_peft import Function, Tensor, ops
from minitorch_peft import functional as F
from minitorch_peft.peft import LoRAFunction
from minitorch_peft.testing import covered_ops, standard_checks
from minitorch_peft.trace import build_step, trace_step


def lora_loss():
    model, _, x, labels = build_step("lora", batch_size=8)
    return model, x, labels, F.cross_entropy(model(x), labels)


def test_tensor_graph_names_ops_shapes_and_frozen_versus_trainable() -> None:
    model, x, labels, loss = lora_loss()
    names = dict(model.named_parameters(), x=x)
    text = loss.graph(names)
    assert "#6 CrossEntropy -> ()" in text and text.count("LoRAFunction") == 3
    assert "fc1.weight (512, 784) float32 frozen" in text
    assert "fc1.lora_A.default (8, 784) float32 trainable" in text
    assert "x (8, 784) float32 constant" in text
    assert "6 trainable (18,640 values), 6 frozen (535,818 values)" in text
    # the ReLU saves its (8, 512) float32 output: 16,384 bytes, read from the live array
    assert "#2 ReLU -> (8, 512) float32  [saves 16,384 B]" in text


def test_a_shared_node_is_drawn_once_and_a_released_graph_says_so() -> None:
    a = Tensor(np.ones(3), requires_grad=True)
    h = a.exp()
    out = (h * h).sum()
    text = out.graph({"a": a})
    assert text.count("Exp ->") == 1 and "(drawn above)" in text
    out.backward()
    assert "released" in out.graph()


def test_trace_marks_each_gradient_computed_or_skipped_as_backward_runs() -> None:
    model, opt, x, labels = build_step("lora", batch_size=8)
    trace = trace_step(model, x, labels, opt)
    text = trace.text()
    assert sorted(trace.skipped) == sorted(f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    assert trace.skipped_values == 535_818 and trace.computed_values == 18_640
    assert "weight gradients skipped (frozen): 6 of 12" in text
    assert "skipped:  x (data), fc1.weight (frozen), fc1.bias (frozen)" in text
    backward = text.split("backward, in the order it runs")[1]
    assert backward.index("#6  CrossEntropy") < backward.index("#5  LoRAFunction") < backward.index("#1  LoRAFunction")
    for name in trace.computed:  # what the trace says was computed really is on the tensors
        assert dict(model.named_parameters())[name].grad is not None


def test_trace_reports_what_backward_really_returned(monkeypatch) -> None:
    """A backward that computes a gradient nobody asked for (the frozen W) is shown, not hidden."""
    real = LoRAFunction.backward

    def wasteful(ctx, g):
        gx, gw, ga, gb, *rest = real(ctx, g)
        return (gx, np.zeros(ctx.parents[1].shape, dtype=g.dtype), ga, gb, *rest)

    monkeypatch.setattr(LoRAFunction, "backward", staticmethod(wasteful))
    model, opt, x, labels = build_step("lora", batch_size=4)
    text = trace_step(model, x, labels, opt).text()
    assert "dfc1.weight (512, 784) (unused!)" in text


def test_full_fine_tuning_skips_no_weight_gradient() -> None:
    model, opt, x, labels = build_step("full", batch_size=4)
    trace = trace_step(model, x, labels, opt)
    assert trace.skipped == [] and trace.computed_values == 535_818
    assert "weight gradients skipped (frozen): 0 of 6" in trace.text()


@pytest.mark.parametrize("method", ["lora", "full", "qlora", "dora"])
def test_cli_trace(capsys, method) -> None:
    code, out, err = cli_main(capsys, "trace", "--method", method, "--batch-size", "4")
    assert code == 0, err
    assert out.startswith(f"one training step: --method {method}")
    assert "weight gradients skipped (frozen)" in out


def test_cli_graph_writes_dot_and_fails_saying_how_to_render_when_dot_is_absent(capsys, tmp_path, no_dot) -> None:
    result = cli_main(capsys, "graph", "--method", "lora", "--batch-size", "4", "--output", str(tmp_path / "step.svg"))
    # the picture asked for was not made: a failing status and one line saying where the DOT source is
    assert_one_line_error(result, "`dot` program was not found", f"dot -Tsvg {tmp_path / 'step.dot'}")
    dot = (tmp_path / "step.dot").read_text()
    assert not (tmp_path / "step.svg").exists()
    assert dot.startswith("digraph step {") and dot.rstrip().endswith("}")
    # frozen and trainable leaves are styled differently
    frozen = [line for line in dot.splitlines() if "fc1.weight" in line][0]
    trainable = [line for line in dot.splitlines() if "fc1.lora_A.default" in line][0]
    assert "dashed" in frozen and "frozen" in frozen and "bold" in trainable and "trainable" in trainable


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_cli_graph_dot_output(capsys, tmp_path, method) -> None:
    code, out, err = cli_main(capsys, "graph", "--method", method, "--batch-size", "4", "--output", str(tmp_path / "g.dot"))
    assert code == 0, err
    dot = (tmp_path / "g.dot").read_text()
    assert dot.count("->") > 10
    assert ('style="filled,dashed"' in dot) == (method != "full")  # the frozen leaves' style


def test_cli_graph_text_and_bad_output(capsys) -> None:
    code, out, _ = cli_main(capsys, "graph", "--method", "dora", "--batch-size", "4")
    assert code == 0 and "DoRAFunction" in out and "fc1.lora_magnitude_vector.default (512,) float32 trainable" in out
    assert_one_line_error(cli_main(capsys, "graph", "--output", "step.txt"), "--output", ".dot")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_cli_graph_renders_svg_with_dot(capsys, tmp_path) -> None:
    code, out, err = cli_main(capsys, "graph", "--batch-size", "4", "--output", str(tmp_path / "step.svg"))
    assert code == 0, err
    assert "<svg" in (tmp_path / "step.svg").read_text()


def test_every_op_in_ops_py_has_a_gradcheck() -> None:
    functions = {name for name, obj in vars(ops).items()
                 if isinstance(obj, type) and issubclass(obj, Function) and obj is not Function}
    assert functions and functions <= covered_ops(), functions - covered_ops()


@pytest.mark.slow
def test_cli_gradcheck_passes_with_one_line_per_check(capsys) -> None:
    code, out, err = cli_main(capsys, "gradcheck")
    assert code == 0, err
    lines = [line for line in out.splitlines() if " rel err " in line and " elements, eps " in line]
    assert len(lines) == len(standard_checks()) and all(line.endswith(" ok") for line in lines)
    for layer in ("nn.Linear", "LoRALinear", "DoRA", "QLoRALinear 4-bit", "QDoRA"):
        assert any(line.startswith(layer) for line in lines), layer


@pytest.mark.slow
def test_cli_gradcheck_fails_on_a_wrong_backward(capsys, monkeypatch) -> None:
    monkeypatch.setattr(ops.Exp, "backward", staticmethod(lambda ctx, g: (g * ctx.saved[0] * 1.01,)))
    code, out, err = cli_main(capsys, "gradcheck")
    assert code != 0
    assert [line for line in out.splitlines() if line.endswith("FAIL")][0].startswith("exp")
    assert "MISMATCH: gradient of input 0" in out
    assert_one_line_error((code, out, err), "gradcheck failed for 1 of", "exp")


def test_cli_trace_update_doc_without_markers_is_one_line(capsys, tmp_path, monkeypatch) -> None:
    from minitorch_peft import trace as tr

    page = tmp_path / "02.md"
    page.write_text("# a page without the generated blocks\n")
    monkeypatch.setattr(tr, "DOC_PATH", page)
    assert_one_line_error(cli_main(capsys, "trace", "--update-doc"), "no generated block for --method lora")
    monkeypatch.setattr(tr, "DOC_PATH", tmp_path / "missing.md")
    assert_one_line_error(cli_main(capsys, "trace", "--update-doc"), "missing.md")
