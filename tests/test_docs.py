"""The documentation stands on its own: links resolve, the configuration reference is complete, and
nothing points outside the repository."""
import re
import unicodedata
from pathlib import Path

import pytest

from kvblend.config import BlendConfig, KVBlendConfig, StoreConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "kvblend" / "data" / "datasets" / "NOTICE.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _prose(path: Path) -> str:
    """The file without its fenced code blocks and inline code (neither holds links)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def _relative_links(path: Path):
    for target in LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s):, mailto: ...
        yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.exists()
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_are_found_at_all():
    assert len(list(_relative_links(ROOT / "README.md"))) >= 5
    assert _slug("## 10. Performance model".lstrip("# ")) == "10-performance-model"
    assert _slug("OpenMP spin-waiting (`GOMP_SPINCOUNT`)") == "openmp-spin-waiting-gomp_spincount"


def test_readme_is_a_guide_of_reasonable_length():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for section in ("## Two commands", "## Python API", "## Command line", "## Configuration", "## Results",
                    "## Limitations", "## How it works", "## Layout"):
        assert section in readme


def test_the_configuration_reference_names_every_option_and_environment_variable():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for model in (KVBlendConfig, BlendConfig, StoreConfig):
        for name in model.model_fields:
            assert f"`{name}`" in readme, f"README's configuration reference lacks {model.__name__}.{name}"
    for name in StoreConfig.model_fields:
        assert f"`KVBLEND_{name.upper()}`" in readme
    read = set()
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?\(|environ\[|getenv\()\s*["']([A-Z_][A-Z0-9_]*)["']""")
    for folder in ("kvblend", "kernels", "integrations", "tests", "scripts"):
        for source in (ROOT / folder).rglob("*.py"):
            read |= set(pattern.findall(source.read_text(encoding="utf-8")))
    assert {"KVBLEND_HOME", "GOMP_SPINCOUNT"} <= read
    missing = sorted(name for name in read if f"`{name}`" not in readme and name not in readme)
    assert not missing, f"README's environment table lacks {missing}"


def test_nothing_refers_to_a_folder_outside_the_repository():
    pairs = [("..", "shared"), ("/work", "shared"), ("shared", "datasets"), ("/tmp", "vllmproto")]  # joined: no hit on this file
    outside = re.compile("|".join(re.escape(f"{a}/{b}") for a, b in pairs))
    offenders = []
    for folder in ("kvblend", "kernels", "integrations", "examples", "notebooks", "tests", "scripts", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".ipynb", ".sh", ".cpp", ".h", ".toml", ".txt"}:
                text = path.read_text(encoding="utf-8", errors="replace")
                offenders += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}" for m in outside.finditer(text)]
    for name in ("README.md", "Makefile", "pyproject.toml"):
        if outside.search((ROOT / name).read_text(encoding="utf-8")):
            offenders.append(name)
    assert not offenders


def test_documents_do_not_narrate_earlier_runs():
    diary = re.compile(r"\bsession \d|\bthis (?:version|session)\b|\bprevious version\b|DESIGN §", re.IGNORECASE)
    hits = [f"{doc.relative_to(ROOT)}: {m.group(0)!r}" for doc in DOCS for m in diary.finditer(doc.read_text(encoding="utf-8"))]
    assert not hits


def _readme_defaults(table: str) -> dict[str, str]:
    """{field: default as written} from the README table whose header starts with `table`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"| `{table}` |")
    rows = {}
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1].strip("`").strip('"')
    return rows


@pytest.mark.parametrize("model", [KVBlendConfig, BlendConfig, StoreConfig], ids=lambda m: m.__name__)
def test_the_configuration_reference_states_each_default(model):
    from pydantic import BaseModel

    from kvblend.config import parse_bytes

    written = _readme_defaults(model.__name__)
    assert set(written) == set(model.model_fields)
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            expected = f"{type(default).__name__}()"
        elif isinstance(default, bool):
            expected = str(default).lower()
        else:
            expected = str(default)
        shown = written[name]
        if isinstance(default, int) and not isinstance(default, bool):
            shown = str(parse_bytes(shown))
        assert shown == expected, f"README gives {model.__name__}.{name} the default {written[name]!r}; the code has {default!r}"
