"""The paper's bibliography: every citation resolves, and every entry carries enough metadata.

Rules checked on paper/refs.bib and every .tex file under paper/ (build outputs excluded):
- every key cited with a natbib command (\\cite, \\citep, \\citet, \\citeauthor, \\nocite, ...)
  has an entry in refs.bib, and no key is defined twice;
- every entry has a non-empty author, title and four-digit year, and something that says where
  the work appeared: a venue (journal, booktitle, institution, school, publisher, howpublished,
  organization) or a locator (url, eprint, doi);
- an eprint field is an arXiv identifier (YYMM.NNNNN) and a doi starts with "10.".

The bib parser is deliberately small: it reads BibTeX's @type{key, field = {...} | "..." | word}
syntax with nested braces, which is all refs.bib uses, and raises on anything else rather than
skipping it.
"""

import re
from pathlib import Path

import pytest

PAPER = Path(__file__).resolve().parents[1] / "paper"
BIB = PAPER / "refs.bib"

VENUE_FIELDS = ("journal", "booktitle", "institution", "school", "publisher", "howpublished",
                "organization")
LOCATOR_FIELDS = ("url", "eprint", "doi")
# A cite command, its optional star and up to two optional [..] arguments, then {key, key}.
CITE = re.compile(r"\\(?:[cC]ite[a-zA-Z]*|nocite)\*?(?:\[[^\]]*\]){0,2}\{([^}]*)\}")
ENTRY_START = re.compile(r"@([A-Za-z]+)\s*\{\s*([^,\s]+)\s*,")
FIELD_NAME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*")
ARXIV_ID = re.compile(r"^\d{4}\.\d{4,5}(v\d+)?$")


