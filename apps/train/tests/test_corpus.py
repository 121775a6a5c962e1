"""The app's corpus on a hostile directory: bad entries are never opened, the run goes on, and the counts are
logged per reason."""

import os


def test_bad_entries_are_skipped_and_their_counts_logged(tmp_path, capsys):
    from ponderttt.train import corpus
    from ponderttt.train.config import DataConfig

    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (tmp_path / "dangling.py").symlink_to(tmp_path / "gone.py")
    os.mkfifo(tmp_path / "pipe.py")
    data = DataConfig(corpus=str(tmp_path), val_fraction=0.1, test_fraction=0.1)
    sources = [corpus.source(data, split) for split in ("train", "val", "test")]
    assert sum(len(s) for s in sources) == 40  # every good file, in one split or another
    skipped = {reason: sum(s.skipped.get(reason, 0) for s in sources) for reason in ("broken_symlink",
                                                                                     "not_regular_file")}
    assert skipped == {"broken_symlink": 1, "not_regular_file": 1}
    lines = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]  # the console's log lines
    assert len(lines) == 2 and all(" corpus: " in line for line in lines)
    assert any("1 broken symlink" in line for line in lines) and any("1 not regular file" in line for line in lines)
