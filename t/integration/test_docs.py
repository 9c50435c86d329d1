"""The administrator documentation keeps up with the code. No server needed.

- every directive of the command table (msoauth_cmds in mod_msoauth_config.c)
  has a heading "### NAME" in docs/directives.md ("### <MSOAuthCompany>" for
  the section) and is mentioned in the shipped sample conf/msoauth.conf;
- every reason code of lib/mso_reason.c's table has a heading "### code" in
  docs/reasons.md, and its section names the reason's HTTP status;
- every page listed in docs/README.md exists, and the index lists every page.
"""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def directives():
    """The names of the command table, in order ("<MSOAuthCompany" included)."""
    src = (REPO / "mod_msoauth_config.c").read_text()
    table = src[src.index("msoauth_cmds[]"):]
    table = table[:table.index("{NULL}")]
    names = re.findall(r'AP_INIT_[A-Z0-9_]+\(\s*"(<?MSOAuth[A-Za-z0-9]+)"', table)
    assert names, "no AP_INIT_*(\"MSOAuth...\") entries found in msoauth_cmds"
    return names


def reasons():
    """(code, status) of each entry of lib/mso_reason.c's table."""
    src = (REPO / "lib" / "mso_reason.c").read_text()
    table = src[src.index("reasons[] = {"):]
    table = table[:table.index("{NULL, 0")]
    found = re.findall(r'\{\s*"([a-z0-9_]+)",\s*(\d{3}),', table)
    assert found, "no reason entries found in lib/mso_reason.c"
    return found


def headings(path):
    return {line[4:].strip() for line in path.read_text().splitlines()
            if line.startswith("### ")}


def sections(path):
    """Heading text -> the text up to the next heading of level 3 or less."""
    out, name, buf = {}, None, []
    for line in path.read_text().splitlines():
        if re.match(r"#{1,3} ", line):
            if name is not None:
                out[name] = "\n".join(buf)
            name = line[4:].strip() if line.startswith("### ") else None
            buf = []
        else:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def heading_of(name):
    return f"{name}>" if name.startswith("<") else name


def test_command_table_parsed():
    names = directives()
    assert "MSOAuthClientID" in names and "MSOAuthTokenKeyFile" in names
    assert len(names) == len(set(names)), "a directive is listed twice in msoauth_cmds"


def test_every_directive_has_a_heading():
    have = headings(DOCS / "directives.md")
    missing = [n for n in directives() if heading_of(n) not in have]
    assert not missing, f"docs/directives.md lacks '### NAME' headings for: {missing}"


def test_every_directive_is_in_the_sample():
    conf = (REPO / "conf" / "msoauth.conf").read_text()
    missing = [n for n in directives()
               if not re.search(r"(?<![A-Za-z0-9])" + re.escape(n) + r"(?![A-Za-z0-9])", conf)]
    assert not missing, f"conf/msoauth.conf does not mention: {missing}"


def test_every_reason_is_documented_with_its_status():
    secs = sections(DOCS / "reasons.md")
    missing = [c for c, _ in reasons() if c not in secs]
    assert not missing, f"docs/reasons.md lacks '### code' headings for: {missing}"
    wrong = [f"{c} ({s})" for c, s in reasons() if not re.search(r"\b" + s + r"\b", secs[c])]
    assert not wrong, f"docs/reasons.md does not give the HTTP status of: {wrong}"


@pytest.mark.parametrize("page", ["directives.md", "handlers.md", "tables.md", "reasons.md",
                                  "operations.md", "applications.md", "security.md"])
def test_index_lists_every_page(page):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"
    assert f"({page})" in (DOCS / "README.md").read_text(), f"docs/README.md does not link {page}"

