"""minidepth against diffusers at the official size: time per stage, peak memory, pixel difference, GFLOP/s.

    .venv/bin/python benchmarks/benchmark.py                         # CPU, 256x256 and 512x512, 1 step, 2 runs
    .venv/bin/python benchmarks/benchmark.py --device cuda --dtype fp16 --steps 20 --strength 0.8 --runs 5

Both pipelines load the same checkpoint folder (by default a random-weight checkpoint with the real SD2-depth configs,
built once by tests/factory.py and cached in $MINIDEPTH_TEST_CACHE, default <repo>/.cache/minidepth-test; `--checkpoint`
takes a real one), each in its own worker process so that its memory can be measured alone. One warm-up run each (at the
first size), then for every size `--runs` runs each, ALTERNATING (A B B A ...) so that machine noise hits both the same
way, with identical inputs, settings and seeds; the table shows medians.

Stages are timed through minidepth's observer API (its stage events; each UNet call by a module hook) and, for
diffusers, which has no observers, by wrapping its steps on the instance (no library is changed):
  text encode = `encode_prompt` (prompt + negative prompt), depth estimate = `prepare_depth_map` (DPT preprocessing,
  model, resize, normalise), VAE encode = `vae.encode`, UNet step = one `unet` forward (the mean over the steps),
  VAE decode = `vae.decode`; end to end = the whole `pipe(...)` call. On CUDA every timer synchronises the device.
Memory: the worker's peak over the size's runs, weights included: on CPU the peak resident set size (VmHWM, reset
through /proc/self/clear_refs when a size starts), on CUDA `torch.cuda.max_memory_allocated` (reset likewise).
GFLOP/s: FLOPs of one UNet call (torch.utils.flop_counter on the meta device; the CPU flash-attention kernel is added by
hand) divided by the mean UNet step time, against the best time of a large `torch.mm` in the same dtype on the same
device ("matmul peak"; measured at the start and again after each size, the best value counts, so that a moment of
background load does not lower it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("MINIDEPTH_TEST_CACHE", str(REPO / ".cache" / "minidepth-test"))

STAGES = ("text encode", "depth estimate", "VAE encode", "UNet step", "VAE decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("minidepth", "diffusers")


# ------------------------------------------------------------------------------------------------ measuring
class Probe:
    """Times the stages of one pipeline and, while `inputs` is a dict, records each stage's model calls (for FLOPs).
    minidepth's pipeline is watched through its observer API (`watching()`: the stage events) and torch's module
    hooks (each UNet call); diffusers' pipeline, which has no observers, by wrapping its steps on the instance."""

    STAGE_OF = {"prompt": "text encode", "depth": "depth estimate", "encode": "VAE encode", "decode": "VAE decode"}

    def __init__(self, pipe, device: torch.device):
        self.device, self.times = device, {}
        self.inputs: dict | None = None  # {stage: [(model, method, args, kwargs)]} while recording
        self.observer = None
        if hasattr(pipe, "observing"):  # minidepth
            self.observer = self._observer(pipe)
            self._hook_unet_steps(pipe.unet)
        else:
            self._wrap(pipe, "encode_prompt", "text encode")
            self._wrap(pipe, "prepare_depth_map", "depth estimate")
            self._wrap(pipe.vae, "encode", "VAE encode")
            self._wrap(pipe.unet, "forward", "UNet step")  # nn.Module.__call__ looks `forward` up on the instance
            self._wrap(pipe.vae, "decode", "VAE decode")
            for model, method, stage in ((pipe.vae, "encode", "VAE encode"), (pipe.vae, "decode", "VAE decode")):
                self._record(model, method, stage)
        for model, stage in ((pipe.text_encoder, "text encode"), (pipe.depth_estimator, "depth estimate"),
                             (pipe.unet, "UNet step")):
            model.register_forward_pre_hook(
                lambda m, args, kwargs, stage=stage: self._keep(stage, m, "forward", args, kwargs), with_kwargs=True)

    def watching(self, pipe):
        """The block during which the stages are timed (minidepth: its observer is added for the block)."""
        return pipe.observing(self.observer) if self.observer else contextlib.nullcontext()

    def _keep(self, stage, model, method, args, kwargs):
        if self.inputs is not None:
            kept = {k: v for k, v in kwargs.items() if k != "generator"}
            self.inputs.setdefault(stage, []).append((model, method, args, kept))

    def _observer(self, pipe):
        from minidepth.observers import Observer
        probe, started = self, {}

        class StageClock(Observer):
            def stage_started(self, pipe, *, stage, **data):
                probe.sync()
                started[stage] = time.perf_counter()

            def stage_finished(self, pipe, *, stage, **data):
                probe.sync()
                if stage in probe.STAGE_OF:
                    probe.times.setdefault(probe.STAGE_OF[stage], []).append(time.perf_counter() - started[stage])

            def image_ready(self, pipe, *, image, **data):  # what vae.encode gets
                probe._keep("VAE encode", pipe.vae, "encode", (image,), {})

            def decoded(self, pipe, *, latents, output_type, **data):  # vae.decode gets latents / scaling factor
                if output_type != "latent":
                    probe._keep("VAE decode", pipe.vae, "decode", (latents,), {})
        return StageClock()

    def _hook_unet_steps(self, unet):
        started = []

        def before(module, args):
            self.sync()
            started.append(time.perf_counter())

        def after(module, args, output):
            self.sync()
            self.times.setdefault("UNet step", []).append(time.perf_counter() - started.pop())
        unet.register_forward_pre_hook(before)
        unet.register_forward_hook(after)

    def _record(self, model, method: str, stage: str):
        """diffusers' VAE: while `self.inputs` is a dict, keep the arguments of every call of model.method."""
        inner = getattr(model, method)

        def recorded(*args, **kwargs):
            self._keep(stage, model, method, args, kwargs)
            return inner(*args, **kwargs)

        setattr(model, method, recorded)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, obj, attr: str, stage: str):
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sync()
                self.times.setdefault(stage, []).append(time.perf_counter() - start)

        setattr(obj, attr, timed)

    def start(self):
        self.times = {}


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):  # not in torch's table (torch 2.x)
        return sdpa_flop_count(query, key, value)

    extra = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_flash
    return FlopCounterMode(display=False, custom_mapping=extra)


