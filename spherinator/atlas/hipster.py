"""HiPSter (``astro-hipster``) on spherinator's exports: the config of its ``HiPSGenerator`` for a ``decoder.onnx``.

HiPSter looks its decoder's input up by name, ``x`` by default; spherinator's decoder takes ``z``, so the config
names it (``input_name: z``). Used by the side-by-side benchmark (``tools/bench/bench_versus_hipster.py``) and the
test that HiPSter reads the exports; HiPSter itself is not a dependency (it runs in a venv of its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hipster_config(decoder: str | Path, root: str | Path, max_order: int, name: str = "spherinator") -> dict[str, Any]:
    """The config of ``hipster --config`` that writes the HiPS of ``decoder`` (a ``decoder.onnx``) at orders
    0..``max_order`` into ``root/hips``, its page into ``root``."""
    decoder_args = {"model_path": str(decoder), "input_name": "z"}
    generator = {
        "decoder": {"class_path": "hipster.Inference", "init_args": decoder_args},
        "image_maker": {"class_path": "hipster.ImagePlotter"},
        "max_order": max_order,
        "hips_path": "hips",
        "hips_name": name,
    }
    return {
        "root_path": str(root),
        "html": {"url": "http://localhost:8083", "title": name},
        "tasks": [{"class_path": "hipster.HiPSGenerator", "init_args": generator}],
    }
