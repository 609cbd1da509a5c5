from kmodel.tokenizer import train_tokenizer
from kmodel.tokenizer.corpus import BUNDLED_HELDOUT_DIR, parse_mix
from kmodel.tokenizer.sweep import Sweep, markdown


def test_shipped_tokenizer_is_reproducible_from_the_bundled_corpus(shipped, tmp_path):
    settings = shipped.metadata["settings"]
    retrained = train_tokenizer(
        tmp_path / "ko-8k",
        vocab_size=settings["vocab_size"],
        mix=settings["mix"],
        model_type=settings["model_type"],
        character_coverage=settings["character_coverage"],
        seed=settings["seed"],
    )
    assert retrained.metadata["corpus"] == shipped.metadata["corpus"], (
        "the bundled corpus changed since the shipped tokenizer was trained; retrain it with "
        "`kmodel tokenizer train --out tokenizer/shipped/ko-8k`"
    )
    assert retrained.fingerprint() == shipped.fingerprint()


def test_sweep_records_results_and_untrainable_sizes(tmp_path):
    heldout = sorted(BUNDLED_HELDOUT_DIR.glob("*.jsonl"))
    runs = Sweep(tmp_path, heldout, parse_mix("ko=0.6,en=0.25,code=0.15"))
    fixed = {"model_type": "bpe", "character_coverage": 0.9999, "morpheme_aware": False}
    small = runs.run("vocab_size", vocab_size=2048, **fixed)
    too_big = runs.run("vocab_size", vocab_size=200_000, **fixed)
    assert set(small["chars_per_token"]) == {"ko", "en", "code"}
    assert 1.5 < small["chars_per_token"]["ko"] < 3.0
    assert small["tokens_per_1k_chars"] == sum(
        1000 * weight / small["chars_per_token"][lang] for lang, weight in runs.mix.items()
    )
    assert "more than this corpus supports" in too_big["error"]
    report = {"mix": runs.mix, "train_files": runs.train_files, "heldout": ["h"], "best": small, **runs.results}
    table = markdown(report)
    assert "| bpe | 0.9999 | no | 2,048 |" in table and "| 200,000 | not trainable:" in table
