"""Issue 11's cases run through the real command line, as a user meets them: exit code, traceback, message, data lost.

    python scripts/hardening_table.py [TREE]

TREE is a checkout to run (default: this one); running it on an older checkout shows the defects.
Needs MNIST ($MINITORCH_PEFT_DATA). Prints one Markdown row per case.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
TREE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE
TINY = ["--limit", "256", "--epochs", "1"]


def cli(*args: str, env: dict[str, str] | None = None, interrupt_after: float | None = None) -> tuple[int, str, str]:
    full = {**os.environ, "PYTHONPATH": str(TREE), **(env or {})}
    p = subprocess.Popen([sys.executable, str(TREE / "cli.py"), *args], cwd=TREE, env=full, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if interrupt_after is not None:
        time.sleep(interrupt_after)
        p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=900)
    return p.returncode, out, err


def row(case: str, result: tuple[int, str, str], lost: str) -> None:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    message = lines[-1] if lines else "(none)"
    print(f"| {case} | {code} | {'yes' if 'Traceback' in err else 'no'} | {message[:150].replace('|', '/')} | {lost} |", flush=True)


def model(path: Path, adapters: bool = True) -> Path:
    sys.path.insert(0, str(HERE))
    from minitorch_peft.checkpoint import save_model
    from minitorch_peft.nn.layers import MLP
    from minitorch_peft.peft import LoraConfig, inject_adapters

    m = MLP([784, 512, 256, 10])
    if adapters:
        inject_adapters(m, LoraConfig(r=4))
    return save_model(m, path)


def edit_config(folder: Path, change) -> None:
    c = json.loads((folder / "config.json").read_text())
    change(c)
    (folder / "config.json").write_text(json.dumps(c))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="h11-table-"))
    print("| case | exit | traceback | message (last stderr line) | data lost |")
    print("|---|---|---|---|---|")
    # 1
    d = tmp / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    r = cli("train", *TINY, "--output", str(d))
    row("1 train --output <folder with notes.txt>", r, "yes (notes.txt gone)" if not (d / "notes.txt").exists() else "no")
    # 2
    m = model(tmp / "m2")
    before = (m / "adapters.npz").read_bytes()
    for flags in (["--lr", "inf"], ["--method", "lora-plus", "--loraplus-ratio", "inf"], ["--lr", "1e30"]):
        r = cli("train", *flags, *TINY, "--output", str(m))
        changed = (m / "adapters.npz").read_bytes() != before
        row(f"2 train {' '.join(flags)} over a model", r, "yes (model replaced)" if changed else "no")
        before = (m / "adapters.npz").read_bytes()
    # 3
    m = model(tmp / "m3")
    with np.load(m / "base.npz") as z:
        a = dict(z)
    a["fc1.weight"][0, 0] = np.nan
    np.savez(m / "base.npz", **a)
    row("3 infer, base.npz fc1.weight[0,0]=nan", cli("infer", "--model-dir", str(m)), "no")
    # 4
    r = cli("train", "--adapter-name", "", *TINY, "--output", str(tmp / "m4"))
    row("4 train --adapter-name ''", r, "no")
    if (tmp / "m4").exists():
        row("4 infer on that folder", cli("infer", "--model-dir", str(tmp / "m4")), "no")
    # 5
    for label, change in (("dims [784, 10**12, 10]", lambda c: c["architecture"].__setitem__("dims", [784, 10**12, 10])),
                          ("use_rslora: 'no'", lambda c: c["adapters"]["default"].__setitem__("use_rslora", "no")),
                          ("lora_dropout: 'x' (10: leaks internals?)", lambda c: c["adapters"]["default"].__setitem__("lora_dropout", "x"))):
        m = model(tmp / "m5")
        edit_config(m, change)
        row(f"5 infer, config {label}", cli("infer", "--model-dir", str(m)), "no")
    if TREE == HERE:  # on the old code this one allocates 18 GB for 45 s
        m = model(tmp / "m5")
        edit_config(m, lambda c: c["architecture"].__setitem__("dims", [784, 2000000, 10]))
        t0 = time.perf_counter()
        r = cli("infer", "--model-dir", str(m))
        row(f"5 infer, config dims [784, 2000000, 10] ({time.perf_counter() - t0:.1f} s incl. start)", r, "no")
    m = model(tmp / "m5")
    (m / "config.json").write_text("[" * 100000 + "]" * 100000)
    row("5 infer, config.json nested 100,000 deep", cli("infer", "--model-dir", str(m)), "no")
    # 7
    (tmp / "afile").write_text("x")
    t0 = time.perf_counter()
    r = cli("train", *TINY, "--output", str(tmp / "afile" / "sub"))
    row(f"7 train --output afile/sub ({time.perf_counter() - t0:.1f} s)", r, "no")
    # 8
    sys.path.insert(0, str(HERE))
    from minitorch_peft.checkpoint import load_model
    from minitorch_peft.peft import save_peft

    src, _ = load_model(model(tmp / "m8"))
    for label, change in (("r 8 vs tensors' 4", {"r": 8}), ("layers_to_transform [0]", {"layers_to_transform": [0]})):
        hf = save_peft(src, tmp / f"hf-{label[:5]}")
        c = json.loads((hf / "adapter_config.json").read_text())
        c.update(change)
        (hf / "adapter_config.json").write_text(json.dumps(c))
        row(f"8 import-peft, {label}", cli("import-peft", "--base", str(model(tmp / "b8", False)), "--peft", str(hf),
                                           "--output", str(tmp / "o8")), "no")
    import safetensors.numpy as st

    hf = save_peft(src, tmp / "hf-nan")
    t = st.load_file(str(hf / "adapter_model.safetensors"))
    t["base_model.model.fc1.lora_A.weight"][0, 0] = np.nan
    st.save_file(t, str(hf / "adapter_model.safetensors"))
    row("8 import-peft, NaN tensor", cli("import-peft", "--base", str(model(tmp / "b8", False)), "--peft", str(hf),
                                          "--output", str(tmp / "o8n")), "no")
    # 9
    data = Path(os.environ.get("MINITORCH_PEFT_DATA", HERE.parent / "shared" / "data"))
    dd = tmp / "data" / "mnist"
    dd.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = comp.compress(header + bytes(7840000))
    for _ in range(1000):
        body += comp.compress(bytes(1 << 20))
    (dd / "t10k-images-idx3-ubyte.gz").write_bytes(body + comp.flush())
    (dd / "t10k-labels-idx1-ubyte.gz").write_bytes((data / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    m = model(tmp / "m9")
    r = cli("infer", "--model-dir", str(m), "--data-dir", str(tmp / "data"))
    row(f"9 infer, gzip bomb test images ({len(body) // 1000} kB -> 1 GB)", r, "no")
    raw = bytearray(gzip.decompress((data / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (dd / "t10k-labels-idx1-ubyte.gz").unlink()
    (dd / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    (dd / "t10k-images-idx3-ubyte.gz").write_bytes((data / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    row("9 infer, one label byte changed in an unpacked canonical file", cli("infer", "--model-dir", str(m), "--data-dir", str(tmp / "data"),
                                                                            env={"XDG_CACHE_HOME": str(tmp / "xdg")}), "no")
    # 10
    r = cli("train", "--seed", "-1", *TINY, "--output", str(tmp / "m10"))
    row(f"10 train --seed -1 (stdout before the error: {len(r[1].splitlines())} lines)", r, "no")
    m = model(tmp / "m10b")
    before = (m / "adapters.npz").read_bytes()
    r = cli("train", "--limit", "20000", "--epochs", "3", "--output", str(m), interrupt_after=12)
    row("10 Ctrl-C during train over a model", r, "yes" if (m / "adapters.npz").read_bytes() != before else "no")
    row("10 export-peft of a plain model", cli("export-peft", "--model-dir", str(model(tmp / "p10", False)), "--output", str(tmp / "hf10")), "no")


if __name__ == "__main__":
    main()
