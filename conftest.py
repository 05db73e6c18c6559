"""Fixtures shared by the tests: a small TruthfulQA-format CSV, and the tiny random models of every architecture.

Every test runs on one CPU thread (they may run beside other work; see the README)."""
import csv

import pytest
import torch

import models

torch.set_num_threads(1)


def write_fixture_csv(path, n=10, drop_column=None):
    """A small TruthfulQA-format CSV: question i has 2 correct and 3 incorrect answers (one already closed)."""
    columns = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
    columns = [c for c in columns if c != drop_column]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for i in range(n):
            w.writerow({"Type": "Adversarial", "Category": f"Cat{i % 3}", "Question": f"What is fact {i}?",
                        "Best Answer": f"Fact {i} is true", "Correct Answers": f"Fact {i} is true; It is {i}.;  ",
                        "Incorrect Answers": f"Fact {i} is false; It is {i + 1}; Nobody knows", "Source": "x"})
    return str(path)


@pytest.fixture
def fixture_csv():
    """write_fixture_csv(path, n=10, drop_column=None) -> path: a small TruthfulQA-format CSV."""
    return write_fixture_csv


@pytest.fixture(scope="session")
def tiny():
    """{name: (model, tokenizer, about)} for every built-in tiny architecture."""
    return {name: models.load_model(name) for name in models.TINY_CONFIGS}
