"""What checksummed checkpoints cost (fdfo.integrity): ``CheckpointManager.save`` with and without its
manifest, and the check before a resume, on a LoRA-sized and on a large set of files. CPU only, no model:
a stand-in engine writes the files the real one writes (torch.save for the state, safetensors for the
exported weights), at these sizes:

    lora    SD3.5 Medium, LoRA rank 32 on the default targets: state (weights + 2 Adam moments, fp32) and
            the adapter in both formats (diffusers' and peft's, fp32)
    large   --large-gib GiB: half a bf16 transformer export (transformer/), half state files

    python benchmarks/bench_checkpoint_hash.py [--large-gib 4] [--repeats 3] [--dir /tmp/fdfo-bench]

Saves with and without the manifest alternate (which goes first alternates too), each into a fresh
directory after a sync; the medians and minima are printed, with the phases of the save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fdfo import atomic, checkpoint, integrity  # noqa: E402

PHASES: dict[str, list[float]] = {}


def timed(name, fn):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES.setdefault(name, []).append(time.perf_counter() - t0)
    return wrapped


def lora_params(rank: int = 32) -> int:
    """LoRA parameters of SD3.5 Medium at ``rank`` on the family's default targets (shapes only)."""
    from diffusers import SD3Transformer2DModel

    from fdfo.models import SD3FlowModel
    from fdfo.models.flavours import ARCHS

    with torch.device("meta"):
        model = SD3Transformer2DModel(**ARCHS["sd35-medium"])
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in SD3FlowModel.LORA_TARGETS))


def tensors(n: int, dtype: torch.dtype, parts: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(n // parts, generator=g).to(dtype) for i in range(parts)}


class Engine:
    """Writes ``state`` ({file name: tensors}) with torch.save and ``export`` ({path: tensors}) with safetensors."""

    def __init__(self, state: dict, export: dict):
        self.state, self.exported = state, export

    def save_state(self, directory: Path, tag: str, client_state: dict) -> None:
        (directory / tag).mkdir()
        for name, t in self.state.items():
            torch.save({"module": t, "trainer": client_state} if name.startswith("mp_") else t, directory / tag / name)

    def export(self, directory: Path) -> None:
        for rel, t in self.exported.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(t, directory / rel)


def sets(large_gib: float) -> dict[str, Engine]:
    n = lora_params()
    lora = tensors(n, torch.float32)
    out = {"lora": Engine({"mp_rank_00_model_states.pt": {"w": lora, "exp_avg": lora, "exp_avg_sq": lora}},
                          {"adapter/pytorch_lora_weights.safetensors": lora,
                           "adapter/adapter_model.safetensors": lora})}
    half = int(large_gib * 2**30 / 2)
    weights = tensors(half // 2, torch.bfloat16)
    state = tensors(half // 4, torch.float32)
    out["large"] = Engine({"mp_rank_00_model_states.pt": {}, "zero_pp_rank_0_mp_rank_00_optim_states.pt": state},
                          {"transformer/diffusion_pytorch_model.safetensors": weights})
    return out


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def median(values) -> float:
    return statistics.median(values) if values else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large-gib", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/tmp/fdfo-bench-checkpoint-hash")
    p.add_argument("--only", choices=["lora", "large"])
    args = p.parse_args(argv)
    root = Path(args.dir)
    seal, replace_dir = integrity.seal, atomic.replace_dir
    print(f"checksum {integrity.CHECKSUM}, {integrity.CHUNK >> 20} MiB pieces, {integrity._threads()} thread(s)")
    for name, engine in sets(args.large_gib).items():
        if args.only and name != args.only:
            continue
        engine.save_state, engine.export = timed("state", engine.save_state), timed("export", engine.export)
        times = {"without": [], "with": []}
        phases = {"without": {}, "with": {}}
        seal_s, verify_s, load_s, size = [], [], [], 0
        for rep in range(args.repeats):
            for mode in (("without", "with") if rep % 2 == 0 else ("with", "without")):  # neither always first
                shutil.rmtree(root, ignore_errors=True)
                os.sync()  # the previous save's deletion and writeback are done before the clock starts
                time.sleep(0.5)
                m = checkpoint.CheckpointManager(root, SimpleNamespace(every=1, keep_last=0), engine)
                integrity.seal = timed("manifest", seal)
                atomic.replace_dir = timed("fsync+rename", replace_dir)
                if mode == "without":
                    integrity.seal = lambda directory, skip=(): None
                PHASES.clear()
                try:
                    t0 = time.perf_counter()
                    path = m.save(1, {"epoch": 1, "global_step": 1, "history": []})
                    times[mode].append(time.perf_counter() - t0)
                finally:
                    integrity.seal, atomic.replace_dir = seal, replace_dir
                for k, v in PHASES.items():
                    phases[mode].setdefault(k, []).append(sum(v))
            size = size_of(path)
            t0 = time.perf_counter()
            integrity.seal(path)  # the checksums alone, the files in the page cache and on disk already
            seal_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert integrity.verify(path).good
            verify_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in sorted((path / "state").iterdir()):
                torch.load(f, weights_only=False)
            load_s.append(time.perf_counter() - t0)
        base, full = median(times["without"]), median(times["with"])
        print(f"{name}: {size / 2**30:.3f} GiB in {sum(1 for p in path.rglob('*') if p.is_file())} files")
        for mode in ("without", "with"):
            runs = " ".join(f"{t:.2f}" for t in times[mode])
            parts = ", ".join(f"{k} {median(v):.2f}" for k, v in phases[mode].items())
            print(f"  save {mode} manifest: median {median(times[mode]):.2f} s, min {min(times[mode]):.2f} s "
                  f"(runs {runs}; median phases: {parts})")
        print(f"  added: median {full - base:+.2f} s ({100 * (full - base) / base:+.1f} %), min "
              f"{min(times['with']) - min(times['without']):+.2f} s "
              f"({100 * (min(times['with']) - min(times['without'])) / min(times['without']):+.1f} %)")
        print(f"  checksums alone (files cached): {median(seal_s):.2f} s = {size / 2**30 / median(seal_s):.2f} GiB/s; "
              f"verify before a resume {median(verify_s):.2f} s vs torch.load of the state {median(load_s):.2f} s")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
