import ast
from pathlib import Path

import pytest

import load_hf

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_load_hf_never_imports_train():
    assert "load_hf" in imported_modules(ROOT / "train.py")
    assert "train" not in imported_modules(ROOT / "load_hf.py")


def test_export_of_a_directory_without_train_json_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a complete checkpoint of train.py"):
        load_hf.main(["export", str(tmp_path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
