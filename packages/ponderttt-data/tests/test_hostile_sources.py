"""Hostile corpora: entries that are not readable regular files are never opened, only counted; a bad row or a bad
file of a Stack-v2 source is left out and counted while the rest is kept. Every test is bounded (an alarm stops a
read that would block on a FIFO)."""

import json
import os
import signal
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ponderttt.data import FileTreeSource, StackV2FileSource
from ponderttt.data.sources import unusable_file


@pytest.fixture
def alarm():
    """Fails the test instead of hanging when something blocks for 10 s (a FIFO opened for reading)."""
    def fail(*_):
        raise TimeoutError("blocked: a FIFO or device was opened for reading")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_tree_of_bad_entries_lists_only_the_good_file(tmp_path, alarm):
    (tmp_path / "good.py").write_text("print('ok')\n")
    (tmp_path / "dangling.py").symlink_to(tmp_path / "missing.py")
    (tmp_path / "loop_a.py").symlink_to(tmp_path / "loop_b.py")
    (tmp_path / "loop_b.py").symlink_to(tmp_path / "loop_a.py")
    os.mkfifo(tmp_path / "pipe.py")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.py"))
    (tmp_path / "dir.py").mkdir()  # a directory with a source suffix: walked, not listed
    try:
        source = FileTreeSource(tmp_path)
        assert source.keys == ["good.py"]
        assert source.skipped == {"broken_symlink": 1, "symlink_loop": 2, "not_regular_file": 2}
        assert source[0].data == b"print('ok')\n"
        (tmp_path / "good.py").unlink()
        os.mkfifo(tmp_path / "good.py")  # replaced by a FIFO after the listing: not opened, no data
        raw = source[0]
        assert raw.data is None and raw.text is None and raw.size == 0
    finally:
        server.close()
    assert unusable_file(tmp_path / "pipe.py") == "not_regular_file"
    assert unusable_file(tmp_path / "dangling.py") == "broken_symlink"


def test_bad_rows_and_bad_files_are_counted_and_the_rest_kept(tmp_path):
    good = [{"content": f"x = {i}\n", "language": "Python", "path": f"f{i}.py", "repo_name": "o/r"} for i in range(3)]
    jsonl = tmp_path / "rows.jsonl"
    with jsonl.open("wb") as handle:
        handle.write((json.dumps(good[0]) + "\n").encode())
        handle.write(b'{"content": "broken\n')  # not JSON
        handle.write(b'{"content": "\xff\xfe not utf-8", "path": "a.py"}\n')  # not UTF-8
        handle.write(b"[1, 2, 3]\n")  # not an object
        handle.write((json.dumps(good[1]) + "\n").encode())
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([good[2]]), parquet)
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(parquet.read_bytes()[:40])
    source = StackV2FileSource([jsonl, truncated, parquet])
    assert source.skipped == {"bad_row": 3, "bad_file": 1}
    assert sorted(source[i].text for i in range(len(source))) == sorted(r["content"] for r in good)
