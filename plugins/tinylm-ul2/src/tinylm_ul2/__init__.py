"""tinylm-ul2: UL2's mixture of denoisers (Tay et al. 2022) as a tinylm objective.

    tinylm train --family t5 --objective ul2 --data corpus.txt
    tinylm train --family gpt --objective ul2 --set objective_options.weights=2,2,4,1,1,1,1

The denoisers and their statistics: ``tinylm_ul2.denoisers``; how a window becomes a
batch for T5 and for decoders: ``tinylm_ul2.objective``.
"""

from tinylm import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_objectives(register):
    from tinylm_ul2.objective import UL2

    register("ul2", UL2)
