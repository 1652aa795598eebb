"""Stage-by-stage parity against diffusers (`compare`), and the drill-down to the first module that differs.

    tool.py    run both pipelines on the same inputs, compare every stage, the report (`minidepth parity`)
    trace.py   run each pipeline's real `__call__` once and record its stages (observers, hooks, a step-end callback)
    drill.py   rerun one network on both sides with forward hooks and name the first module whose output differs

diffusers and transformers are needed only here (`pip install "minidepth[parity]"`).
"""

from .tool import (REFERENCE_VERSIONS, ParityReport, ReferenceMissing, Stage, compare, default_tolerance,  # noqa: F401
                   load_pipelines, quiet_loading, require_references)
