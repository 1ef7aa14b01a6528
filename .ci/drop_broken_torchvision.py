"""Remove a torchvision that cannot be imported beside the installed torch.

BackPACK (backpack-for-pytorch) lists torchvision as a dependency but uses it only in its
examples. On a machine whose torch is a CPU build (constraints.txt pins torch 2.13.0, which
the dev machines carry as a CPU wheel), pip pairs it with PyPI's CUDA torchvision, whose
compiled operators do not load ("operator torchvision::nms does not exist"). Nothing in
dualhess imports torchvision, but torchmetrics, and through it PyTorch Lightning, import it
whenever its metadata says it is installed, so a broken torchvision breaks
``import lightning``. This script, run by ``make`` after installing, imports torchvision in a
subprocess and uninstalls it only if that import fails. A working torchvision is left alone.

Usage: python .ci/drop_broken_torchvision.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def main() -> int:
    if importlib.util.find_spec("torchvision") is None:
        return 0
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return 0
    last_line = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
    print(
        f"torchvision does not import beside this torch ({last_line}); uninstalling it "
        "(BackPACK needs it only for its examples, and Lightning cannot import while a "
        "broken torchvision is installed)."
    )
    return subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"]
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
