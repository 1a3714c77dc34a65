"""The documentation stays true: a short README, no citations of a file that does not exist,
relative links and anchors that resolve, and a docs/cli.md that names every flag of `--help`."""

import re
from pathlib import Path

import click

from cnm.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_MAX_LINES = 300
MISSING_FILE = "DESIGN" + ".md"   # spelled in two parts so that this file does not cite it
CODE_DIRS = ("cnm", "pipeline", "trainer", "bench")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".yml", ".yaml"}
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", ".pytest_cache", ".ruff_cache"}
SKIP_TOP = {"data", "runs", "build", "dist"}   # prepared data and run directories in a checkout
# Anchors that code docstrings link to (docs/design.md#...); they must keep existing.
DESIGN_ANCHORS = ("this-projects-formulation", "cutnmix-views", "the-batch-contract", "peers",
                  "losses", "the-teacher", "the-recipe", "the-train-step", "speed-design",
                  "cuda-graphs", "no-host-sync", "randomness-and-reproducibility")


FENCE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)   # a fenced code block


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _text_files(top: Path) -> list[Path]:
    out = []
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(ROOT).parts
        if rel[0] in SKIP_TOP or any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or rel == (".ci", "run")):
            out.append(path)
    return out


def _strip_code(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _broken_link(source: Path, target: str) -> str | None:
    """Why `target` (a link in `source`) does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: ...
        return None
    file_part, _, anchor = target.partition("#")
    dest = (source.parent / file_part).resolve() if file_part else source
    if not dest.exists():
        return f"{file_part}: no such file"
    if anchor:
        if dest.suffix != ".md":
            return f"#{anchor} on a file that is not Markdown"
        if anchor not in _anchors(dest):
            return f"{dest.relative_to(ROOT)} has no heading #{anchor}"
    return None


def test_readme_is_a_first_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_the_docs_exist():
    for name in ("design", "cli", "performance", "distributed", "api"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


def test_design_anchors_that_code_links_to_exist():
    missing = sorted(set(DESIGN_ANCHORS) - _anchors(DOCS / "design.md"))
    assert not missing, f"docs/design.md lacks the headings {missing}"


def test_readme_docs_and_tests_do_not_cite_the_missing_design_file():
    files = _markdown_files() + _text_files(ROOT / "tests") + [ROOT / "setup.sh", ROOT / "pyproject.toml"]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.exists()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if MISSING_FILE in line]
    assert not hits, f"{MISSING_FILE} does not exist; cited at {hits} (link a docs/ section instead)"


def test_code_does_not_cite_the_missing_design_file():
    files = [p for d in CODE_DIRS for p in _text_files(ROOT / d)]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if MISSING_FILE in line]
    assert not hits, f"{MISSING_FILE} does not exist; cited at {hits} (link a docs/ section instead)"


def test_relative_links_and_anchors_resolve():
    broken = []
    for md in _markdown_files():
        for m in re.finditer(r"\]\(([^)\s]+)\)", _strip_code(md.read_text(encoding="utf-8"))):
            why = _broken_link(md, m.group(1))
            if why:
                broken.append(f"{md.relative_to(ROOT)}: ({m.group(1)}): {why}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_links_in_code_resolve():
    """Docstrings link `docs/<name>.md#<anchor>`; every such link must name a real file and heading."""
    broken = []
    for p in [p for d in (*CODE_DIRS, "tests") for p in _text_files(ROOT / d)]:
        for m in re.finditer(r"docs/([\w-]+\.md)(#[\w-]+)?", p.read_text(encoding="utf-8")):
            why = _broken_link(ROOT / "README.md", f"docs/{m.group(1)}{m.group(2) or ''}")
            if why:
                broken.append(f"{p.relative_to(ROOT)}: {m.group(0)}: {why}")
    assert not broken, "broken docs links in code:\n" + "\n".join(broken)


def _commands():
    """(name, command, context) of `cnm` and every subcommand, as `--help` sees them."""
    def walk(cmd, path, parent):
        ctx = click.Context(cmd, info_name=path[-1], parent=parent)
        yield " ".join(path), cmd, ctx
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), [*path, name], ctx)

    return list(walk(cli, ["cnm"], None))


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## {re.escape(heading)} *\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    return m.group(1) if m else ""


def _table_row(param: click.Option, ctx: click.Context) -> str:
    """The docs/cli.md table row of an option, from the text `--help` prints for it."""
    opts, help_text = param.get_help_record(ctx)
    return f"| `{opts.replace('|', chr(92) + '|')}` | {' '.join(help_text.split()).replace('|', chr(92) + '|')} |"


def test_cli_doc_names_every_flag_of_every_command():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []
    for name, cmd, ctx in _commands():
        section = text if name == "cnm" else _section(text, name)
        if not section:
            missing.append(f"no section '## {name}'")
            continue
        for param in cmd.params:
            if isinstance(param, click.Option):
                for flag in [o for o in param.opts + param.secondary_opts if o.startswith("--")]:
                    if not re.search(rf"{re.escape(flag)}(?![\w-])", section):
                        missing.append(f"## {name}: {_table_row(param, ctx)}")
                        break
    assert not missing, "docs/cli.md lacks these flags (rows as --help gives them):\n" + "\n".join(missing)
