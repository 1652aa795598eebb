"""Package-level guarantees: the runtime never imports the reference libraries, and imports run one way, down the
layers of ../shared/reference/architecture.md (declared in LAYERS below; every import counts, inside functions too)."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minidepth"
FORBIDDEN = {"diffusers", "transformers", "open_clip", "accelerate", "peft", "scipy"}
# the one module meant to run the references: `minidepth parity` (its `[parity]` extra installs them; it imports them
# inside functions and says how to install them when they are missing -- see tests/test_parity.py)
RUNS_THE_REFERENCES = {"tool.py", "drill.py"}  # minidepth/parity/


def test_no_module_imports_a_reference_library():
    offenders = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if not (p.parent.name == "parity" and p.name in RUNS_THE_REFERENCES)):
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


# ------------------------------------------------------------------------------------------------ layers
# Lowest first. A module imports only from its own layer or below; every module of the package is in exactly one layer
# (a new module must be placed here). `minidepth` itself (__init__.py: __version__ and lazily imported public names)
# is a foundation: it imports nothing at import time.
LAYERS = [
    ("foundations", {"minidepth", "minidepth.tokenizer", "minidepth.noise", "minidepth.fast_kernels",
                     "minidepth.cpu_memory", "minidepth.nnpack", "minidepth.winograd", "minidepth.image_processing",
                     "minidepth.image_files", "minidepth.dpt_processing", "minidepth.console"}),
    ("models, schedulers", {"minidepth.models", "minidepth.schedulers"}),
    ("checkpoints, adapters, depth", {"minidepth.checkpoints", "minidepth.adapters", "minidepth.depth"}),
    ("pipeline", {"minidepth.pipeline", "minidepth.pipeline_io", "minidepth.pipeline_switches", "minidepth.ldm_mode",
                  "minidepth.observers", "minidepth.generation"}),
    ("study tools, training, parity", {"minidepth.inside", "minidepth.train", "minidepth.parity"}),
    ("front ends", {"minidepth.cli", "minidepth.__main__"}),
]


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (a package by its own name, from its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> list[tuple[int, str]]:
    """(line, module of ours) for every import in the file, at any depth (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "minidepth"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "minidepth":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else target))
    return [(line, target) for line, target in found if target != name]


def _layer(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{name} is in no layer of LAYERS (tests/test_package.py): place it")


def test_imports_run_down_the_layers():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for line, target in _imports(name, path, modules):
            if _layer(target) > _layer(name):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({LAYERS[_layer(name)][0]}) "
                                 f"imports {target} ({LAYERS[_layer(target)][0]})")
    assert not offenders, "imports against the layers:\n" + "\n".join(offenders)


def test_no_import_circles():
    modules = _modules()
    graph = {name: sorted({t for _, t in _imports(name, path, modules) if t in modules})
             for name, path in modules.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_models_import_only_torch_einops_noise_and_models():
    """A model file is the architecture: nothing of ours but models/ and noise, no library but torch and einops
    (xformers: the optional attention backend, imported only when asked for)."""
    allowed_libraries = {"torch", "einops", "xformers"}
    modules = _modules()
    offenders = []
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] not in allowed_libraries | set(sys.stdlib_module_names)]
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        offenders += [f"{path.name}:{line} imports {target}" for line, target in _imports(name, path, modules)
                      if not (target.startswith("minidepth.models") or target == "minidepth.noise")]
    assert not offenders, "\n".join(offenders)


def test_nothing_outside_cli_imports_the_front_ends():
    modules = _modules()
    offenders = [f"{name} imports {target}" for name, path in modules.items() if not name.startswith("minidepth.cli")
                 and name != "minidepth.__main__" for _, target in _imports(name, path, modules)
                 if target == "minidepth.cli" or target.startswith("minidepth.cli.")]
    assert not offenders, "\n".join(offenders)


def test_loading_without_the_checkpoint_side_says_what_to_import(tmp_path):
    """Model files never import checkpoints/; `UNet.from_pretrained` before anything imported it says what to do, and
    `from minidepth import UNet` (the public name) brings it along."""
    code = ("import sys\n"
            "from minidepth.models.unet import UNet\n"
            "try:\n"
            f"    UNet.from_pretrained({str(tmp_path)!r})\n"
            "except RuntimeError as e:\n"
            "    print('error:', e)\n"
            "from minidepth import UNet as PublicUNet\n"
            "assert PublicUNet is UNet\n"
            "try:\n"
            f"    UNet.from_pretrained({str(tmp_path)!r})\n"
            "except FileNotFoundError as e:\n"
            "    print('now:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "error: UNet: loading and saving weights lives in minidepth.checkpoints" in out.stdout, out.stderr[-2000:]
    assert "now: config file not found" in out.stdout, out.stdout + out.stderr[-2000:]
