"""`minidepth batch`'s files: reading and checking the jobs (all before a model loads), the outputs each job writes,
and the manifest (one JSON line per job, written so that a killed process leaves only whole lines behind).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path

from .args import SCHEDULERS, CLIError, to_integer, to_number

JOB_FIELDS = ("image", "prompt", "negative_prompt", "seed", "steps", "strength", "guidance_scale", "scheduler",
              "depth_map", "num_images", "name", "depth_model")
ALIASES = {"guidance": "guidance_scale"}
# the numeric fields: how they are read (JSON numbers or text; NaN, inf and 2.5 steps refused, naming the field)
NUMBERS = {"seed": (to_integer, "an integer >= 0"), "steps": (to_integer, "an integer in [1, 1000]"),
           "num_images": (to_integer, "an integer >= 1"), "strength": (to_number, "a number in [0, 1]"),
           "guidance_scale": (to_number, "a finite number")}


# ------------------------------------------------------------------------------------------------ reading jobs
def read_jobs(path: str | os.PathLike) -> list[dict]:
    """The job file -> one dict per job (strings as written; CSV cells that are empty are left out)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"JOBS: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return [{k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")} for row in rows]
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            job = {"_error": f"line {number} is not valid JSON ({e.msg})"}
        if not isinstance(job, dict):
            job = {"_error": f"line {number} is not a JSON object"}
        jobs.append(job)
    return jobs


def default_seed(jobs_file: Path, index: int) -> int:
    """A seed for a job that names none, from the job file's content and the job's index (not from the process)."""
    digest = hashlib.sha256(jobs_file.read_bytes() + f"/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def check_job(raw: dict, index: int, defaults: dict, jobs_file: Path) -> tuple[dict, str | None]:
    """One job with the command line's defaults filled in, and the reason it cannot run (or None)."""
    if "_error" in raw:
        return {"index": index}, raw["_error"]
    job = {ALIASES.get(k, k): v for k, v in raw.items()}
    unknown = sorted(set(job) - set(JOB_FIELDS))
    job = {**defaults, **{k: v for k, v in job.items() if k in JOB_FIELDS}, "index": index}
    try:
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(JOB_FIELDS)})")
        for key, (read, accepted) in NUMBERS.items():
            if job.get(key) is not None:
                job[key] = read(job[key], key, accepted)
        if not isinstance(job.get("prompt"), str):
            raise ValueError("prompt is required (a string)")
        if not isinstance(job.get("image"), str) or not job["image"]:
            raise ValueError("image is required (a file name)")
        job["image"] = str(_resolve(job["image"], jobs_file))
        if job.get("depth_map"):
            job["depth_map"] = str(_resolve(job["depth_map"], jobs_file))
        if job.get("depth_model") is not None:  # a name, a folder (beside the job file first) or a Hub repo id
            if not isinstance(job["depth_model"], str):
                raise ValueError(f"depth_model {job['depth_model']!r} must be a string (a name, folder or repo id)")
            from ..checkpoints.depth_models import check_depth_model_name
            job["depth_model"] = check_depth_model_name(str(_resolve(job["depth_model"], jobs_file)))
        _check_values(job)
        if job.get("seed") is None:
            job["seed"] = (defaults["base_seed"] + index) if defaults.get("base_seed") is not None \
                else default_seed(jobs_file, index)
        job["name"] = str(job.get("name") or f"{index + 1:05d}")
        if not re.fullmatch(r"[\w.\- ]+", job["name"]) or job["name"] in (".", ".."):
            raise ValueError(f"name {job['name']!r} must be a plain file name (letters, digits, '.', '-', '_')")
        _check_files(job)
    except (ValueError, TypeError, CLIError) as e:
        return job, str(e)
    return job, None


def _resolve(name: str, jobs_file: Path) -> Path:
    """Relative paths in a job file are relative to the job file's folder, then to the current folder."""
    beside = jobs_file.parent / name
    return beside if not Path(name).is_absolute() and beside.exists() else Path(name)


def _check_values(job: dict) -> None:
    def bad(key, accepted):
        raise ValueError(f"{key} {job[key]!r}: must be {accepted}")
    if not 0 <= job["strength"] <= 1:
        bad("strength", "a number in [0, 1]")
    if not 1 <= job["steps"] <= 1000:
        bad("steps", "an integer in [1, 1000]")
    if int(job["steps"] * job["strength"]) < 1:
        raise ValueError(f"steps {job['steps']} with strength {job['strength']} leaves no denoising step")
    if not math.isfinite(job["guidance_scale"]):
        bad("guidance_scale", "a finite number")
    if job["num_images"] < 1:
        bad("num_images", "an integer >= 1")
    if job.get("seed") is not None and not 0 <= job["seed"] < 2 ** 63 - job["num_images"]:
        bad("seed", "an integer >= 0")
    if job.get("scheduler") is not None and job["scheduler"] not in SCHEDULERS:
        bad("scheduler", f"one of {', '.join(SCHEDULERS)}")
    if job.get("negative_prompt") is not None and not isinstance(job["negative_prompt"], str):
        bad("negative_prompt", "a string")


def _check_files(job: dict) -> None:
    """The photo (and depth map) exist, are within the size policy (minidepth/image_files.py: a batch job is made
    at its photo's size, so the photo must be within --max-pixels; checked from the file's header, before it is
    decoded) and decode."""
    from ..image_files import MAX_PIXELS, TooLarge, check_generation_size, open_image_file
    from .files import read_depth_map
    max_pixels, name = job.get("max_pixels") or MAX_PIXELS, f"image {job['image']}"
    if not os.path.isfile(job["image"]):
        raise ValueError(f"image file not found: {job['image']}")
    try:
        with open_image_file(job["image"], name, max_pixels=max_pixels, raise_with="--max-pixels") as img:
            size = img.size
            check_generation_size(size, name, max_pixels, "; resize the photo first, or raise --max-pixels")
            img.load()
    except TooLarge:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"image {job['image']} is not a readable image ({e})") from e
    if min(size) < 8:
        raise ValueError(f"image {job['image']} is {size[0]}x{size[1]} pixels; images must be at least 8x8")
    if job.get("depth_map"):
        try:
            read_depth_map(job["depth_map"], max_pixels)
        except CLIError as e:
            raise ValueError(str(e).replace("--depth-map: ", "depth_map: ")) from e


# ------------------------------------------------------------------------------------------------ outputs, manifest
def job_outputs(job: dict, out: Path) -> list[Path]:
    from .files import planned_outputs
    return planned_outputs(out / f"{job['name']}.png", job["num_images"], False, False)["images"]


def public(job: dict) -> dict:
    """The job's arguments as recorded in the manifest."""
    return {k: job.get(k) for k in JOB_FIELDS}


def append_line(path: Path, record: dict) -> None:
    """One manifest line, flushed to disk before the next job starts (a kill loses at most the line in flight)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> list[dict]:
    """The complete lines of a manifest part (a line cut short by a kill is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_manifest(out: Path, records: list[dict]) -> Path:
    """`out/manifest.jsonl`, one line per job in job order, written atomically."""
    path = out / "manifest.jsonl"
    tmp = out / ".manifest.jsonl.part"
    latest = {r["index"]: r for r in records}  # a job recorded twice (a rerun): the last record wins
    tmp.write_text("".join(json.dumps(latest[i]) + "\n" for i in sorted(latest)), encoding="utf-8")
    os.replace(tmp, path)
    return path