def stage_flops(inputs: dict) -> dict[str, int]:
    """FLOPs of each stage: its models re-run on the META device (a twin built from the model's config: shapes only,
    no compute) with the recorded input shapes; a model that looks at its input values (the text encoder checks its
    token ids) is re-run for real instead. The standard algorithm's FLOPs (a convolution counts 2*K*K*Cin per output
    value, even where minidepth's fast kernels fold an upsampling into fewer multiply-adds)."""
    from minidepth.checkpoints import build_on_meta
    meta = lambda x: torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x
    flops = {}
    for stage, calls in inputs.items():
        total = 0
        for model, method, args, kwargs in calls:
            twin = build_on_meta(lambda m=model: type(m)(m.config))
            try:
                with flop_counter() as counter, torch.no_grad():
                    getattr(twin, method)(*map(meta, args), **{k: meta(v) for k, v in kwargs.items()})
            except (RuntimeError, NotImplementedError):  # data-dependent: count a real call
                with flop_counter() as counter, torch.no_grad():
                    getattr(model, method)(*args, **kwargs)
            total += counter.get_total_flops()
        flops[stage] = total / (len(calls) if stage == "UNet step" else 1)  # per step, like the time
    return flops


def unet_flops(checkpoint: Path, size: int, batch: int) -> dict[str, int]:
    """FLOPs of one UNet call on a (batch, 5, size/8, size/8) input, counted on the META device (shapes only, no
    compute, no memory), for both implementations built from the checkpoint's unet/config.json."""
    import diffusers

    from minidepth.checkpoints import build_on_meta
    from minidepth.checkpoints.diffusers_format import unet_config_from_dict
    from minidepth.models.unet import UNet
    config = json.loads((checkpoint / "unet" / "config.json").read_text())
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
    models = {"minidepth": build_on_meta(lambda: UNet(unet_config_from_dict(config))), "diffusers": reference}
    x = torch.empty(batch, config["in_channels"], size // 8, size // 8, device="meta")
    context = torch.empty(batch, 77, config["cross_attention_dim"], device="meta")
    flops = {}
    for name, model in models.items():
        with flop_counter() as counter:
            model(x, torch.tensor(500, device="meta"), encoder_hidden_states=context)
        flops[name] = counter.get_total_flops()
    return flops


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class Memory:
    """This process's memory (MB): now, and the peak since `reset_peak` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        gc.collect()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _status_mb("VmRSS")

    def reset_peak(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_mb("VmHWM")


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few large square matrix products: the practical peak of this device for dense math. On the CPU the
    best of MKL's (`torch.mm`, AVX2 code on AMD CPUs) and oneDNN's (AVX-512) products."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    products = [torch.mm]
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        products.append(lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for i in range(5 * len(products)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        products[i % len(products)](a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------------ the two pipelines
def load(name: str, folder: Path, device: torch.device, dtype: torch.dtype, exact: bool = False,
         compile: bool = False):
    if name == "minidepth":
        from minidepth import StableDiffusionDepth2ImgPipeline
        pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(folder, torch_dtype=dtype, device=device)
        pipe.set_exact(exact)
        if compile:
            pipe.compile()
    else:
        import diffusers
        import transformers
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(size: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth synthetic photo (gradients + a blob + a little noise), so that depth and latents are not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.5 * np.sin(6 * x + 2 * y), 0.5 + 0.5 * np.cos(4 * y - 3 * x),
                    np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 8)], -1) + rng.normal(0, 0.03, (size, size, 3))
    return PIL.Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ the worker process
def worker(args) -> None:
    """Loads one pipeline, then answers JSON requests on stdin (one per line) with JSON lines on stdout."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the replies
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    memory = Memory(device)
    started = time.perf_counter()
    pipe = load(args.worker, args.checkpoint, device, dtype, args.exact, args.compile)
    probe = Probe(pipe, device)
    reply.write(json.dumps({"load_s": time.perf_counter() - started, "weights_mb": memory.now()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "reset_peak":
            memory.reset_peak()
            reply.write("{}\n")
        elif request["cmd"] == "run":
            image = photo(request["size"])
            probe.inputs = {} if request.get("count") else None
            probe.start()
            probe.sync()
            start = time.perf_counter()
            with probe.watching(pipe):
                out = pipe(prompt=args.prompt, image=image, strength=args.strength, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                           output_type="np")
            probe.sync()
            total = time.perf_counter() - start
            np.save(request["out"], np.asarray(out.images[0], dtype=np.float32))
            stages = {k: sum(t) / len(t) if k == "UNet step" else sum(t) for k, t in probe.times.items()}
            recorded, probe.inputs = probe.inputs, None
            flops = stage_flops(recorded) if recorded is not None else {}
            reply.write(json.dumps({"total": total, "peak_mb": memory.peak(), "flops": flops, **stages}) + "\n")


class Worker:
    def __init__(self, name: str, args):
        self.name = name
        command = [sys.executable, __file__, "--worker", name, "--checkpoint", str(args.checkpoint),
                   "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
                   "--strength", str(args.strength), "--guidance", str(args.guidance), "--seed", str(args.seed),
                   "--prompt", args.prompt] + ["--exact"] * args.exact + ["--compile"] * args.compile
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = self._read()
        self.ready["cold_start_s"] = time.perf_counter() - started  # a fresh interpreter to a loaded pipeline

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (exit code {self.process.wait()}); see its stderr above")
        return json.loads(line)

    def __call__(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        return self._read()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


# ------------------------------------------------------------------------------------------------ report
def table(size: int, results: dict, flops: dict, peaks: dict, peak_gflops: float, pixel_diff: float, args) -> str:
    def med(name, key):
        return statistics.median(r.get(key, 0.0) for r in results[name])

    def row(label, ours, ref, fmt):
        return label, fmt.format(ours), fmt.format(ref), f"{ours / ref:.2f}x" if ref else "-"

    rows = [("", "minidepth", "diffusers", "ratio")]
    rows += [row(f"{s} (s)", med("minidepth", s), med("diffusers", s), "{:.3f}") for s in STAGES]
    rows.append(row("end to end (s)", med("minidepth", "total"), med("diffusers", "total"), "{:.3f}"))
    rows.append(row(f"peak {'RSS' if args.device == 'cpu' else 'allocated'} (MB)", peaks["minidepth"],
                    peaks["diffusers"], "{:.0f}"))
    stage_flops = results["minidepth"][0].get("flops", {})  # the same maths in both: counted once, on minidepth
    for stage in STAGES:
        if stage_flops.get(stage):
            rate = {n: stage_flops[stage] / med(n, stage) / 1e9 for n in NAMES}
            rows.append(row(f"{stage} GFLOP/s", rate["minidepth"], rate["diffusers"], "{:.1f}"))
            rows.append((f"  share of peak ({stage_flops[stage] / 1e9:.1f} GFLOP)",
                         f"{100 * rate['minidepth'] / peak_gflops:.0f}%", f"{100 * rate['diffusers'] / peak_gflops:.0f}%",
                         ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"### {size}x{size}: {args.steps} steps, strength {args.strength}, guidance {args.guidance}, "
             f"{args.device} {args.dtype}; median of {args.runs} runs; ratio = minidepth / diffusers", "",
             "| " + " | ".join(c.ljust(w) for c, w in zip(rows[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in rows[1:]]
    batch = 2 if args.guidance > 1 else 1
    lines += ["", f"One UNet call (batch {batch}): {flops['minidepth'] / 1e9:.1f} GFLOP counted on "
                  f"minidepth, {flops['diffusers'] / 1e9:.1f} on diffusers (the stage counts above: the same "
                  f"maths, counted on minidepth's models); matmul peak {peak_gflops:.1f} "
                  f"GFLOP/s. Max pixel difference |minidepth - diffusers| = {pixel_diff:.2e} of the [0, 1] range "
                  f"({pixel_diff * 255:.3f} / 255)."]
    return "\n".join(lines)


def loading_table(starts: dict, runs: int) -> str:
    """Medians over the fresh worker processes started for each pipeline."""
    lines = [f"### Loading (median of {runs} fresh processes each)", "",
             "|  | minidepth | diffusers | ratio |", "|---|---|---|---|"]
    for key, label in (("cold_start_s", "cold start (s): a fresh process, imports included, to a loaded pipeline"),
                       ("load_s", "load (s): library imports + from_pretrained"),
                       ("weights_mb", "RSS after loading (MB)")):
        a, b = (statistics.median(r[key] for r in starts[n]) for n in NAMES)
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes (multiples of 8)")
    p.add_argument("--steps", type=int, default=1,
                   help="num_inference_steps (PNDM, the checkpoint's scheduler, makes N+1 UNet calls for N > 1)")
    p.add_argument("--strength", type=float, default=1.0, help="1.0 runs every step of the schedule")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--runs", type=int, default=2, help="timed runs per pipeline and size, after one warm-up each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--warmup-every-size", action="store_true",
                   help="a warm-up run at every size (default: one per pipeline, at the first size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a stone bridge over a river, evening light")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the random-weight official-size one)")
    p.add_argument("--architecture", choices=["official", "tiny"], default="official",
                   help="size of the random-weight checkpoint when no --checkpoint is given (tiny: a quick smoke test)")
    p.add_argument("--exact", action="store_true",
                   help="minidepth in exact mode (pipe.set_exact(True): diffusers' kernels, bit-identical images)")
    p.add_argument("--compile", action="store_true", help="minidepth with pipe.compile() (torch.compile)")
    p.add_argument("--load-only", action="store_true",
                   help="only the loading table: --runs fresh processes per pipeline, alternating, then stop")
    p.add_argument("--worker", choices=NAMES, help=argparse.SUPPRESS)  # internal: run as a worker process
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), file=sys.stderr)
    if args.checkpoint is None:
        import factory
        started = time.perf_counter()
        args.checkpoint = factory.cached_checkpoint(args.architecture)
        print(f"checkpoint {args.checkpoint} ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    workers, starts = {}, {}
    try:
        for name in NAMES:  # one after the other, so that loading is not timed under contention
            workers[name] = Worker(name, args)
            starts[name] = [workers[name].ready]
            print(f"{name}: loaded in {workers[name].ready['load_s']:.1f} s; process RSS/allocation after loading "
                  f"{workers[name].ready['weights_mb']:.0f} MB", file=sys.stderr)
        if args.load_only:  # more fresh processes, alternating, for the medians
            for run in range(1, args.runs):
                for name in NAMES if run % 2 == 0 else NAMES[::-1]:
                    workers.pop(name).close()
                    workers[name] = Worker(name, args)
                    starts[name].append(workers[name].ready)
        print(loading_table(starts, args.runs if args.load_only else 1), flush=True)
        if args.load_only:
            return 0
        peak_gflops = matmul_peak_gflops(device, dtype)
        print(f"matmul peak: {peak_gflops:.1f} GFLOP/s ({args.dtype})", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            for name in NAMES:  # warm-up at the first size: pages the weights in, grows the allocators
                warm = workers[name](cmd="run", size=args.sizes[0], out=f"{tmp}/{name}-warm.npy")
                print(f"{name} warm-up ({args.sizes[0]}x{args.sizes[0]}): {warm['total']:.1f} s", file=sys.stderr)
            for size in args.sizes:
                if size != args.sizes[0] and args.warmup_every_size:
                    for name in NAMES:
                        workers[name](cmd="run", size=size, out=f"{tmp}/{name}-warm.npy")
                flops = unet_flops(args.checkpoint, size, 2 if args.guidance > 1 else 1)
                results, images = {n: [] for n in NAMES}, {n: [] for n in NAMES}
                for name in NAMES:
                    workers[name](cmd="reset_peak")
                for run in range(args.runs):
                    for name in NAMES if run % 2 == 0 else NAMES[::-1]:
                        images[name].append(f"{tmp}/{name}-{size}-{run}.npy")
                        results[name].append(workers[name](cmd="run", size=size, out=images[name][-1],
                                                           count=name == "minidepth" and run == 0))
                        print(f"{size}: {name} run {run + 1}: {results[name][-1]['total']:.2f} s", file=sys.stderr)
                peaks = {n: max(r["peak_mb"] for r in results[n]) for n in NAMES}
                peak_gflops = max(peak_gflops, matmul_peak_gflops(device, dtype))  # best seen: less load noise
                pixel_diff = max(float(np.abs(np.load(a).astype(np.float64) - np.load(b)).max())
                                 for a, b in zip(images["minidepth"], images["diffusers"]))
                print(table(size, results, flops, peaks, peak_gflops, pixel_diff, args) + "\n", flush=True)
    finally:
        for w in workers.values():
            w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
