"""The docs against the code and against themselves: SPEC.md's configuration table (the only one) against
`config.OPTIONS`, README.md's few common options against it too, SPEC.md's error and exit code tables against
`errors.py`, README's test command against .ci/run, every relative link and anchor in the docs, every repository
file they name, every section a file cites by name, and no citation of files outside the repository.

How a documented default is read (both tables): the default cell starts with the default as a backticked value
(`` `127.0.0.1` ``, `` `0` = the model's limit ``), or with the word `none`, which means the empty string; anything
after that is commentary. In README.md only, a cell starting with `see` (`see SPEC.md`) shows no default.
"""

from __future__ import annotations

import http.server
import inspect
import re
import subprocess
from http import HTTPStatus
from pathlib import Path

import pytest

from openvino_reranker import errors
from openvino_reranker.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
BY_FLAG = {opt.flag: opt for opt in OPTIONS}
BY_ENV = {opt.env: opt for opt in OPTIONS}


# ---- markdown helpers


def docs() -> list[str]:
    """The project's documentation pages, relative to the repository root."""
    pages = ["README.md", "SPEC.md", "ARCHITECTURE.md"]
    pages += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    return pages


DOCS = docs()


# the directory beside the repository that CI has and a user who clones it does not (spelt in two pieces, so
# that this file does not cite it itself)
OUTSIDE = ("shared" + "/reference", "../" + "shared")

def section(doc: str, title: str) -> list[str]:
    """The lines of the level-2 section `## title`, up to the next level-2 heading."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {title}"]
    assert len(starts) == 1, f'{doc}: expected one "## {title}" section, found {len(starts)}'
    rest = lines[starts[0] + 1:]
    end = next((i for i, line in enumerate(rest) if line.startswith("## ")), len(rest))
    return rest[:end]


def split_row(line: str) -> list[str]:
    """A table row's cells; a `|` inside backticks does not split."""
    cells, cell, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    cells.append(cell.strip())
    return cells


