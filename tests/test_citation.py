"""Citation and versions: CITATION.cff, CHANGELOG.md and pyproject.toml agree; docs/papers.md holds
a well-formed BibTeX entry for every paper a library module's docstring names.

A docstring names a paper as "Surname YEAR", "Surname et al. YEAR", "Surname, Other, Other YEAR",
"Surname & Other YEAR" or by arXiv id; an entry matches when its first author's surname (the last
word of a corporate author such as {Gemma Team}) is the surname and its year is within one of the
docstring's year (a preprint and its venue may differ by a year), or when its eprint is the id.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("decoding", "drafting", "distill", "alignment")
# Modules that implement a published method: each must name at least one paper.
ALGORITHM_MODULES = (
    "decoding/speculative.py", "decoding/tree.py", "decoding/sampling.py", "decoding/entropy_adaptive.py",
    "decoding/roofline.py", "decoding/kernels/attention.py", "decoding/rope.py", "decoding/llama.py",
    "decoding/gemma3.py", "drafting/shapes.py", "drafting/tree_search.py", "drafting/prompt_lookup.py",
    "distill/distillspec.py", "distill/losses.py", "distill/lora.py", "alignment/nudging.py",
    "drafting/hidden_transfer.py", "distill/hidden_transfer.py",
)
# Capitalised words followed by a year that are venues or products, not authors.
NOT_AUTHORS = {"ACL", "EMNLP", "ICLR", "ICML", "NeurIPS", "MLSys", "ASPLOS", "Llama", "Gemma", "Qwen", "Mistral"}
CITE = re.compile(r"([A-Z][A-Za-z-]+)(?: et al\.)?(?:(?:,| &| and) [A-Z][A-Za-z-]+)*,? \(?((?:19|20)\d\d)\b")
ARXIV = re.compile(r"arXiv[: ]?(\d{4}\.\d{4,5})")
REQUIRED = ("author", "title", "year")
WHERE = ("journal", "booktitle", "howpublished", "eprint", "url")


# ------------------------------------------------------------------------------------------
# A small BibTeX reader (entries of @type{key, field = {value} | "value" | number, ...})
# ------------------------------------------------------------------------------------------


def braced(text: str, start: int) -> int:
    """Index just past the brace group opening at text[start] == '{' (nesting counted)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced braces from {text[start:start + 60]!r}")


def parse_bibtex(text: str) -> list[dict]:
    entries = []
    for m in re.finditer(r"@(\w+)\s*\{", text):
        end = braced(text, m.end() - 1)
        body = text[m.end():end - 1]
        key, _, rest = body.partition(",")
        assert re.fullmatch(r"[A-Za-z][\w:-]*", key.strip()), f"bad BibTeX key {key!r}"
        fields, i = {}, 0
        while True:
            f = re.compile(r"\s*(\w+)\s*=\s*").match(rest, i)
            if not f:
                assert not rest[i:].strip(), f"{key}: cannot read {rest[i:i + 60]!r}"
                break
            name, j = f.group(1).lower(), f.end()
            if rest[j] == "{":
                k = braced(rest, j)
                value = rest[j + 1:k - 1]
            elif rest[j] == '"':
                k = rest.index('"', j + 1) + 1
                value = rest[j + 1:k - 1]
            else:
                v = re.compile(r"\d+").match(rest, j)
                assert v, f"{key}.{name}: a value is {{...}}, \"...\" or a number"
                k, value = v.end(), v.group()
            assert name not in fields, f"{key}: field {name} twice"
            fields[name] = value
            comma = re.compile(r"\s*(,|$)").match(rest, k)
            assert comma, f"{key}: expected a comma after {name}"
            i = comma.end()
        entries.append({"type": m.group(1).lower(), "key": key.strip(), "fields": fields})
    return entries


def first_surname(author: str) -> str:
    first = re.split(r"\s+and\s+", author)[0].strip()
    if first.startswith("{") and first.endswith("}"):  # corporate author
        return first.strip("{}").split()[-1]
    return first.split(",")[0].strip() if "," in first else first.split()[-1]


def papers_md() -> str:
    return (ROOT / "docs" / "papers.md").read_text()


def bib_entries() -> list[dict]:
    blocks = re.findall(r"```bibtex\n(.*?)```", papers_md(), re.S)
    assert blocks, "docs/papers.md has no ```bibtex blocks"
    return [e for b in blocks for e in parse_bibtex(b)]


def docstring(path: Path) -> str:
    return " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split())  # one line: citations may wrap


def citations(text: str) -> set[tuple[str, int]]:
    return {(name, int(year)) for name, year in CITE.findall(text) if name not in NOT_AUTHORS}


def resolves(entries, name: str, year: int) -> list[str]:
    return [e["key"] for e in entries
            if first_surname(e["fields"]["author"]) == name and abs(int(e["fields"]["year"]) - year) <= 1]


def library_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


# ------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------


def test_the_bibtex_reader_reads_and_refuses():
    good = parse_bibtex('@misc{a2020x,\n author = {Doe, Jane and {Big Team}},\n title = {{X}: y},\n year = 2020\n}')
    assert good == [{"type": "misc", "key": "a2020x",
                     "fields": {"author": "Doe, Jane and {Big Team}", "title": "{X}: y", "year": "2020"}}]
    assert first_surname("{Gemma Team}") == "Team" and first_surname("Tri Dao and Other, A") == "Dao"
    for bad in ("@misc{k, title = {open}", "@misc{k, title {x}}", "@misc{k, year = 2020 title = {x}}"):
        with pytest.raises((AssertionError, ValueError)):
            parse_bibtex(bad)


