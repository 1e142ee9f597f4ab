"""What a user installs: the licence travels with the package, and the `sandbox` extra gives the code
interpreter's kernel the data stack that examples, the README and the models' training assume."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from sandbox import KernelSandbox

ROOT = Path(__file__).resolve().parents[1]
DATA_STACK = ("numpy", "pandas", "matplotlib")


def _extra(name: str) -> set[str]:
    requirements = importlib.metadata.requires("functionary-agent") or []
    marker = f'extra == "{name}"'
    return {re.split(r"[<>=;\[ ]", req, maxsplit=1)[0].lower() for req in requirements if marker in req}


def test_the_package_ships_its_mit_licence() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in licence
    assert "LICENSE" in (importlib.metadata.metadata("functionary-agent").get_all("License-File") or [])


def test_the_sandbox_extra_installs_the_data_stack() -> None:
    assert {"jupyter-client", "ipykernel", *DATA_STACK} <= _extra("sandbox")


def test_a_first_plot_works_in_the_kernel() -> None:
    code = (
        "import numpy as np, pandas as pd, matplotlib.pyplot as plt\n"
        "frame = pd.DataFrame({'x': np.arange(5), 'y': np.arange(5) ** 2})\n"
        "frame.plot(x='x', y='y')\nplt.show()\nint(frame.y.sum())"
    )
    with KernelSandbox(timeout=60) as box:
        result = box.execute(code)
    assert result.ok and result.result == "30", result.to_model_text()
    assert len(result.images) == 1 and result.images[0].suffix == ".png"
