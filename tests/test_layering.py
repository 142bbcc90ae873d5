"""The rooms' rules, enforced: a forbidden import anywhere (function-level ones included) fails.

- parallel/ is a library: it never imports pretrain/ or tokenizer/;
- a model (pretrain/models/<family>/model.py and config.py) never imports parallel/ or the
  objective (pretrain.diffusion, pretrain.step): parallelism and losses are applied from outside;
- the tokenizer never imports the model; of the application it uses only the leaf modules
  pretrain.errors and pretrain.files;
- the sampler never imports the training loop or the training step;
- the training loop never imports reporting (sweeps, scoring, quality, the end-of-run report).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("parallel", "pretrain", "tokenizer")
REPORTING = ("pretrain.report", "pretrain.sweep", "pretrain.scoring", "pretrain.quality")
RULES = [
    # (who, forbidden prefixes, allowed exceptions)
    (lambda m: m.startswith("parallel"), ("pretrain", "tokenizer"), ()),
    (lambda m: m.startswith("pretrain.models.") and m.rsplit(".", 1)[-1] in ("model", "config"),
     ("parallel", "pretrain.diffusion", "pretrain.step"), ()),
    (lambda m: m.startswith("tokenizer"), ("pretrain",), ("pretrain.errors", "pretrain.files")),
    (lambda m: m == "pretrain.sampler", ("pretrain.train", "pretrain.step"), ()),
    (lambda m: m == "pretrain.train", REPORTING, ()),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_edges(root: Path) -> list[str]:
    """'module -> import' for every import that breaks a rule, over the packages under `root`."""
    edges = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            for who, forbidden, allowed in RULES:
                if not who(module):
                    continue
                for name in sorted(imports(path)):
                    if any(_within(name, f) for f in forbidden) and not any(_within(name, a) for a in allowed):
                        edges.append(f"{module} -> {name}")
    return edges


def test_the_tree_keeps_the_rules():
    assert forbidden_edges(ROOT) == []


def test_a_forbidden_import_is_caught(tmp_path):
    """The checker itself: one deliberate breach of each rule, one of them inside a function."""
    files = {
        "parallel/mesh.py": "from pretrain.config import RunConfig\n",
        "pretrain/models/dit/model.py": "def f():\n    from parallel.tensor import vocab_argmax\n",
        "tokenizer/shard.py": "import pretrain.models.dit.model\nfrom pretrain.errors import UserError\n",
        "pretrain/sampler.py": "from pretrain import train\n",
        "pretrain/train.py": "from pretrain.report import write_sample_report\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert forbidden_edges(tmp_path) == [
        "parallel.mesh -> pretrain.config", "parallel.mesh -> pretrain.config.RunConfig",
        "pretrain.models.dit.model -> parallel.tensor", "pretrain.models.dit.model -> parallel.tensor.vocab_argmax",
        "pretrain.sampler -> pretrain.train",
        "pretrain.train -> pretrain.report", "pretrain.train -> pretrain.report.write_sample_report",
        "tokenizer.shard -> pretrain.models.dit.model",
    ]
