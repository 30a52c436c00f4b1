"""Model-only inference speed on the CPU, PyTorch against ONNX Runtime, for every model in params.yaml `models:`.

Each model (random weights, `encoder_weights` ignored: speed does not depend on them) is exported with
charseg.onnx.export_onnx (parity-checked, as `charseg export` does) into a temporary
folder, then both runtimes map the same normalised batch to probabilities (forward + sigmoid; no
resizing, decoding or preprocessing). Images/s = batch size / median call time after warm-up. Both
runtimes get the same number of intra-op threads.

    .venv/bin/python benchmarks/bench_onnx.py                       # 256 and 512 px, batches 1 and 8
    .venv/bin/python benchmarks/bench_onnx.py --sizes 64 --batch-sizes 1 2 --iters 2 --models pspnet
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg import models  # noqa: E402
from charseg.config import load_config  # noqa: E402
from charseg.device import ORT_CPU  # noqa: E402
from charseg.onnx import OnnxSegmenter, export_onnx  # noqa: E402


def median_seconds(call: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", nargs="+", help="names under params.yaml 'models:' (default: all)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="img_size values")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--iters", type=int, default=5, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, help="intra-op threads for both (default: torch's choice)")
    args = parser.parse_args()

    model_cfgs = {name: model.params for name, model in load_config(args.params).models().items()}
    names = args.models or list(model_cfgs)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"model-only CPU inference (forward + sigmoid), {threads} threads each, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, median of {args.iters} after {args.warmup} warm-up\n")
    print("| model | img_size | batch | torch img/s | onnxruntime img/s | onnxruntime / torch | max prob diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_onnx.") as tmp:
        for name in names:
            cfg = {**model_cfgs[name], "encoder_weights": None}
            torch.manual_seed(0)
            model = models.build_model(cfg, pretrained=False, name=name).eval()
            for size in args.sizes:
                models.check_img_size(cfg, size, name=name)
                meta = {"model_name": name, "arch": cfg["arch"], "img_size": size, "mean": models.IMAGENET_MEAN,
                        "std": models.IMAGENET_STD, "threshold": models.THRESHOLD}
                path = Path(tmp) / f"{name}_{size}.onnx"
                export_onnx(model, meta, path)
                segmenter = OnnxSegmenter(path, providers=[ORT_CPU], threads=threads)
                for batch_size in args.batch_sizes:
                    batch = rng.standard_normal((batch_size, 3, size, size), dtype=np.float32)
                    tensor = torch.from_numpy(batch)

                    def torch_call() -> np.ndarray:
                        with torch.inference_mode():
                            return torch.sigmoid(model(tensor))[:, 0].numpy()

                    diff = float(np.abs(torch_call() - segmenter(batch)).max())
                    t_torch = median_seconds(torch_call, args.iters, args.warmup)
                    t_onnx = median_seconds(lambda: segmenter(batch), args.iters, args.warmup)
                    print(f"| {name} | {size} | {batch_size} | {batch_size / t_torch:.1f} | "
                          f"{batch_size / t_onnx:.1f} | {t_torch / t_onnx:.2f}x | {diff:.1e} |", flush=True)
                del segmenter
                path.unlink()


if __name__ == "__main__":
    main()
