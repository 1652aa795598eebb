"""minidepth's networks against OpenVINO (the strongest CPU runtime we know) and diffusers / transformers, one call each.

    pip install -e ".[test,bench]"          # the references and openvino (a benchmark-only extra, never a dependency)
    python benchmarks/peer_benchmark.py --sizes 256 512 --runs 5

For each network -- the UNet (one step, batch 2 = classifier-free guidance), the VAE decoder and the DPT depth model --
at official size with random weights (seeded; the same weights in all three runtimes):
  - minidepth: our module inside `fast_kernels()`, as the pipeline runs it by default (`--exact` too: PyTorch's default
    kernels, which is what diffusers runs); the UNet as a step of the denoising loop after its first (the block's
    first call, which prepacks weights and keeps the text embeddings' products, runs untimed before each timed one);
  - OpenVINO: our module converted with `openvino.convert_model` (static shapes: the benchmark's input), compiled for the
    CPU with INFERENCE_PRECISION_HINT f32; the script reads the compiled model's precision back and stops if it is not f32
    (OpenVINO would otherwise pick bf16 on CPUs that have it, a different computation);
  - diffusers / transformers: their module built from the same weights (our key maps write them in their layout).
One warm-up call each, then `--runs` rounds calling the runtimes in turn (A B C, C B A, ...) so that background load
hits all alike; medians. One network is in memory at a time. The outputs are compared too (max |diff| vs diffusers).
Name the CPU with the numbers: the script prints `lscpu`'s model name and its AVX flags.
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from minidepth.checkpoints.diffusers_format import UNET_KEYS, VAE_KEYS, unet_config_to_dict, vae_config_to_dict  # noqa: E402
from minidepth.checkpoints.loader import export_state_dict  # noqa: E402
from minidepth.checkpoints.transformers_format import DPT_KEYS, dpt_config_to_dict  # noqa: E402
from minidepth.fast_kernels import fast_kernels  # noqa: E402
from minidepth.models.autoencoder import AutoencoderKL  # noqa: E402
from minidepth.models.dpt import DPTDepthModel  # noqa: E402
from minidepth.models.unet import UNet  # noqa: E402


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    name = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    isa = sorted({f for f in (flags.group(1).split() if flags else []) if f in ("avx2", "avx512f", "avx512_bf16",
                                                                             "amx_bf16", "avx512_vnni")})
    return f"{name.group(1).strip() if name else 'unknown CPU'} ({', '.join(isa)}), {torch.get_num_threads()} threads"


def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights for every parameter (the default init of some layers is zero), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.01))
    return model.eval()


class DecodeOnly(torch.nn.Module):
    """The VAE decoder as a module of its own: latents (B, 4, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents)


# ------------------------------------------------------------------------------------------------ the three runtimes
def openvino_runtime(module: torch.nn.Module, inputs: tuple):
    import openvino as ov
    with torch.no_grad():
        converted = ov.convert_model(module, example_input=inputs)
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # e.g. "<Type: 'float32'>"
    if "f32" not in precision and "float32" not in precision:
        raise SystemExit(f"OpenVINO compiled the model in {precision}, not f32: the comparison would be unfair")
    request = compiled.create_infer_request()
    arrays = [x.numpy() for x in inputs]

    def call():
        request.infer(arrays)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return call, precision


