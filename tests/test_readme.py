"""The README's Quick start for the layers runs as written (on the CPU here, on a GPU where there
is one): a newcomer's first copy-paste must work."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_layers_quick_start_runs_as_written():
    layers = [block for block in python_blocks() if "GateLinearWithLoRA(" in block]
    assert len(layers) == 1, "expected one Quick start block for the layers"
    namespace = {}
    exec(compile(layers[0], "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    weights, ids = namespace["weights"], namespace["ids"]
    assert ids.shape == (4, 4) and weights.shape == (4, 4)
    assert namespace["logits"].shape == (4, 32)
