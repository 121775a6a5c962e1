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


def _record():
    from ponderttt.eval import summarize_method

    return summarize_method("skip", "reset", loss=[1.0, 2.0], tokens=[3, 4], actions=[0, 0], n_resamples=10)


def test_skip_counts_per_split_and_reason_reach_results_json_and_report_md(tmp_path):
    import json

    from ponderttt.eval import write_report
    from ponderttt.train import corpus
    from ponderttt.train.config import DataConfig

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (root / "dangling.py").symlink_to(root / "gone.py")
    os.mkfifo(root / "pipe.py")
    (root / "secret.py").write_text("x = 1\n")
    (root / "secret.py").chmod(0)
    as_root = os.geteuid() == 0  # root reads a mode-000 file: there it is a file like any other, not an unreadable one
    expected = {"broken_symlink": 1, "not_regular_file": 1} | ({} if as_root else {"unreadable": 1})
    data = DataConfig(corpus=str(root), val_fraction=0.1, test_fraction=0.1, max_files=30)
    summary = corpus.summary(data)
    splits = summary["splits"]
    assert list(splits) == ["train", "val", "test"] and summary["corpus"] == str(root)
    found = {}
    for counts in splits.values():
        for reason, n in counts["skipped"].items():
            found[reason] = found.get(reason, 0) + n
    assert found == expected and summary["skipped"] == sum(expected.values())
    assert sum(c["files"] for c in splits.values()) == 40 + as_root
    for split, counts in splits.items():  # "used": the files the run reads (--data.max-files 30: a spread subset)
        assert counts["used"] == len(corpus.source(data, split))
    assert splits["train"]["used"] <= 30 < splits["train"]["files"]

    out = write_report(tmp_path / "run", [_record()], plots=False, data=summary)
    assert json.loads(out["results"].read_text())["data"] == summary
    report = out["report"].read_text()
    total = sum(expected.values())
    lead = f"## Data\n\nCorpus `{root}`: {total} entries skipped (never opened).\n\n| Split | Files | Used | Skipped |"
    assert lead in report
    for split, c in splits.items():
        assert f"| {split} | {c['files']} | {c['used']} | {corpus.describe_skipped(c['skipped'])} |" in report
    reasons = ", ".join(corpus.describe_skipped(c["skipped"]) for c in splits.values() if c["skipped"])
    assert "1 broken symlink" in reasons and "1 not regular file" in reasons and ("unreadable" in reasons) != as_root


def test_a_clean_corpus_says_no_entries_skipped(tmp_path):
    from ponderttt.eval import write_report
    from ponderttt.train import corpus
    from ponderttt.train.config import DataConfig

    for i in range(20):
        (tmp_path / f"m{i}.py").write_text(f"y = {i}\n")
    summary = corpus.summary(DataConfig(corpus=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    assert summary["skipped"] == 0 and sum(c["files"] for c in summary["splits"].values()) == 20
    report = write_report(tmp_path / "run", [_record()], plots=False, data=summary)["report"].read_text()
    assert f"Corpus `{tmp_path}`: no entries skipped." in report
    assert report.count(" | none |") == 3
