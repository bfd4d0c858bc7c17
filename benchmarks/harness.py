"""Shared helpers of the benchmark scripts: timed runs with peak memory, side environments, synthetic models."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("REGMEAN_BENCH_DIR", ROOT / "runs" / "bench"))
DOCS = ROOT / "docs" / "benchmarks"
TORCH = "torch==2.13.0"


def side_venv(name: str, requirement: str) -> Path:
    """A virtual environment of its own for a peer tool (torch installed first, CPU wheel); its bin folder."""
    venv = WORK / f"venv-{name}"
    stamp = venv / ".installed"
    if not stamp.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, requirement], check=True)
        stamp.write_text(requirement)
    return venv / "bin"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_anon(pid: int) -> int:
    try:
        m = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, peak RSS (bytes) and peak RssAnon (sampled every 20 ms)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *cmd], env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            for child in _children(proc.pid):
                peak_anon = max(peak_anon, _rss_anon(child))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", err)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    return {"wall_s": hours * 3600 + minutes * 60 + seconds, "peak_rss": rss, "peak_rss_anon": peak_anon}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f}"


def write_doc(name: str, text: str, data: dict) -> Path:
    """docs/benchmarks/NAME.md (what docs/benchmarks.md links) and NAME.json (the raw figures)."""
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}.json").write_text(json.dumps(data, indent=2))
    path = DOCS / f"{name}.md"
    path.write_text(text)
    return path


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024**2
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {sys.version.split()[0]}"


def llama_config(layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 49152) -> dict:
    """A Llama/TinyLlama-shaped config: grouped-query attention (32 heads, 4 KV heads), untied lm_head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of LlamaForCausalLM's weights for `cfg`."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def build_llamas(folder: Path, layers: int, k: int, tokenizer: Path | None = None, **dims) -> list[Path]:
    """A random-init "base" Llama and k fine-tunes of it (base + small perturbations), bf16, sharded at 1 GB.

    Every tensor is generated, written and dropped one at a time, so building needs little memory."""
    import torch

    from regmean.io.writer import ShardedWriter

    cfg = llama_config(layers, **dims)
    shapes = llama_tensors(cfg)
    names = ["base", *(f"ft{j}" for j in range(1, k + 1))]
    paths = [folder / n for n in names]
    if all((p / "config.json").is_file() for p in paths):
        return paths
    layout = {name: (torch.bfloat16, shape) for name, shape in shapes.items()}
    for j, path in enumerate(paths):
        writer = ShardedWriter(path, layout, 1024**3)
        for t, (name, shape) in enumerate(shapes.items()):
            gen = torch.Generator().manual_seed(t)
            if name.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=gen) * (
                    0.02 if "embed" in name or "head" in name else 1 / math.sqrt(shape[-1])
                )
            if j:
                noise = torch.Generator().manual_seed(1000003 * j + t)
                base += 0.01 * base.abs().mean() * torch.randn(shape, generator=noise)
            writer.add(name, base.to(torch.bfloat16))
            del base
        writer.finish()
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            for f in tokenizer.glob("tokenizer*"):
                (path / f.name).write_bytes(f.read_bytes())
            for f in tokenizer.glob("special_tokens_map.json"):
                (path / f.name).write_bytes(f.read_bytes())
    return paths


def param_count(cfg: dict) -> int:
    return sum(math.prod(s) for s in llama_tensors(cfg).values())


def domain_finetunes(count: int = 4, size: int = 200) -> list[Path]:
    """MiniLM fine-tuned on `size` tweets of each of the first `count` tweet domains (2 epochs, seed 0; the bench's
    recipe and cache, so built once): same-shaped classifiers for the merge benchmarks."""
    from regmean_bench.run import packaged_minilm
    from regmean_bench.runner import Settings
    from regmean_bench.suites import domain_data
    from regmean_bench.train import Recipe, fine_tune

    base = packaged_minilm()
    parts, _ = domain_data(0, Settings(base=base, work=WORK, train_size=size, log=lambda _: None))
    return [fine_tune(base, [part], Recipe(epochs=2), 0)[0] for part in parts[:count]]


def chosen_models(pattern: str | None, count: int) -> list[str]:
    """The first `count` model folders matching the glob `pattern`, or `count` tweet-domain fine-tunes; at least 2."""
    if pattern:
        models = sorted(glob.glob(os.path.expanduser(pattern)))[:count]
    else:
        models = [str(m) for m in domain_finetunes(count)]
    if len(models) < 2:
        raise SystemExit(f"{pattern}: fewer than 2 model folders")
    return models
