import re
from pathlib import Path

from gptoss import get_preset
from gptoss.config import format_param_table

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_doc_parameter_table_matches_the_config_code():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = re.search(r"<!-- param-table:gpt-oss-20b -->\n(.*?)\n<!-- /param-table -->", doc, re.S)
    assert table, "docs/architecture.md lost its parameter table markers"
    assert table[1] == format_param_table(get_preset("gpt-oss-20b"), markdown=True)


def test_architecture_doc_memory_table_matches_the_memory_model():
    from gptoss.train.memory import memory_table

    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = re.search(r"<!-- memory-table -->\n(.*?)\n<!-- /memory-table -->", doc, re.S)
    assert table, "docs/architecture.md lost its memory table markers"
    assert table[1] == memory_table(2048)


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_front_page():
    # what it is, the two commands, each part with an example, one table of results, where to read next;
    # run histories and analyses live in docs/results.md and docs/log.md
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for doc in ("docs/guide.md", "docs/results.md", "docs/log.md", "docs/architecture.md"):
        assert f"`{doc}`" in readme, doc


def test_every_path_the_docs_name_exists():
    # a path into the repository written in the README or docs/ (`gptoss/...`, `kernels/...`, ...)
    # names a file or folder that is there; a bare `name.py` is a file somewhere in the repository
    tops = ("gptoss/", "kernels/", "train/", "tests/", "benchmarks/", "docs/", ".ci/")
    # folders the repository ignores are where runs write (benchmarks/results/): named, not shipped
    ignored = tuple(
        line.strip().lstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if "/" in line.strip()
    )
    files = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for token in re.findall(r"`([^`\s]+)`", doc.read_text()):
            path = token.split("::")[0].rstrip(".,:")
            if path.startswith(ignored):
                continue
            if path.startswith(tops):
                if not (ROOT / path.split(" ")[0]).exists():
                    missing.append(f"{doc.name}: {token}")
            elif re.fullmatch(r"[a-z_]+\.py", path) and path not in files:
                missing.append(f"{doc.name}: {token}")
    assert not missing, missing
