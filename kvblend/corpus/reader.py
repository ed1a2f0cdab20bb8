"""Reading a corpus: folders of text/Markdown files, JSONL files with a text field, PDFs.

Bad inputs (binary, empty, not UTF-8, unreadable, malformed lines) never stop a run: each
becomes a `Problem` with a readable reason, so one stray file cannot cost an hour of encoding.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PDF_SUFFIXES
_SNIFF_BYTES = 8192


@dataclass
class Document:
    """One text to chunk. `source` names where it came from: a path, or `path:line` for JSONL."""

    source: str
    text: str


@dataclass
class Problem:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class ReadResult:
    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: int = 0


def _decode(path: Path, data: bytes, encoding: str) -> str:
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise ValueError("binary file (NUL bytes)")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise ValueError(f"not valid {encoding} (byte 0x{bad} at offset {exc.start}); "
                         f"convert it to UTF-8 or pass --encoding") from None


def _read_text(path: Path, encoding: str) -> list[Document]:
    text = _decode(path, path.read_bytes(), encoding)
    if not text.strip():
        raise ValueError("empty file")
    return [Document(str(path), text)]


def _read_jsonl(path: Path, encoding: str, text_field: str, problems: list[Problem]) -> list[Document]:
    docs, missing, bad_json = [], [], []
    for number, line in enumerate(_decode(path, path.read_bytes(), encoding).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad_json.append(number)
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            missing.append((number, sorted(record) if isinstance(record, dict) else type(record).__name__))
        elif text.strip():
            docs.append(Document(f"{path}:{number}", text))
    if bad_json:
        problems.append(Problem(str(path), f"{len(bad_json)} line(s) are not JSON (first: line {bad_json[0]})"))
    if missing:
        (first, fields) = missing[0]
        problems.append(Problem(str(path), f"{len(missing)} line(s) have no string field {text_field!r} "
                                           f"(line {first} has {fields}); pick one with --text-field"))
    if not docs and not missing and not bad_json:
        raise ValueError("no non-empty records")
    return docs


def _read_pdf(path: Path) -> list[Document]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise ValueError("reading PDFs needs pypdf: pip install 'kvblend[corpus]'") from None
    try:
        text = "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except (PdfReadError, ValueError, KeyError) as exc:
        raise ValueError(f"not a readable PDF ({exc})") from None
    if not text.strip():
        raise ValueError("PDF has no extractable text (scanned?)")
    return [Document(str(path), text)]


def _files(paths: Iterable[Path], problems: list[Problem]) -> list[Path]:
    """Files to read, in a stable order: folders are walked, hidden entries and other types ignored."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                              and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            if path.suffix.lower() in SUPPORTED_SUFFIXES:
                out.append(path)
            else:
                problems.append(Problem(str(path), f"unsupported file type {path.suffix or '(none)'!r}; "
                                                   f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"))
        else:
            problems.append(Problem(str(path), "no such file or folder"))
    return out


def read_corpus(paths: Iterable[str | Path], text_field: str = "text", encoding: str = "utf-8") -> ReadResult:
    """Every document under `paths`, plus a problem for each input that could not be used."""
    result = ReadResult()
    for path in _files([Path(p) for p in paths], result.problems):
        result.files += 1
        suffix = path.suffix.lower()
        try:
            if suffix in JSONL_SUFFIXES:
                result.documents.extend(_read_jsonl(path, encoding, text_field, result.problems))
            elif suffix in PDF_SUFFIXES:
                result.documents.extend(_read_pdf(path))
            else:
                result.documents.extend(_read_text(path, encoding))
        except OSError as exc:
            result.problems.append(Problem(str(path), f"unreadable ({exc.strerror or exc})"))
        except ValueError as exc:
            result.problems.append(Problem(str(path), str(exc)))
    return result
