"""The repo stays readable: each top-level file one idea a reader can hold. train.py at most 500 lines, every other
top-level file at most 700, no class over 300 lines, no function over 60 but argument parsers."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"build_parser"}  # one line or two per flag: long by nature
PENDING = set()  # (file, function) over the limit, to be split: remove the entry when it is


def sizes():
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        yield path.name, None, len(path.read_text().splitlines())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.name, node, node.end_lineno - node.lineno + 1


def test_file_class_and_function_sizes():
    over = []
    for name, node, n in sizes():
        if node is None:
            limit = 500 if name == "train.py" else 700
        elif isinstance(node, ast.ClassDef):
            limit = 300
        else:
            limit = 10**9 if node.name in PARSERS or (name, node.name) in PENDING else 60
        if n > limit:
            over.append(f"{name}{':' + node.name if node else ''}: {n} lines > {limit}")
    assert not over, over
