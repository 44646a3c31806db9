"""The front door and the pages behind it: the module map names the package's modules, no link is broken,
the README stays short and names the public API, and every measurement says how and when it was taken.

Text only (no torch, no training), so it belongs to the unit layer.
"""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "transferlab"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
MODULES = ROOT / "docs" / "modules.md"
PAGES = [README, BENCHMARKS, MODULES]


def package_modules() -> list[str]:
    """Every module of the package as the map names it: `data/` for a subpackage, `data/index.py` for a module."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if "__pycache__" in rel.parts:
            continue
        if rel.name == "__init__.py" and rel.parent != Path("."):
            names.append(f"{rel.parent.as_posix()}/")
        else:
            names.append(rel.as_posix())
    return names


def map_rows() -> list[tuple[str, str]]:
    """The module map's table rows: (module, its one job)."""
    return re.findall(r"^\| `([^`]+)` \| (.*?) \|$", MODULES.read_text(), flags=re.M)


def test_the_module_map_names_every_module_and_only_those():
    mapped = [name for name, _ in map_rows()]
    actual = package_modules()
    assert len(mapped) == len(set(mapped)), "a module is named twice in docs/modules.md"
    assert not set(actual) - set(mapped), f"missing from docs/modules.md: {sorted(set(actual) - set(mapped))}"
    assert not set(mapped) - set(actual), f"not in src/transferlab: {sorted(set(mapped) - set(actual))}"
    assert all(job.strip() for _, job in map_rows())


def test_the_module_map_lists_each_subpackage_with_its_modules_after_it():
    mapped = [name for name, _ in map_rows()]
    for i, name in enumerate(mapped):
        if "/" in name.rstrip("/"):
            package = name.split("/")[0] + "/"
            assert package in mapped[:i], f"{name} comes before its subpackage {package}"
            between = mapped[mapped.index(package) + 1 : i]
            assert all(n.startswith(package) for n in between), f"{name} is not grouped under {package}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links inside code are not links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_link_of_the_readme_and_docs_resolves():
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+://|mailto:", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name}: {link} does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {target}"


def test_the_readme_leads_to_the_docs_and_they_lead_back():
    assert {"docs/benchmarks.md", "docs/modules.md", "docs/guide.md"} <= set(_links(README))
    for page in (BENCHMARKS, MODULES):
        assert "../README.md" in _links(page), f"{page.name} has no link back to the README"


def test_the_readme_is_a_front_door_not_a_lab_notebook():
    lines = README.read_text().splitlines()
    assert len(lines) <= 185, f"README.md has {len(lines)} lines; measurements and details belong in docs/"
    assert not [line for line in lines if line.startswith("|")], "tables of figures belong in docs/benchmarks.md"


def test_the_readme_names_every_public_name():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    public = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    text = README.read_text()
    missing = [name for name in public if f"`{name}`" not in text and f"{name}(" not in text]
    assert not missing, f"public names the README does not mention: {missing}"


def test_every_benchmark_table_says_how_and_when_it_was_measured():
    sections = re.split(r"^#+ ", BENCHMARKS.read_text(), flags=re.M)[1:]
    tables = 0
    for section in sections:
        if not re.search(r"^\|---", section, flags=re.M):
            continue
        tables += len(re.findall(r"^\|---", section, flags=re.M))
        title = section.splitlines()[0]
        if "Published:" in section:
            continue
        assert re.search(r"20\d\d-\d\d-\d\d", section), f"{title}: no date"
        assert re.search(r"\b[0-9a-f]{7}\b", section), f"{title}: no commit"
        assert re.search(r"`(benchmarks/|transferlab )[^`]+`", section), f"{title}: no command"
    assert tables >= 10


def test_the_guide_reports_means_and_intervals_it_can_stand_behind():
    """The guide's figures: a row's mean over seeds, its difference from the default with a 95 % interval over
    every validation image of every seed, and "beyond_noise" only when that interval leaves out zero."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_guide", ROOT / "docs" / "make_guide.py")
    guide = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guide)

    def row(model, acc, seconds=10.0):
        return {"model": model, "val_accuracy_best": acc, "train_seconds": seconds, "best_epoch": 1}

    study = {"ablation": "recipe", "options": ["--epochs", "2", "--fine-tune-epochs", "3"], "seeds": [0, 1],
             "images": {"train": 300, "val": 200},
             "rows": {0: [row("default", 0.90), row("from_scratch", 0.60), row("no_augmentation", 0.89)],
                      1: [row("default", 0.92), row("from_scratch", 0.64), row("no_augmentation", None)]}}  # fmt: skip
    rows = {r["row"]: r for r in guide.summary(study)}
    assert rows["default"]["accuracy"] == "0.910" and rows["default"]["per_seed"] == "0.900 / 0.920"
    assert "vs_default" not in rows["default"]
    half = 1.96 * ((0.62 * 0.38 + 0.91 * 0.09) / 400) ** 0.5  # two proportions, 200 images x 2 seeds each
    scratch, plain = rows["from_scratch"], rows["no_augmentation"]
    assert scratch["vs_default"] == f"-0.290 ± {half:.3f}" and scratch["beyond_noise"] == "yes"
    assert scratch["meaning"] == "random weights, every layer trained for the same 5 epochs"
    # a failed seed counts for nothing, in the mean and in the interval; 0.89 against 0.91 is inside it
    half = 1.96 * ((0.89 * 0.11) / 200 + (0.91 * 0.09) / 400) ** 0.5
    assert plain["accuracy"] == "0.890" and plain["vs_default"] == f"-0.020 ± {half:.3f}"
    assert plain["beyond_noise"] == "no"