def _braced(text: str, start: int) -> tuple[str, int]:
    """Return the contents of the brace group opening at text[start] and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    raise ValueError(f"unbalanced braces from offset {start}")


def parse_bib(text: str) -> dict[str, dict[str, str]]:
    """Parse BibTeX entries into {key: {field: value, "ENTRYTYPE": type}}.

    Comments (lines starting with %) are ignored. A duplicate key or a field that is neither
    braced, quoted nor a bare word/number raises ValueError naming the entry.
    """
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("%"))
    entries: dict[str, dict[str, str]] = {}
    pos = 0
    while (match := ENTRY_START.search(text, pos)) is not None:
        entry_type, key = match.group(1).lower(), match.group(2)
        if key in entries:
            raise ValueError(f"duplicate bib key {key!r}")
        body, pos = _braced(text, text.index("{", match.start()))
        fields: dict[str, str] = {"ENTRYTYPE": entry_type}
        cursor = body.index(",") + 1
        while cursor < len(body):
            name = FIELD_NAME.match(body, cursor)
            if name is None:
                if body[cursor:].strip(" \t\n,") == "":
                    break
                raise ValueError(f"entry {key!r}: cannot parse fields at {body[cursor:][:40]!r}")
            field, cursor = name.group(1).lower(), name.end()
            if body[cursor] == "{":
                value, cursor = _braced(body, cursor)
            elif body[cursor] == '"':
                end = body.index('"', cursor + 1)
                value, cursor = body[cursor + 1:end], end + 1
            else:
                word = re.match(r"[A-Za-z0-9_.-]+", body[cursor:])
                if word is None:
                    raise ValueError(f"entry {key!r}: bad value for field {field!r}")
                value, cursor = word.group(0), cursor + word.end()
            fields[field] = " ".join(value.split())
            rest = body[cursor:].lstrip()
            if rest and not rest.startswith(","):
                raise ValueError(f"entry {key!r}: unexpected {rest[:20]!r} after field {field!r}")
            cursor = len(body) - len(rest) + 1
        entries[key] = fields
    return entries


def entry_problems(key: str, fields: dict[str, str]) -> list[str]:
    """Return what is missing or malformed in one entry (empty when the entry is complete)."""
    problems = [f"{key}: no {name}" for name in ("author", "title") if not fields.get(name)]
    if not re.fullmatch(r"\d{4}", fields.get("year", "")):
        problems.append(f"{key}: year {fields.get('year')!r} is not a four-digit year")
    if not any(fields.get(name) for name in VENUE_FIELDS + LOCATOR_FIELDS):
        problems.append(f"{key}: no venue ({', '.join(VENUE_FIELDS)}) and no url/eprint/doi")
    if "eprint" in fields and not ARXIV_ID.match(fields["eprint"]):
        problems.append(f"{key}: eprint {fields['eprint']!r} is not an arXiv identifier")
    if "doi" in fields and not fields["doi"].startswith("10."):
        problems.append(f"{key}: doi {fields['doi']!r} does not start with 10.")
    return problems


def cited_keys(tex: str) -> set[str]:
    """Keys cited in a LaTeX source; % comments are ignored (an escaped \\% is kept)."""
    tex = re.sub(r"(?<!\\)%.*", "", tex)
    return {key.strip() for group in CITE.findall(tex) for key in group.split(",") if key.strip()}


def paper_sources() -> list[Path]:
    """Every .tex file of the paper, excluding LaTeX build outputs."""
    return sorted(p for p in PAPER.rglob("*.tex") if "build" not in p.relative_to(PAPER).parts)


# --- the checker catches what it should (so the checks on the real paper can fail) ------------

def test_parser_reads_nested_braces_quotes_and_words():
    entries = parse_bib(
        "% a comment @misc{ignored,}\n"
        "@InProceedings{a1,\n  author = {A. {\\'E}cole and B. Two},\n"
        '  title = "T {GPU}",\n  year = 2024,\n  month = dec,\n  booktitle = {Conf {X}}\n}\n'
    )
    assert entries == {"a1": {"ENTRYTYPE": "inproceedings", "author": "A. {\\'E}cole and B. Two",
                              "title": "T {GPU}", "year": "2024", "month": "dec",
                              "booktitle": "Conf {X}"}}


def test_parser_rejects_duplicate_keys_and_unbalanced_braces():
    with pytest.raises(ValueError, match="duplicate bib key 'k'"):
        parse_bib("@misc{k, title={a}}\n@misc{k, title={b}}")
    with pytest.raises(ValueError, match="unbalanced"):
        parse_bib("@misc{k, title={a}")
    with pytest.raises(ValueError, match="unexpected '# {b}'"):
        parse_bib("@misc{k, title={a} # {b}}")


@pytest.mark.parametrize("fields, expected", [
    ({"title": "T", "year": "2024", "url": "u"}, "k: no author"),
    ({"author": "A", "year": "2024", "url": "u"}, "k: no title"),
    ({"author": "A", "title": "T", "year": "24", "url": "u"}, "k: year '24'"),
    ({"author": "A", "title": "T", "year": "2024"}, "k: no venue"),
    ({"author": "A", "title": "T", "year": "2024", "eprint": "abs/24.1"}, "k: eprint 'abs/24.1'"),
    ({"author": "A", "title": "T", "year": "2024", "doi": "x/1"}, "k: doi 'x/1'"),
])
def test_entry_problems_names_each_missing_piece(fields, expected):
    problems = entry_problems("k", fields)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_complete_entry_has_no_problems():
    fields = {"author": "A", "title": "T", "year": "2024", "eprint": "2402.05099"}
    assert entry_problems("k", fields) == []


def test_cited_keys_handles_variants_options_and_comments():
    tex = (r"\cite{a,b} \citep[p.~2]{c} \citet*{d} \nocite{e} \Cite{f}"
           "\n% \\cite{commented}\n50\\% \\cite{g}")
    assert cited_keys(tex) == {"a", "b", "c", "d", "e", "f", "g"}


# --- the real paper -----------------------------------------------------------------------------

def test_every_cited_key_has_a_bib_entry():
    entries = parse_bib(BIB.read_text(encoding="utf-8"))
    missing = {
        f"{path.relative_to(PAPER)}: {key}"
        for path in paper_sources()
        for key in cited_keys(path.read_text(encoding="utf-8"))
        if key not in entries
    }
    assert not missing, f"cited but not in refs.bib: {sorted(missing)}"


def test_paper_cites_something():
    keys = set().union(*(cited_keys(p.read_text(encoding="utf-8")) for p in paper_sources()))
    assert len(keys) >= 20, f"only {len(keys)} cited keys found: the citation regex is broken"


def test_every_bib_entry_is_complete():
    entries = parse_bib(BIB.read_text(encoding="utf-8"))
    problems = [p for key, fields in entries.items() for p in entry_problems(key, fields)]
    assert not problems, "\n".join(problems)
