"""Package-level guarantees: the runtime never imports the reference libraries."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minidepth"
FORBIDDEN = {"diffusers", "transformers", "open_clip", "accelerate", "peft", "scipy"}
# the one module meant to run the references: `minidepth parity` (its `[parity]` extra installs them; it imports them
# inside functions and says how to install them when they are missing -- see tests/test_parity.py)
RUNS_THE_REFERENCES = {"parity.py"}


def test_no_module_imports_a_reference_library():
    offenders = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if p.name not in RUNS_THE_REFERENCES):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, "\n".join(offenders)


def test_import_with_reference_libraries_blocked():
    """Importing every minidepth module works when the reference libraries cannot be imported at all."""
    modules = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                     for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import sys\n"
            f"for name in {sorted(FORBIDDEN)!r}: sys.modules[name] = None\n"
            "import importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
