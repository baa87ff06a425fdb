"""The modeling code each export carries, so `transformers` alone builds the In-Place TTT model:

    AutoModelForCausalLM.from_pretrained("out/bytes/hf", trust_remote_code=True)

An export (load_hf.save_model) gets modeling_inplace_ttt.py and the project files it imports,
model.py and whatever model.py imports (ttt.py), found by reading their import statements, not
from a list: when model.py comes to import another file of this project, that file travels too.
Each is copied from beside this file at export time with its project imports made relative
(`import ttt` -> `from . import ttt`), since transformers loads remote code as a package.
config.json gains `auto_map`; its `ttt_*` keys and model_type stay as the official release
writes them, so the release's classes still read an export.

What cannot travel is refused before anything is written: a project package (a directory),
`import ttt.sub`, or a module found at run time (importlib, __import__), which no import
statement names.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the project's files: model.py, ttt.py, ...
ENTRY = "modeling_inplace_ttt"  # the file config.json's auto_map names
CLASSES = {"qwen3": "InPlaceTTTQwen3", "llama": "InPlaceTTTLlama"}  # model.py arch -> class stem


def _project(name: str, root: Path) -> bool:
    """Whether a top-level import name is this project's (a file or directory beside model.py)."""
    return (root / f"{name}.py").exists() or (root / name).is_dir()


def _refuse(path: Path, node, what: str):
    raise ValueError(f"{path.name} line {node.lineno}: {what}, which an export cannot carry (it "
                     f"copies single .py files beside {path.name}): the export's modeling code "
                     f"would not import")


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[ast.stmt, str]]:
    """(import statement, project module) for each project module a file imports; anything an
    export cannot carry is refused (ValueError naming the file and line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):  # a module named at run time is invisible to the copy
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                _refuse(path, node, f"{name}() imports a module found at run time")
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.append((node, node.module))  # already relative (the modeling file's own)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if not _project(top, root):
                continue
            if "." in name or not (root / f"{top}.py").is_file():
                _refuse(path, node, f"it imports {name}, a part of the project's package {top}/")
            found.append((node, top))
    return found


def closure(entry: str = ENTRY, root: Path = ROOT) -> list[str]:
    """The project modules `entry` needs, itself first, following import statements."""
    order, todo = [], [entry]
    while todo:
        name = todo.pop(0)
        if name not in order:
            order.append(name)
            todo += [m for _, m in project_imports(root / f"{name}.py", root)]
    return order


def _relative(node, source: str, root: Path) -> str:
    """The text of an import statement with its project modules made relative."""
    if isinstance(node, ast.ImportFrom):  # from ttt import x  ->  from .ttt import x
        return "from ." + ast.get_source_segment(source, node).split("from", 1)[1].lstrip()
    parts = []  # import ttt, math as m  ->  from . import ttt; import math as m
    for a in node.names:
        alias = f" as {a.asname}" if a.asname else ""
        parts.append(f"{'from . ' if _project(a.name, root) else ''}import {a.name}{alias}")
    return "; ".join(parts)


def relative_source(path: Path, root: Path = ROOT) -> str:
    """A project file's text with its imports of project modules made relative."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    # Bottom up, so the positions of the statements still to rewrite do not move.
    nodes = sorted({id(n): n for n, _ in project_imports(path, root)
                    if not getattr(n, "level", 0)}.values(),
                   key=lambda n: (n.lineno, n.col_offset), reverse=True)
    for n in nodes:
        head, tail = lines[n.lineno - 1][:n.col_offset], lines[n.end_lineno - 1][n.end_col_offset:]
        lines[n.lineno - 1:n.end_lineno] = [head + _relative(n, source, root) + tail]
    return "".join(lines)


def write_remote_code(out: Path, arch: str, root: Path = ROOT) -> dict:
    """Write the modeling files into the export directory `out`; returns config.json's auto_map."""
    modules = closure(ENTRY, root)
    for name in modules:
        text = relative_source(root / f"{name}.py", root)
        if name == ENTRY:
            # transformers copies the files a remote module names as `from .name import ...`
            # (dynamic_module_utils.get_relative_imports, a regex), not `from . import name`.
            text += ("\n\n# Written at export (remote_code.py): names every file of this export's "
                     "code for transformers' loader.\n")
            text += "".join(f"from .{m} import __name__ as _  # noqa: E402, F401\n"
                            for m in modules[1:])
        (out / f"{name}.py").write_text(text)
    stem = f"{ENTRY}.{CLASSES[arch]}"
    return {"AutoConfig": f"{stem}Config", "AutoModelForCausalLM": f"{stem}ForCausalLM"}