def table(lines: list[str], header: list[str]) -> list[list[str]]:
    """The rows of the table with this header: only the contiguous block of `|` lines after the header, as
    markdown renders it (a blank line ends a table; rows after it are not part of it)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and split_row(line) == header]
    assert len(starts) == 1, f"expected one table with header {header}, found {len(starts)}"
    block = []
    for line in lines[starts[0] + 1:]:
        if not line.startswith("|"):
            break
        block.append(line)
    assert block and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", block[0].strip()), f"{header}: no separator row"
    rows = [split_row(line) for line in block[1:]]
    for row in rows:
        assert len(row) == len(header), f"row {row} has {len(row)} cells, the header {len(header)}"
    return rows


def documented_default(cell: str, allow_none_shown: bool = False) -> str | None:
    """The default a cell states: its leading backticked value, or '' for a leading `none`; None when the cell
    points elsewhere (`see ...`, README only)."""
    m = re.match(r"`([^`]*)`", cell)
    if m:
        return m.group(1)
    if re.match(r"none\b", cell):
        return ""
    if allow_none_shown and cell.lower().startswith("see "):
        return None
    raise AssertionError(f"default cell {cell!r} must start with a backticked value or 'none'")


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


# ---- configuration


def test_spec_configuration_table_matches_options():
    lines = section("SPEC.md", "Configuration")
    rows = table(lines, ["flag", "default", "meaning"])
    flags = []
    for flag_cell, default_cell, _ in rows:
        m = re.fullmatch(r"`(--[a-z0-9-]+)`", flag_cell)
        assert m, f"SPEC.md flag cell {flag_cell!r} must be one backticked flag"
        flag = m.group(1)
        assert flag in BY_FLAG, f"SPEC.md documents {flag}, which is not an option"
        assert documented_default(default_cell) == BY_FLAG[flag].default, \
            f"SPEC.md: {flag} default {default_cell!r}, the code's is {BY_FLAG[flag].default!r}"
        flags.append(flag)
    for opt in OPTIONS:
        assert flags.count(opt.flag) == 1, f"SPEC.md lists {opt.flag} {flags.count(opt.flag)} times, not once"
    # A row outside the table (e.g. after a blank line) is not rendered as part of it.
    stray = [line for line in lines if line.startswith("| `--") and split_row(line) not in rows]
    assert not stray, f"SPEC.md has option rows outside the configuration table: {stray}"


# README lists the options most users set, not all of them: the table of every option is SPEC's.
README_MOST_OPTIONS = 12


def test_readme_configuration_table_is_true():
    lines = section("README.md", "Configuration")
    assert any("(SPEC.md#configuration)" in line for line in lines), "README's options must link SPEC's table"
    rows = table(lines, ["flag / variable", "default"])
    seen: dict[str, int] = {}
    for names_cell, default_cell in rows:
        names = backticked(names_cell)
        assert names, f"README.md row {names_cell!r} names no flag or variable"
        by_flag, by_env = set(), set()
        for name in names:
            if name.startswith("--"):
                assert name in BY_FLAG, f"README.md names {name}, which is not an option's flag"
                by_flag.add(BY_FLAG[name].name)
            else:
                assert name in BY_ENV, f"README.md names {name!r}, which is not an option's variable"
                by_env.add(BY_ENV[name].name)
        assert not by_flag or by_env <= by_flag, \
            f"README.md row {names_cell!r}: a variable whose flag is not in the same row"
        named = by_flag | by_env
        default = documented_default(default_cell, allow_none_shown=True)
        if default is not None:  # a row naming several options states one default that holds for each
            for name in sorted(named):
                opt = next(o for o in OPTIONS if o.name == name)
                assert default == opt.default, \
                    f"README.md: {opt.flag} default {default_cell!r}, the code's is {opt.default!r}"
        for name in named:
            seen[name] = seen.get(name, 0) + 1
    twice = [name for name, n in seen.items() if n > 1]
    assert not twice, f"README.md's configuration table names {twice} more than once"
    assert len(seen) <= README_MOST_OPTIONS, \
        f"README.md lists {len(seen)} options; it shows the few most users set and links SPEC.md for the rest"


def test_the_configuration_table_exists_once():
    """No page but SPEC (and README's few common options) has a table of the server's options: one table to keep
    true, not one per page. A table of options is one headed `flag` (or `flag / variable`) or a row naming an
    option's variable; a command's own arguments (`openvino-reranker quantize --model`, `eval --url`) are not."""
    allowed = {("SPEC.md", "Configuration"), ("README.md", "Configuration")}
    found = []
    for doc in DOCS:
        current, header = None, None
        for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("## "):
                current = line[3:].strip()
            if not line.startswith("|"):
                header = None
                continue
            cells = split_row(line)
            if header is None:
                header = cells[0]
                continue
            if (doc, current) in allowed:
                continue
            names = backticked(cells[0])
            if any(name in BY_ENV for name in names) or (
                    header in ("flag", "flag / variable") and any(name in BY_FLAG for name in names)):
                found.append(f"{doc}:{number}: {line[:80]}")
    assert not found, "option rows outside SPEC's configuration table:\n" + "\n".join(found)


# ---- errors


def http_server_statuses() -> set[int]:
    """The statuses http.server itself sends for a request it cannot parse (request line, headers, method)."""
    handler = http.server.BaseHTTPRequestHandler
    source = inspect.getsource(handler.parse_request) + inspect.getsource(handler.handle_one_request)
    return {HTTPStatus[name].value for name in re.findall(r"HTTPStatus\.([A-Z_]+)", source)}


def served_errors() -> set[tuple[int, str]]:
    """(status, type) of every error a client can receive, from the classes in errors.py."""
    pairs = {(errors.ServiceError.status, errors.ServiceError.error_type)}  # a bug: 500 internal
    protocol = getattr(errors, "HttpProtocolError", None)
    # Until HttpProtocolError exists, the stdlib parser's errors are known as "http_error".
    protocol_type = protocol.error_type if protocol else "http_error"
    pairs |= {(status, protocol_type) for status in http_server_statuses()}
    for cls in vars(errors).values():
        if not (isinstance(cls, type) and issubclass(cls, errors.ServiceError)):
            continue
        if cls in (errors.ServiceError, protocol, errors.ClientGoneError):  # 499 is logged, never sent
            continue
        pairs.add((cls.status, cls.error_type))
    return pairs


def test_spec_error_table_matches_error_classes():
    rows = table(section("SPEC.md", "Errors"), ["status", "`type`", "when", "extra headers"])
    documented = []
    for status_cell, type_cell, _, _ in rows:
        m = re.fullmatch(r"`([a-z_]+)`", type_cell)
        assert m, f"SPEC.md error type cell {type_cell!r} must be one backticked type"
        for status in status_cell.split(","):
            assert status.strip().isdigit(), f"SPEC.md error status {status_cell!r}"
            documented.append((int(status), m.group(1)))
    assert len(documented) == len(set(documented)), f"SPEC.md documents an error twice: {documented}"
    code = served_errors()
    assert sorted(code - set(documented)) == [], "errors a client can receive that SPEC.md does not list"
    assert sorted(set(documented) - code) == [], "errors SPEC.md lists that no class in errors.py gives"


# ---- README's test command is CI's


def test_readme_test_command_is_what_ci_runs():
    """README's "Run the tests" command is byte for byte the last line of .ci/run."""
    ci_last = (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip("\n").splitlines()[-1]
    setup = "\n".join(section("README.md", "Setup"))
    commands = [line for line in setup.splitlines() if line.rstrip().endswith("-m pytest")]
    assert commands == [ci_last], f"README's test command {commands} is not .ci/run's last line {ci_last!r}"


# ---- links and citations


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def headings(doc: str) -> list[str]:
    """A page's headings as text, markdown marks removed, fenced code skipped."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return [re.sub(r"[`*]", "", m.group(2)).strip() for m in re.finditer(r"^(#{1,6}) +(.+?) *#*$", text, re.M)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(doc: str) -> set[str]:
    """Every anchor GitHub makes for a page's headings; a repeated heading gets -1, -2, ..."""
    found, seen = set(), {}
    for heading in headings(doc):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def test_slug_rule():
    assert slug("Startup and exit codes") == "startup-and-exit-codes"
    assert slug("POST /rerank with texts (Hugging Face TEI)") == "post-rerank-with-texts-hugging-face-tei"
    assert slug("smoke.py's contract") == "smokepys-contract"
    assert slug("Ranking quality: bf16 against f32") == "ranking-quality-bf16-against-f32"
    assert slug("ms_marco 2") == "ms_marco-2"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    """Every relative link in a page names a file of the repository, and its #anchor, if any, a heading there (or
    in the page itself for a bare #anchor)."""
    text = strip_code((ROOT / doc).read_text(encoding="utf-8"))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    broken = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, file: ...
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / doc).parent / path if path else ROOT / doc
        if not file.resolve().is_relative_to(ROOT) or not file.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(str(file.resolve().relative_to(ROOT))):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc}: broken links:\n" + "\n".join(broken)


