"""Document sources: local source trees, Stack-v2-schema JSONL / Parquet files, the embedded stdlib corpus.

Every source here is a Grain random-access data source (`__len__` + `__getitem__`) whose records are
`RawFile`s: the bytes (or, for JSONL / Parquet rows, the already-decoded text) of one file, its stable key
(the relative path, or `repo/path`) and its language. Listing is cheap (paths only, filtered to one
split by a stable hash of the key); file contents are read lazily, one record at a time, and never more
than `read_limit + 1` bytes, so an over-size file costs no more than its first megabyte.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import stat
import sysconfig
from collections.abc import Iterable, Sequence
from typing import Any

from ponderttt.data.split import DEFAULT_SPLIT, SPLITS, SplitConfig, split_of

# Language names follow The Stack v2 `language` column.
LANGUAGE_BY_EXTENSION: dict[str, str] = {
    ".py": "Python", ".pyi": "Python",
    ".js": "JavaScript", ".mjs": "JavaScript", ".cjs": "JavaScript", ".jsx": "JavaScript",
    ".ts": "TypeScript", ".tsx": "TypeScript",
    ".java": "Java",
    ".go": "Go",
    ".c": "C", ".h": "C",
    ".cc": "C++", ".cpp": "C++", ".cxx": "C++", ".hpp": "C++", ".hh": "C++", ".hxx": "C++",
    ".rs": "Rust",
    ".rb": "Ruby",
    ".php": "PHP",
    ".cs": "C#",
    ".kt": "Kotlin", ".kts": "Kotlin",
    ".scala": "Scala",
    ".swift": "Swift",
    ".sh": "Shell", ".bash": "Shell",
    ".lua": "Lua",
    ".hs": "Haskell",
    ".jl": "Julia",
    ".r": "R",
    ".m": "Objective-C",
    ".pl": "Perl", ".pm": "Perl",
    ".sql": "SQL",
    ".dart": "Dart",
    ".ex": "Elixir", ".exs": "Elixir",
    ".erl": "Erlang",
    ".ml": "OCaml", ".mli": "OCaml",
    ".f90": "Fortran", ".f95": "Fortran",
    ".zig": "Zig",
}

DEFAULT_READ_LIMIT = 1_000_000  # bytes; matches CleaningConfig.max_bytes


def language_of(path: str | os.PathLike) -> str | None:
    """The language of a file by its extension (case-insensitive), or None when the extension is unknown."""
    return LANGUAGE_BY_EXTENSION.get(pathlib.PurePath(path).suffix.lower())


@dataclasses.dataclass(frozen=True, slots=True)
class RawFile:
    """One file as read from a source, before cleaning.

    `data` holds at most `read_limit + 1` bytes (`size` is the true size), or is None when `text` holds
    content that arrived already decoded (Stack v2 `content` column). `encoding` is the file's declared
    encoding when known (Stack v2 `src_encoding`); None means UTF-8.
    """

    key: str
    language: str
    size: int
    data: bytes | None = None
    text: str | None = None
    encoding: str | None = None
    repo: str = ""
    generated: bool = False  # the source itself flags the file as generated or vendored (Stack v2 columns)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS} (or None for every file)")


def _check_languages(languages: Iterable[str] | None) -> frozenset[str] | None:
    if not languages:
        return None
    known = set(LANGUAGE_BY_EXTENSION.values())
    chosen = frozenset(languages)
    unknown = sorted(chosen - known)
    if unknown:
        raise ValueError(f"unknown language(s) {unknown}; known: {sorted(known)}")
    return chosen


def unusable_file(path: str | os.PathLike) -> str | None:
    """Why a listed path cannot be read as a source file (never opening it): "broken_symlink", "symlink_loop",
    "not_regular_file" (a FIFO, socket, device or directory), "unreadable"; None for a readable regular file."""
    try:
        info = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        return "broken_symlink" if os.path.islink(path) else "unreadable"
    except OSError as error:
        return "symlink_loop" if error.errno == errno.ELOOP else "unreadable"
    if not stat.S_ISREG(info.st_mode):
        return "not_regular_file"
    return None if os.access(path, os.R_OK) else "unreadable"


class FileTreeSource:
    """Source files under a directory tree (a Grain random-access data source of `RawFile`s).

    Files are those whose extension maps to a language (`LANGUAGE_BY_EXTENSION`), optionally restricted to
    `languages`, to one `split` (by a stable hash of the path relative to `root`), with directory names
    in `exclude_dirs` and hidden directories (".git", ...) pruned. Order is the sorted relative paths, so two
    machines list the same files in the same order. Entries that are not readable regular files (broken or
    looping symlinks, FIFOs, sockets, devices, unreadable files) are never opened: they are left out and counted
    per reason in `skipped`; a file that fails to read later comes back without data (cleaning: "unavailable").
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str | None = None,
        split_config: SplitConfig = DEFAULT_SPLIT,
        languages: Iterable[str] | None = None,
        exclude_dirs: Iterable[str] = (),
        read_limit: int = DEFAULT_READ_LIMIT,
    ):
        _check_split(split)
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"source root {str(self.root)!r} is not a directory")
        chosen = _check_languages(languages)
        excluded = frozenset(exclude_dirs)
        entries: list[tuple[str, str]] = []
        self.skipped: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
            for name in filenames:
                language = language_of(name)
                if language is None or (chosen is not None and language not in chosen):
                    continue
                rel = pathlib.Path(dirpath, name).relative_to(self.root).as_posix()
                if split is None or split_of(rel, split_config) == split:
                    reason = unusable_file(pathlib.Path(dirpath, name))
                    if reason is not None:
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
                        continue
                    entries.append((rel, language))
        entries.sort()
        self._entries = entries
        self.read_limit = read_limit

    @property
    def keys(self) -> list[str]:
        """Relative POSIX paths of the listed files, in record order (`self[i].key == self.keys[i]`)."""
        return [rel for rel, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> RawFile:
        rel, language = self._entries[index]
        path = self.root / rel
        try:
            if unusable_file(path) is not None:  # changed since the listing (e.g. replaced by a FIFO): never open it
                return RawFile(key=rel, language=language, size=0)
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data = handle.read(self.read_limit + 1)
        except OSError:
            return RawFile(key=rel, language=language, size=0)  # no data: cleaning counts it as "unavailable"
        return RawFile(key=rel, language=language, size=size, data=data)

    def __repr__(self) -> str:
        return f"FileTreeSource(root={str(self.root)!r}, files={len(self)})"


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory (sysconfig `stdlib` path)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


# Installed third-party code and compiled extensions are not the standard library.
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "lib-dynload", "__pycache__")


