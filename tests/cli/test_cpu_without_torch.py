"""The CPU analysis path never imports torch (importing it costs ~2 s, more than the analyses of a
small model): spectrum, principal, principal-based masks and the demo, each in a fresh process."""

from __future__ import annotations

import subprocess
import sys

from ckptprobe.analysis.svd import _gpu_possible

# One process runs the commands one after another and reports, after each, whether torch was loaded.
CODE = """
import sys
from ckptprobe.cli import main
from ckptprobe.examples import path

out, base = sys.argv[1], str(path("base"))
commands = {
    "spectrum": ["spectrum", base, str(path("sft")), str(path("rl-1")), "--bounds", "-f", "json", "-o", out + "/s.json"],
    "principal": ["principal", base, str(path("sft")), "-f", "json", "-o", out + "/p.json"],
    "masks safe": ["masks", base, "--kind", "safe", "--vectors", "train", "-o", out + "/safe.safetensors"],
    "masks principal": ["masks", base, "--kind", "principal", "--vectors", "freeze", "-o", out + "/p.safetensors"],
    "demo": ["demo", "-f", "json", "-o", out + "/demo.json"],
}
for name, argv in commands.items():
    code = main(argv)
    print("after", name, code, "torch" in sys.modules)
"""


def test_cpu_commands_do_not_import_torch(tmp_path):
    res = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [line[len("after "):].rsplit(" ", 2) for line in res.stdout.splitlines() if line.startswith("after ")]
    assert [name for name, _, _ in lines] == ["spectrum", "principal", "masks safe", "masks principal", "demo"]
    assert all(code == "0" for _, code, _ in lines), res.stdout + res.stderr
    # where a GPU may be present ("auto" picks CUDA then), torch is asked, by design; else never
    loaded = str(_gpu_possible())
    assert [imported for _, _, imported in lines] == [loaded] * 5, res.stdout
    assert (tmp_path / "demo.json").stat().st_size > 0 and (tmp_path / "p.safetensors").stat().st_size > 0