# A file of the repository named in backticks: `tests/test_hub.py`, `deploy/haproxy.cfg` (globs and placeholders,
# `tests/fixtures/smoke-*.json`, `<cache dir>/...`, are not names)
REPO_PATH = re.compile(r"`((?:tests|bench|tools|deploy|docs|openvino_reranker|\.ci)/[^`\s*<>{}]+)`")


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_repository_file_exists(doc):
    """A file the docs name in backticks exists (tests are renamed, modules split: the docs must follow)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = sorted({path for path in REPO_PATH.findall(text) if not (ROOT / path).exists()})
    assert not missing, f"{doc} names files that do not exist: {missing}"


# A section named in prose or in code, as `SPEC.md, "Compile cache"` or `see docs/models.md, "Export a model
# yourself"`: the file and then the heading's text in quotes.
CITATION = re.compile(r"\b((?:docs/[a-z_-]+|README|SPEC|ARCHITECTURE)(?:\.md)?),? (?:\\?\")([^\"\\\n]+)\\?\"")


def test_every_cited_section_exists():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    texts = [f for f in files if f.endswith((".md", ".py", ".cfg", ".service")) or f == ".ci/run"]
    titles = {doc: {h.lower() for h in headings(doc)} for doc in DOCS}
    found = []
    for name in texts:
        path = ROOT / name
        if not path.is_file() or name == "tests/test_docs.py":
            continue
        # a citation may wrap: join the lines, dropping comment marks and indentation, and in code the quotes
        # between string literals that continue one another ("... (see docs/models.md, "  f"\"Export ...)
        text = re.sub(r"\s*\n\s*(?:#+ )?", " ", path.read_text(encoding="utf-8"))
        if name.endswith(".py"):
            text = re.sub(r"\"\s+[rbf]*\"", "", text)
        for cited, title in CITATION.findall(text):
            doc = cited if cited.endswith(".md") else f"{cited}.md"
            if doc not in titles:
                found.append(f"{name}: {cited}, \"{title}\": no such page")
            elif title.strip().lower() not in titles[doc]:
                found.append(f"{name}: {cited}, \"{title}\": no such heading in {doc}")
    assert not found, "sections cited that do not exist:\n" + "\n".join(found)


# ---- the repository stands alone


def test_no_citation_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    texts = [f for f in files if f.endswith((".md", ".py")) and f != "tests/test_docs.py"]
    assert "README.md" in texts and "SPEC.md" in texts
    found = []
    for name in texts:
        path = ROOT / name
        if not path.is_file():  # tracked but deleted in the working tree
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(cited in line for cited in OUTSIDE):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "files outside the repository are cited:\n" + "\n".join(found)


@pytest.mark.parametrize("cell, expected", [
    ("`127.0.0.1`", "127.0.0.1"), ("`0` = the model's limit", "0"), ("none", ""),
    ("none (open on loopback)", ""), ("`NPU` (`CPU`, `GPU`)", "NPU"),
])
def test_documented_default_rule(cell, expected):
    assert documented_default(cell) == expected


def test_documented_default_rule_rejects_ambiguous_cells():
    for cell in ("0 = the model's limit", "OpenVINO decides", "see SPEC.md"):
        with pytest.raises(AssertionError):
            documented_default(cell)
    assert documented_default("see SPEC.md", allow_none_shown=True) is None
