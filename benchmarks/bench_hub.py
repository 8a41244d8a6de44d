"""Bytes moved by `sparsity org/a org/b --include '*.layers.13.*'` on a 28-layer bf16 model served by the fake Hub."""
import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pathlib import Path
import numpy as np
from hubserver import FakeHub
from ckptprobe.io.writer import write_safetensors
H, I, V, L = 256, 704, 4096, 28
rng = np.random.default_rng(0)
shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
for i in range(L):
    p = f"model.layers.{i}."
    shapes |= {p + f"self_attn.{x}_proj.weight": (H, H) for x in "qkvo"}
    shapes |= {p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
               p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
tmp = Path(tempfile.mkdtemp())
base = {n: rng.integers(0x3c00, 0x3d00, s, dtype=np.uint16) for n, s in shapes.items()}
ft = {n: x + (rng.random(x.shape) < 0.05).astype(np.uint16) for n, x in base.items()}
write_safetensors(tmp / "a.safetensors", {n: ("BF16", x) for n, x in base.items()})
write_safetensors(tmp / "b.safetensors", {n: ("BF16", x) for n, x in ft.items()})
import huggingface_hub.constants as c
with FakeHub() as hub:
    hub.add_repo("org/a", {"main": {"model.safetensors": (tmp / "a.safetensors").read_bytes()}})
    hub.add_repo("org/b", {"main": {"model.safetensors": (tmp / "b.safetensors").read_bytes()}})
    c.ENDPOINT = hub.endpoint; c.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    c.HF_HUB_CACHE = str(tmp / "cache"); c.AGENT_HARNESSES_PATH = str(tmp / "agents.json")
    from ckptprobe.cli import main
    t = time.perf_counter()
    code = main(["sparsity", "org/a", "org/b", "--include", "*.layers.13.*", "-f", "csv", "-o", str(tmp / "out.csv")])
    dt = time.perf_counter() - t
    size = (tmp / "a.safetensors").stat().st_size
    layer = sum(np.prod(s) * 2 for n, s in shapes.items() if ".layers.13." in n)
    for r in ("org/a", "org/b"):
        print(f"{r}: served {hub.bytes_served[(r, 'model.safetensors')]:,} of {size:,} bytes "
              f"(layer 13: {layer:,} bytes); requests: {sum(1 for q in hub.requests if f'/{r}/' in q.path)}")
    print(f"exit {code}, {dt:.2f} s")
