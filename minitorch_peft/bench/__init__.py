"""``cli.py bench``: LoRA and its family against full fine-tuning (and PyTorch), every figure measured.

``timing`` runs interleaved rounds; ``variants`` builds our models and measures them; ``numpy_ref`` is the
same step written by hand; ``torch_ref`` the same models in PyTorch (optional); ``epoch`` one real training
epoch; ``report`` prints (and plots) the results; ``runner`` ties it together.
"""

from .runner import BenchConfig, run

__all__ = ["BenchConfig", "run"]