def case(name: str, size: int, seed: int):
    """(our module, its inputs, a builder of the reference module, how to call the reference)."""
    h = size // 8
    g = torch.Generator().manual_seed(seed)
    if name == "UNet step (batch 2)":
        ours = random_weights(UNet(), seed)
        inputs = (torch.randn(2, 5, h, h, generator=g), torch.tensor([500, 500]),
                  torch.randn(2, 77, 1024, generator=g))

        def reference():
            from diffusers import UNet2DConditionModel
            ref = UNet2DConditionModel.from_config(unet_config_to_dict(ours.config))
            ref.load_state_dict(export_state_dict(ours, UNET_KEYS))
            return ref.eval(), lambda m: m(*inputs).sample
        return ours, inputs, reference
    if name == "VAE decode":
        vae = random_weights(AutoencoderKL(), seed)
        ours, inputs = DecodeOnly(vae), (torch.randn(1, 4, h, h, generator=g),)

        def reference():
            from diffusers import AutoencoderKL as Reference
            ref = Reference.from_config(vae_config_to_dict(vae.config))
            ref.load_state_dict(export_state_dict(vae, VAE_KEYS))
            return ref.eval(), lambda m: m.decode(*inputs).sample
        return ours, inputs, reference
    ours = random_weights(DPTDepthModel(), seed)  # depth estimate: the DPT at its 384x384 input, whatever the size
    inputs = (torch.randn(1, 3, 384, 384, generator=g),)

    def reference():
        from transformers import DPTConfig, DPTForDepthEstimation
        ref = DPTForDepthEstimation(DPTConfig(**dpt_config_to_dict(ours.config)))
        ref.load_state_dict(export_state_dict(ours, DPT_KEYS), strict=False)
        return ref.eval(), lambda m: m(*inputs).predicted_depth
    return ours, inputs, reference


def measure(name: str, size: int, runs: int, exact: bool) -> dict:
    ours, inputs, reference = case(name, size, seed=1)
    ref_model, ref_call = reference()
    ov_call, precision = openvino_runtime(ours, inputs)

    loop = name.startswith("UNet")  # the pipeline keeps transforms over the denoising loop only
    constants = inputs[2:] if loop else ()  # the text embeddings, as the denoising loop gives them

    def timed(call):
        """call -> a function returning (call's output, its seconds)."""
        def run():
            start = time.perf_counter()
            out = call()
            return out, time.perf_counter() - start
        return run

    def ours_call(fast: bool):
        """One call as the pipeline's denoising loop makes it: a step after the first, whose kept weight transforms
        (folded upsampling kernels, prepacked weights, the text embeddings' products) the block reuses. The block's
        first call, which makes them, runs untimed before it (the first-image benchmark counts it)."""
        with torch.no_grad(), fast_kernels(enabled=fast, keep_transforms=loop, constant_inputs=constants):
            if loop:
                ours(*inputs)
            return timed(lambda: ours(*inputs))()
    calls = {"minidepth": lambda: ours_call(True), "OpenVINO f32": timed(ov_call),
             "diffusers": timed(lambda: torch.no_grad()(lambda: ref_call(ref_model))())}
    if exact:
        calls["minidepth --exact"] = lambda: ours_call(False)
    outputs = {k: call()[0] for k, call in calls.items()}  # warm-up, and the outputs to compare
    times = {k: [] for k in calls}
    order = list(calls)
    for r in range(runs):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(calls[k]()[1])
    ref_out = outputs["diffusers"].float()
    diffs = {k: (v.float() - ref_out).abs().max().item() for k, v in outputs.items()}
    return {"medians": {k: statistics.median(v) for k, v in times.items()}, "diffs": diffs, "precision": precision}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (latents are /8)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--networks", nargs="+", default=["UNet step (batch 2)", "VAE decode", "depth estimate (DPT)"])
    p.add_argument("--exact", action="store_true", help="also time minidepth's exact mode (PyTorch's kernels)")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}", flush=True)
    import openvino
    print(f"OpenVINO {openvino.__version__}", flush=True)
    for size in args.sizes:
        print(f"\n## {size}x{size}, median of {args.runs} (seconds per call; max |diff| vs diffusers)\n", flush=True)
        for name in args.networks:
            if name.startswith("depth") and size != args.sizes[0]:
                continue  # the DPT always sees 384x384
            r = measure(name, size, args.runs, args.exact)
            gc.collect()  # the three runtimes' copies of this network go before the next one is built
            cells = "  ".join(f"{k} {v:.3f} s ({r['diffs'][k]:.1e})" for k, v in r["medians"].items())
            best = min(r["medians"], key=r["medians"].get)
            ratio = r["medians"]["minidepth"] / r["medians"]["OpenVINO f32"]
            print(f"{name:22s} {cells}   fastest: {best}; minidepth / OpenVINO = {ratio:.2f} "
                  f"[compiled precision {r['precision']}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
