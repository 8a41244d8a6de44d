"""The public API: every listed name resolves, and `import ckptprobe` stays light."""

from __future__ import annotations

import subprocess
import sys

import ckptprobe


def test_every_public_name_resolves():
    for name in ckptprobe.__all__:
        assert getattr(ckptprobe, name) is not None, name
    assert issubclass(ckptprobe.NoMatchingTensorsError, LookupError)
    assert ckptprobe.Kind("safe") == "safe" and ckptprobe.Vectors("freeze") == "freeze"


def test_import_loads_no_heavy_module():
    code = "import sys, ckptprobe; print(sorted(m for m in ('torch', 'matplotlib', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
