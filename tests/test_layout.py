"""The package's shape: imports run one way (no cycle), the CLI is a leaf, remote code imports nothing heavy."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_fastmtp"
# What `save_pretrained` copies into a head repo may import (DESIGN: a repo must load with trust_remote_code alone).
REMOTE_CODE_IMPORTS = {"torch", "transformers", "safetensors", "huggingface_hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """
    The package modules `name` imports when it runs (function bodies included; `if TYPE_CHECKING:` blocks, read only
    by type checkers, excluded), and the other packages it imports.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for block in [node for node in ast.walk(tree) if isinstance(node, ast.If)]:
        if isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.split(".")[0] == "hf_fastmtp":
                while candidate and candidate not in MODULES:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    internal.add(candidate)
            else:
                external.add(candidate.split(".")[0])
    return internal, external


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def test_no_import_cycle():
    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(GRAPH[start]):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        return None

    for name in MODULES:
        # A package's __init__ importing its own submodules is not a cycle of the code's logic.
        cycle = cycle_from(name, [name])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_cli_imports_the_cli():
    importers = {name for name, targets in GRAPH.items() if any(t.startswith("hf_fastmtp.cli") for t in targets)}
    assert {name for name in importers if not name.startswith("hf_fastmtp.cli")} == set()


def test_the_remote_code_set_imports_only_light_packages():
    decoding = [name for name in MODULES if name.startswith("hf_fastmtp.decoding.")]
    for name in decoding:
        internal, external = imports_of(name)
        assert all(target.startswith("hf_fastmtp.decoding.") for target in internal), (name, internal)
        heavy = external - REMOTE_CODE_IMPORTS - set(sys.stdlib_module_names) - {"__future__"}
        assert heavy == set(), (name, heavy)


# Imports each module in a child forked from one fresh interpreter holding only third-party packages, none of this
# package: each module then imports alone, as in its own interpreter, without loading torch and Transformers each time.
IMPORT_EACH_ALONE = """
import json, os, sys, traceback
import accelerate, datasets, huggingface_hub, safetensors, torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
failures = {}
for name in json.loads(sys.argv[1]):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            __import__(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc()[-2000:].encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as message:
        error = message.read()
    if os.wait()[1] != 0:
        failures[name] = error or "the import crashed the interpreter"
print(json.dumps(failures))
"""


def import_each_alone(names: list[str]) -> dict[str, str]:
    """Module name -> the error of importing it alone, for those that fail."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    command = [sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(names)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    return import_each_alone(sorted(MODULES))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_alone(name, import_failures):
    assert name not in import_failures, import_failures.get(name)


def test_the_import_check_sees_a_failing_import():
    failures = import_each_alone(["hf_fastmtp.no_such_module", "hf_fastmtp"])
    assert (
        list(failures) == ["hf_fastmtp.no_such_module"]
        and "ModuleNotFoundError" in failures["hf_fastmtp.no_such_module"]
    )
