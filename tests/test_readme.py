"""The README's "Use it from Python" section is code that runs: its python blocks are executed here, in order."""

from __future__ import annotations

import re

import pytest

from conftest import DATA, ROOT, needs_mnist


def python_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python block under '## {heading}'"
    return "\n".join(blocks)


@needs_mnist
@pytest.mark.slow
def test_use_it_from_python_runs(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the section writes base-model/ and my-adapter/ where it runs
    monkeypatch.setenv("MINITORCH_PEFT_DATA", str(DATA))
    namespace: dict = {}
    exec(compile(python_section("Use it from Python"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"trainable params: 18,640 \|\| all params: 554,458 \|\| trainable%: 3\.3618", out), out
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file() and (tmp_path / "my-adapter" / "adapter_model.npz").is_file()
    assert not (tmp_path / "my-adapter" / "base.npz").exists()  # adapters only
    # fine-tuning helped, and the saved, reloaded, merged model scores what the trained one did
    assert namespace["accuracy"] > namespace["base_accuracy"] + 0.3
    assert namespace["merged_accuracy"] == pytest.approx(namespace["accuracy"], abs=2e-4)