def test_every_entry_is_well_formed_and_unique():
    entries = bib_entries()
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)), f"duplicate BibTeX keys: {sorted(k for k in keys if keys.count(k) > 1)}"
    for e in entries:
        f = e["fields"]
        missing = [r for r in REQUIRED if not f.get(r, "").strip()]
        assert not missing, f"{e['key']}: missing {missing}"
        assert re.fullmatch(r"(19|20)\d\d", f["year"]), f"{e['key']}: year {f['year']!r}"
        assert any(f.get(w) for w in WHERE), f"{e['key']}: says nowhere where it appeared ({WHERE})"
        assert e["type"] in ("article", "inproceedings", "misc"), f"{e['key']}: entry type {e['type']}"
        if e["type"] == "inproceedings":
            assert f.get("booktitle"), f"{e['key']}: inproceedings without booktitle"
        if "eprint" in f:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", f["eprint"]), f"{e['key']}: eprint {f['eprint']!r}"


def test_every_paper_a_module_docstring_names_has_an_entry():
    entries = bib_entries()
    eprints = {e["fields"].get("eprint") for e in entries}
    missing = []
    for path in library_modules():
        doc = docstring(path)
        for name, year in sorted(citations(doc)):
            if not resolves(entries, name, year):
                missing.append(f"{path.relative_to(ROOT)}: {name} {year}")
        for arxiv_id in ARXIV.findall(doc):
            if arxiv_id not in eprints:
                missing.append(f"{path.relative_to(ROOT)}: arXiv {arxiv_id}")
    assert not missing, "papers named in module docstrings without a docs/papers.md entry:\n" + "\n".join(missing)


def test_every_algorithm_module_names_its_paper():
    entries = bib_entries()
    for rel in ALGORITHM_MODULES:
        doc = docstring(ROOT / rel)
        cited = [k for n, y in citations(doc) for k in resolves(entries, n, y)]
        cited += [e["key"] for e in entries if e["fields"].get("eprint") in ARXIV.findall(doc)]
        assert cited, f"{rel}: its docstring names no paper listed in docs/papers.md"


def test_modules_papers_md_names_exist_and_cite_the_entries_beside_them():
    text = papers_md()
    sections = re.split(r"\n### ", text)[1:]
    assert sections, "docs/papers.md has no paper sections"
    for section in sections:
        title = section.splitlines()[0]
        m = re.search(r"Implemented in:(.*?)(?:\.\s|\n\n|```)", section, re.S)
        assert m, f"docs/papers.md, {title}: no 'Implemented in:' line"
        modules = re.findall(r"`([\w/]+\.py)`", m.group(1))
        assert modules, f"docs/papers.md, {title}: 'Implemented in:' names no module"
        keys = {e["key"]: e for b in re.findall(r"```bibtex\n(.*?)```", section, re.S) for e in parse_bibtex(b)}
        assert keys, f"docs/papers.md, {title}: no BibTeX entry"
        cited_by_any = set()
        for rel in modules:
            assert (ROOT / rel).is_file(), f"docs/papers.md, {title}: {rel} does not exist"
            doc = docstring(ROOT / rel)
            cited_by_any |= {k for n, y in citations(doc) for k in resolves(keys.values(), n, y)}
            cited_by_any |= {k for k, e in keys.items() if e["fields"].get("eprint") in ARXIV.findall(doc)}
        assert cited_by_any == set(keys), (f"docs/papers.md, {title}: no listed module's docstring names "
                                           f"{sorted(set(keys) - cited_by_any)}")


# ------------------------------------------------------------------------------------------
# Versions
# ------------------------------------------------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text())


def test_citation_cff_matches_pyproject_and_changelog():
    cff, version = citation(), pyproject()["project"]["version"]
    for block, where in ((cff, "CITATION.cff"), (cff["preferred-citation"], "CITATION.cff preferred-citation")):
        assert str(block["version"]) == version, f"{where} version {block['version']} != pyproject {version}"
        assert block["authors"] == [{"name": "The decoding-toolkit authors"}], f"{where} authors"
        assert block["repository-code"] == cff["repository-code"]
        assert block["date-released"] == cff["date-released"]
    assert cff["cff-version"] == "1.2.0" and cff["title"] and cff["license"] == pyproject()["project"]["license"]["text"]
    released = re.search(rf"^## \[{re.escape(version)}\] - (\d{{4}}-\d\d-\d\d)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert released, f"CHANGELOG.md has no '## [{version}] - YYYY-MM-DD' section"
    assert str(cff["date-released"]) == released.group(1), "CITATION.cff date-released differs from CHANGELOG.md"


def test_changelog_has_an_unreleased_section_above_the_releases():
    text = (ROOT / "CHANGELOG.md").read_text()
    heads = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert heads and heads[0] == "Unreleased", f"CHANGELOG.md must start with '## [Unreleased]', has {heads[:2]}"
    versions = heads[1:]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions), f"release headings: {versions}"
    as_tuples = [tuple(map(int, v.split("."))) for v in versions]
    assert as_tuples == sorted(as_tuples, reverse=True), "releases must be listed newest first"
    assert "`vX.Y.Z`" in (ROOT / "docs" / "releasing.md").read_text(), "docs/releasing.md states the tag convention"


def test_one_repository_url_everywhere():
    url = citation()["repository-code"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    slug = url.removeprefix("https://github.com/")
    readme = (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        text = "".join("".join(c["source"]) for c in nb["cells"])
        assert f'REPO_URL = "{url}"' in text, f"{path.name}: REPO_URL is not {url}"
        badge = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}"
        assert badge in text, f"{path.name}: its Colab badge does not point at {badge}"
        assert badge in readme, f"README.md: no Colab badge for {path.name}"
    assert url in readme and "CITATION.cff" in readme and "docs/papers.md" in readme