def stdlib_source(
    split: str | None = "train",
    *,
    split_config: SplitConfig = DEFAULT_SPLIT,
    read_limit: int = DEFAULT_READ_LIMIT,
) -> FileTreeSource:
    """The embedded default corpus: every `.py` file of the running interpreter's standard library."""
    return FileTreeSource(
        stdlib_root(),
        split=split,
        split_config=split_config,
        languages=("Python",),
        exclude_dirs=STDLIB_EXCLUDED_DIRS,
        read_limit=read_limit,
    )


# Column names of The Stack v2 schema that this reader understands (`repo_name` is the v2 name, `repo` v1).
_PATH_COLUMNS = ("path", "max_stars_repo_path")
_REPO_COLUMNS = ("repo_name", "repo", "max_stars_repo_name")


def _first(row: dict, columns: Sequence[str], default: str = "") -> str:
    for column in columns:
        value = row.get(column)
        if value:
            return str(value)
    return default


def _row_key(row: dict) -> tuple[str, str]:
    path = _first(row, _PATH_COLUMNS)
    repo = _first(row, _REPO_COLUMNS)
    if not path:
        raise ValueError(f"row has no path column (one of {_PATH_COLUMNS}); its columns: {sorted(row)}")
    return (f"{repo}/{path}" if repo else path), repo


def _row_language(row: dict, key: str) -> str:
    language = row.get("language") or row.get("lang") or language_of(key)
    if not language:
        raise ValueError(f"row {key!r} has no `language` column and no known extension")
    return str(language)


class _BadFile(Exception):
    """A Stack-v2 file that cannot be read at all (unreadable, a truncated Parquet file)."""


def _stack_format(path: pathlib.Path) -> str | None:
    """"parquet" or "jsonl" (also .json) by the file's suffix, None for anything else."""
    if path.suffix.lower() == ".parquet":
        return "parquet"
    suffixes = "".join(path.suffixes[-2:]).lower()
    return "jsonl" if suffixes.endswith(".jsonl") or suffixes.endswith(".json") else None


