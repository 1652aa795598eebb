"""A small record of measured parity errors, printed at the end of the test run (`pytest -rA` not needed)."""

import os

RESULTS: list[tuple[str, str, float, float]] = []


def record(what: str, max_diff: float, mean_diff: float) -> None:
    RESULTS.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], what, max_diff, mean_diff))


def summary_lines() -> list[str]:
    if not RESULTS:
        return []
    width = max(len(t) for t, *_ in RESULTS)
    lines = [f"{'test':{width}}  {'what':28}  {'max abs diff':>12}  {'mean abs diff':>13}"]
    lines += [f"{t:{width}}  {w[:28]:28}  {m:12.3g}  {a:13.3g}" for t, w, m, a in RESULTS]
    return lines
