"""The package's shape: imports point one way (each module imports only modules before it in MODULES), and the
entry point stays thin."""

import ast

import pytest
from support import ROOT

from openvino_reranker import MODULES

PACKAGE = ROOT / "openvino_reranker"


def package_imports(path) -> set[str]:
    """Modules of this package that a file imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.startswith("openvino_reranker."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("openvino_reranker.")}
    return found


def test_every_module_is_listed_once():
    files = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(MODULES) == files and len(set(MODULES)) == len(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_one_way(module):
    earlier = set(MODULES[:MODULES.index(module)])
    imported = package_imports(PACKAGE / f"{module}.py")
    assert imported <= earlier, f"{module} imports {sorted(imported - earlier)}, which come after it in MODULES"



def test_the_wire_depends_only_on_errors_config_and_scoring():
    """api.py parses requests and dialects.py renders their answers: neither may reach into the model, the engine or
    the startup checks (what /readyz reports is rendered by service.py). From images api.py takes only the magic
    bytes of PNG and JPEG (`image_format`): an image document is sniffed on the wire, never decoded."""
    assert package_imports(PACKAGE / "api.py") <= {"errors", "config", "scoring", "images"}
    assert package_imports(PACKAGE / "dialects.py") <= {"errors", "scoring", "api"}
    tree = ast.parse((PACKAGE / "api.py").read_text())
    from_images = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "images"
                   for a in n.names}
    assert from_images <= {"image_format"}

def test_no_module_shadows_a_stdlib_name():
    import sys

    assert not set(MODULES) & set(sys.stdlib_module_names)


def test_server_py_is_only_the_entry_point():
    tree = ast.parse((ROOT / "server.py").read_text())
    assert package_imports(ROOT / "server.py") == {"startup"}
    assert sum(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body) == 0


def test_architecture_maps_every_module():
    doc = (ROOT / "ARCHITECTURE.md").read_text()
    section = doc[doc.index("## Modules"):]
    section = section[:section.index("\n## ")]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    named = {name.strip("` ") for line in table for name in line.split("|")[1].split(",")}
    assert named == set(MODULES)


def test_what_the_service_uses_of_a_model_head_is_declared_on_model_head():
    """Outside encoding.py a head is used only through what ModelHead declares (a method, or an attribute with its
    annotation), so that a new head knows what it must provide."""
    import re

    from openvino_reranker.encoding import ModelHead

    declared = set(dir(ModelHead)) | set(ModelHead.__annotations__)
    users = ("batcher", "reranker", "checks", "parity", "service", "startup", "modeldir")
    used = {name for module in users
            for name in re.findall(r"\bhead\.([a-z_]+)", (PACKAGE / f"{module}.py").read_text())}
    assert used and used <= declared, f"used on a head but not declared on ModelHead: {sorted(used - declared)}"