class StackV2FileSource:
    """Rows of JSONL or Parquet files in The Stack v2 schema (`content`, `language`, `path`, `repo_name`, ...).

    A Grain random-access data source of `RawFile`s with `text` set. JSONL files are indexed by byte
    offset (rows are parsed again on access); Parquet files are memory-mapped. Rows are filtered to
    `languages` and to one `split` by a stable hash of `repo_name/path`. A bad row (not JSON, not UTF-8, not an
    object) or a bad file (unreadable, a truncated Parquet file) is left out and counted in `skipped`
    ("bad_row", "bad_file"); the rest of the source is kept.
    """

    _CONTENT_COLUMNS = ("content", "text")

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        split: str | None = None,
        split_config: SplitConfig = DEFAULT_SPLIT,
        languages: Iterable[str] | None = None,
    ):
        _check_split(split)
        if not paths:
            raise ValueError("StackV2FileSource needs at least one .jsonl / .parquet path")
        chosen = frozenset(languages) if languages else None
        self._paths = [pathlib.Path(p) for p in paths]
        self._tables: dict[int, object] = {}
        self.skipped: dict[str, int] = {}
        # Each entry: (file index, row locator (byte offset or row number), key, language, repo).
        entries: list[tuple[int, int, str, str, str]] = []
        for path in self._paths:
            if _stack_format(path) is None:
                raise ValueError(f"{str(path)!r}: expected a .jsonl or .parquet file in The Stack v2 schema")
        for file_index, path in enumerate(self._paths):
            found = []  # this file's rows, kept only when the whole file reads
            try:
                for locator, row in self._scan(file_index, path):
                    key, repo = _row_key(row)
                    language = _row_language(row, key)
                    if chosen is not None and language not in chosen:
                        continue
                    if split is None or split_of(key, split_config) == split:
                        found.append((file_index, locator, key, language, repo))
            except _BadFile:
                self._tables.pop(file_index, None)
                self.skipped["bad_file"] = self.skipped.get("bad_file", 0) + 1
                continue
            entries.extend(found)
        self._entries = entries

    def _scan(self, file_index: int, path: pathlib.Path) -> Iterable[tuple[int, dict]]:
        """(locator, row) of every good row of `path` (bad rows counted in `skipped`); `_BadFile` when the file
        itself cannot be read."""
        if _stack_format(path) == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path, memory_map=True)
            except (OSError, pa.ArrowException) as error:
                raise _BadFile(path) from error
            self._tables[file_index] = table
            meta_columns = [c for c in table.column_names if c not in self._CONTENT_COLUMNS]
            yield from enumerate(table.select(meta_columns).to_pylist())
            return
        try:
            with open(path, "rb") as handle:
                offset = 0
                for line in handle:
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except ValueError:  # not JSON, or not UTF-8
                            row = None
                        if isinstance(row, dict):
                            yield offset, row
                        else:
                            self.skipped["bad_row"] = self.skipped.get("bad_row", 0) + 1
                    offset += len(line)
        except OSError as error:
            raise _BadFile(path) from error

    def _content(self, row: dict, key: str) -> str:
        for column in self._CONTENT_COLUMNS:
            if column in row:
                return row[column] or ""
        raise ValueError(f"row {key!r} has no content column (one of {self._CONTENT_COLUMNS})")

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> RawFile:
        file_index, locator, key, language, repo = self._entries[index]
        if file_index in self._tables:
            table = self._tables[file_index]
            row = table.slice(locator, 1).to_pylist()[0]
        else:
            with open(self._paths[file_index], "rb") as handle:
                handle.seek(locator)
                row = json.loads(handle.readline())
        text = self._content(row, key)
        return RawFile(key=key, language=language, size=len(text.encode("utf-8", "surrogatepass")), text=text,
                       repo=repo)

    def __getstate__(self) -> dict:
        # Parquet tables are re-opened (memory-mapped) in each process rather than pickled.
        state = dict(self.__dict__)
        state["_tables"] = {i: None for i in self._tables}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        import pyarrow.parquet as pq

        self._tables = {i: pq.read_table(self._paths[i], memory_map=True) for i in state["_tables"]}

    def __repr__(self) -> str:
        return f"StackV2FileSource(files={len(self._paths)}, rows={len(self)})"


NAMED_SOURCES = ("stdlib",)


def named_source(name: str, split: str | None = "train", **kwargs: Any) -> FileTreeSource:
    """A source by name: "stdlib" (the embedded default). Keyword arguments go to the source's constructor."""
    if name == "stdlib":
        return stdlib_source(split, **kwargs)
    raise ValueError(f"unknown source name {name!r}; named sources: {NAMED_SOURCES}")
