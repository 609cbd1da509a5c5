import argparse
import json

import pytest
from kmodel.tokenizer import TokenizerError
from kmodel.tokenizer.cli import add_commands
from kmodel.tokenizer.evaluate import ALL_FILES, Encoder, evaluate, load_baseline


def char_encoder(vocab_size=1000) -> Encoder:
    """One token per character, none of them byte fallback."""
    return Encoder("chars", vocab_size, lambda text: [ord(c) % vocab_size for c in text], lambda index: False)


def test_metrics_on_a_hand_checked_case(make_jsonl):
    path = make_jsonl("t.jsonl", [{"text": "가나 다", "lang": "ko"}, {"text": "ab cd ef", "lang": "en"}])
    pairs = Encoder("pairs", 10, lambda text: [len(text) % 10] * ((len(text) + 1) // 2), lambda index: index == 4)
    rows = {row["lang"]: row for row in evaluate([pairs], [path])["rows"]}
    korean, english = rows["ko"], rows["en"]
    # "가나 다": 4 chars, 10 UTF-8 bytes, 2 words, 2 tokens (id 4, which counts as byte fallback).
    assert (korean["characters"], korean["bytes"], korean["words"], korean["tokens"]) == (4, 10, 2, 2)
    assert korean["chars_per_token"] == 2.0 and korean["bytes_per_token"] == 5.0 and korean["tokens_per_word"] == 1.0
    assert korean["byte_fallback_rate"] == 1.0 and korean["vocab_unused_share"] == pytest.approx(0.9)
    # "ab cd ef": 8 chars, 3 words, 4 tokens of id 8.
    assert english["chars_per_token"] == 2.0 and english["tokens_per_word"] == pytest.approx(4 / 3)
    assert english["byte_fallback_rate"] == 0.0


def test_languages_spread_over_files_get_a_total_row(make_jsonl):
    first = make_jsonl("a.jsonl", [{"text": "abc", "lang": "en"}])
    second = make_jsonl("b.jsonl", [{"text": "defgh", "lang": "en"}, {"text": "가", "lang": "ko"}])
    rows = evaluate([char_encoder()], [first, second])["rows"]
    totals = [row for row in rows if row["file"] == ALL_FILES]
    assert [(row["lang"], row["characters"], row["tokens"]) for row in totals] == [("en", 8, 8)]


def test_evaluate_rejects_an_empty_file(make_jsonl):
    with pytest.raises(TokenizerError, match=r"empty.jsonl has no non-empty documents"):
        evaluate([char_encoder()], [make_jsonl("empty.jsonl", [])])


def test_unknown_baseline():
    with pytest.raises(TokenizerError, match=r"unknown baseline 'gpt2'"):
        load_baseline("gpt2")


def test_o200k_baseline_byte_fallback_counts_character_fragments():
    pytest.importorskip("quicktok")
    o200k = load_baseline("o200k")
    assert o200k.vocab_size > 200_000
    ids = o200k.encode("𓀀")  # a rare 4-byte character: o200k splits it into byte fragments
    assert len(ids) > 1 and all(o200k.is_byte_fallback(index) for index in ids)
    assert not any(o200k.is_byte_fallback(index) for index in o200k.encode("hello world"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kmodel")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_every_option_has_help_text():
    parser = argparse.ArgumentParser(prog="kmodel")
    subparsers = parser.add_subparsers(dest="command")
    add_commands(subparsers)
    tokenizer = subparsers.choices["tokenizer"]
    commands = next(a for a in tokenizer._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"build-corpus", "synthesize-corpus", "train", "eval"}
    for command in commands.choices.values():
        for action in command._actions:
            assert action.help, f"{command.prog}: {action.dest} has no help"


def test_cli_eval_json_and_save(tmp_path, make_jsonl, capsys):
    path = make_jsonl("held.jsonl", [{"text": "대화 상자에서 속성을 변경합니다.", "lang": "ko"}])
    assert run_cli(["tokenizer", "eval", "shipped", str(path), "--json", "--save", str(tmp_path / "report")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in printed["tokenizers"]] == ["kmodel:ko-8k"]
    assert printed["rows"][0]["chars_per_token"] > 2.0
    assert json.loads((tmp_path / "report.json").read_text()) == printed
    assert "| kmodel:ko-8k |" in (tmp_path / "report.md").read_text()
    machine = printed["machine"]  # saved tables name the device and how busy it was
    assert "cores" in machine["device"] and len(machine["load_average"]) == 2 and machine["wall_seconds"] >= 0
    assert f"Measured on {machine['device']}, load average" in (tmp_path / "report.md").read_text()


def test_cli_eval_against_a_baseline(make_jsonl, capsys):
    pytest.importorskip("quicktok")
    path = make_jsonl("held.jsonl", [{"text": "The dialog opens. 대화 상자가 열립니다.", "lang": "mixed"}])
    assert run_cli(["tokenizer", "eval", "shipped", str(path), "--against", "o200k"]) == 0
    table = capsys.readouterr().out
    assert "kmodel:ko-8k / o200k" in table and "| o200k |" in table


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert run_cli(["tokenizer", "eval", str(tmp_path / "missing"), str(tmp_path / "x.jsonl")]) == 1
    assert "tokenizer directory" in capsys.readouterr().err
    assert run_cli(["tokenizer", "train", "--out", str(tmp_path / "o"), "--input", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert run_cli(["tokenizer", "eval", "shipped", str(tmp_path / "x.jsonl"), "--against", "gpt2"]) == 1
    assert "unknown baseline 'gpt2'" in capsys.readouterr().err


def test_cli_train(small_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = [
        "tokenizer",
        "train",
        "--out",
        str(out),
        "--vocab-size",
        "1200",
        "--mix",
        "ko=0.7,en=0.3",
        "--threads",
        "1",
        "--input",
        *map(str, small_corpus),
    ]
    assert run_cli(argv) == 0
    assert "vocab_size 1200" in capsys.readouterr().out
    metadata = json.loads((out / "metadata.json").read_text())
    assert set(metadata["corpus"]["sample"]["characters_by_lang"]) == {"ko", "en"}
    assert metadata["corpus"]["sample"]["excluded_documents_by_lang"] == {"code": 2}
