"""`experiments.tool_cli`: the helper tools parse with argparse, name the flag of a bad value
and exit with code 2 before any work."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

import pytest

from experiments import tool_cli

HELPER_TOOLS = ("by_length", "paper_runs", "paper_table", "predict", "probe", "small_scale",
                "train_tokenizer")


def test_csv_list_converts_checks_and_names_the_bad_item():
    sizes = tool_cli.csv_list(int, lambda n: n > 0, "positive integers", "100,500")
    assert sizes("100, 500,") == [100, 500] and sizes("") == []
    for bad in ("-5", "abc", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError,
                           match=rf"'{bad}' is not valid: expected comma-separated positive "
                                 r"integers \(e.g. 100,500\)"):
            sizes(f"100,{bad}")
    assert tool_cli.positive_int("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a positive integer"):
            tool_cli.positive_int(bad)


def test_run_turns_a_user_error_into_one_line_and_exit_2(capsys):
    def fails(message):
        raise FileNotFoundError(message)

    assert tool_cli.run(fails, "no such file: x.jsonl") == 2
    assert capsys.readouterr().err == "error: no such file: x.jsonl\n"
    assert tool_cli.run(lambda: 0) == 0
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback shows
        tool_cli.run(lambda: {}["x"])


@pytest.mark.parametrize("tool, argv, named", [
    ("small_scale", ["--steps", "0"], "argument --steps: '0' is not a positive integer"),
    ("small_scale", ["--groups", "main,bogus"], "argument --groups: 'bogus' is not valid"),
    ("train_tokenizer", ["--out", "x", "--vocab_size", "-3"],
     "argument --vocab_size: '-3' is not a positive integer"),
    ("predict", ["--adapters", "a=b", "--input", "i", "--output", "o", "--batch-size", "x"],
     "argument --batch-size: 'x' is not a positive integer"),
])
def test_a_bad_flag_value_exits_2_naming_the_flag(tool, argv, named, capsys):
    module = importlib.import_module(f"experiments.{tool}")
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_train_tokenizer_refuses_a_tiny_vocabulary_before_reading_the_corpus(capsys):
    from experiments import train_tokenizer

    assert train_tokenizer.main(["--out", "unused", "--vocab_size", "50",
                                 "--text_sources", "no_such_source"]) == 2
    assert "--vocab_size 50: SentencePiece needs at least 100 pieces" in capsys.readouterr().err


@pytest.mark.parametrize("tool", HELPER_TOOLS)
def test_every_helper_tool_uses_the_shared_parser(tool):
    """One CLI style: each helper tool builds its parser with `tool_cli.parser` (argparse,
    its help the module's docstring) and reports user errors through `tool_cli`."""
    module = importlib.import_module(f"experiments.{tool}")
    source = importlib.util.find_spec(module.__name__).loader.get_source(module.__name__)
    assert f'tool_cli.parser("experiments.{tool}", __doc__)' in source
    assert "argparse.ArgumentParser(" not in source
