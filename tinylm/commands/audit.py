"""``tinylm audit``: memorization and bias audits of a model.

    tinylm audit canaries insert --format "my pin is {d}{d}{d}{d}" --repeats 1,10,100 \\
        --data in.txt --out out.txt          # then train on out.txt
    tinylm audit exposure --model runs/demo --canaries out.txt.canaries.json
    tinylm audit extraction --model runs/demo --train in.txt --heldout other.txt
    tinylm audit crows-pairs --model hf/gpt2 --data crows_pairs_anonymized.csv
"""

from __future__ import annotations

import click


@click.group(name="audit")
def audit_group():
    """Audit a model: canary exposure, training-data extraction, CrowS-Pairs bias."""
