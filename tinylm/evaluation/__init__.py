"""Evaluation and responsible-use audits (issue 16).

    loglik.py        log-likelihoods of continuations (shared contexts computed once)
    perplexity.py    strided / rolling-window perplexity with lm-eval's metrics
    tasks.py         multiple-choice task readers (JSONL, MMLU, HellaSwag, ARC, lm-eval YAML)
    harness.py       lm-eval's prompt building and scoring (acc, acc_norm, acc_bytes)
    glue.py          GLUE-style classification data and metrics
    memorization.py  canaries (exposure) and extraction
    skewnorm.py      the skew-normal fit and tail CDF behind the estimated exposure
    audit_report.py  an audit's JSON, Markdown and plot
    bias.py          CrowS-Pairs
"""
