"""Tests of tqa.py's data handling: the shipped v0 file, its version in every output, exact question text,
duplicated questions, and the hub path's offline message."""
import csv
import json
import shutil

import pytest

import runfiles
import tqa


def test_the_shipped_file_is_v0_and_the_default():
    assert tqa.data_version()["version"] == "v0" and tqa.data_version()["sha256"] == tqa.V0_SHA256
    rows = tqa.load_truthfulqa()
    assert len(rows) == tqa.V0_ROWS == 817


def test_question_text_is_kept_exactly():
    rows = tqa.load_truthfulqa()
    with open(tqa.DEFAULT_DATA, newline="", encoding="utf-8") as f:
        raw = [r["Question"] for r in csv.DictReader(f)]
    assert [r["question"] for r in rows] == raw
    assert rows[247]["question"].endswith("Death? ")  # the one question that ends in a space


def test_another_version_is_named_in_the_run_record(tmp_path):
    edited = tmp_path / "revised.csv"
    shutil.copy(tqa.DEFAULT_DATA, edited)
    with open(edited, "a", encoding="utf-8") as f:
        f.write("\nAdversarial,Misc,What is a new question?,It is new,It is new,It is old,x\n")  # no final newline
    version = tqa.data_version(str(edited))
    assert version["version"] == "other" and version["sha256"] != tqa.V0_SHA256
    assert len(tqa.load_truthfulqa(str(edited))) == 818  # accepted, but named as another version

    class Args:
        data = str(edited)
    record = runfiles.run_info(Args())
    assert record["data"]["version"] == "other"
    json.loads(json.dumps(record))


def test_duplicated_questions_are_refused_naming_the_rows(tmp_path, fixture_csv):
    path = fixture_csv(tmp_path / "t.csv", n=5)
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines + [lines[2]]) + "\n")  # question 1 again, as row 7
    with pytest.raises(SystemExit, match="rows 3, 7"):
        tqa.load_truthfulqa(path)


def test_binary_and_missing_files_get_a_sentence(tmp_path):
    (tmp_path / "b.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit, match="not a UTF-8 CSV"):
        tqa.load_truthfulqa(str(tmp_path / "b.csv"))
    with pytest.raises(SystemExit, match="leave --data out"):
        tqa.load_truthfulqa(str(tmp_path / "missing.csv"))


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        runfiles.write_json(str(tmp_path / "x.json"), {"mc2": float("nan")})
    assert not (tmp_path / "x.json").exists()
    assert runfiles.finite_or_none(float("inf")) is None and runfiles.finite_or_none(0.5) == 0.5


def test_out_under_a_regular_file_is_a_sentence(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        runfiles.check_writable(str(tmp_path / "file" / "out.json"))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        runfiles.write_json(str(tmp_path / "file" / "sub" / "out.json"), {})
