"""Provenance: prove a kmodel run was trained from scratch, and test any checkpoint for derivation.

    ledger.py     the hash-chained DIR/ledger.jsonl every training run writes (Ledger), signing
    verify.py     recompute every hash the ledger pins            (kmodel provenance verify)
    replay.py     retrain recorded segments, bit-exact on CPU     (kmodel provenance replay)
    compare.py    per-module derivation test with p-values        (kmodel provenance compare)
    views.py      kmodel / Hugging Face weights in one layout;  vocab.py: tokenizer comparison
    stats.py      matching and permutation p-values;  calibrate.py: calibration on tiny trained models
    audit.py      foreign model code and weight files on the training path (kmodel provenance audit)
    report.py     one self-contained HTML page                    (kmodel provenance report)

docs/provenance.md explains the method and the statistics.
"""
