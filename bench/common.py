"""Helpers for the benchmark scripts: machine description and BENCHMARKS.md section updates.

Each benchmark script prints its figures and replaces its own section of BENCHMARKS.md, delimited by
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; other sections are left as they are.
"""

from __future__ import annotations

import os
import platform
import re
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def update_section(name: str, markdown: str, path: str = BENCHMARKS) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = f"{start}\n_Measured {stamp} on {machine()}._\n\n{markdown.strip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
