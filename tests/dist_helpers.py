"""Shared by the multi-process tests: a child environment for a 2-rank run."""

from __future__ import annotations

import os


def _env(**extra) -> dict:
    launcher = ("PMI_", "OMPI_", "PMIX_", "MV2_", "MPI_LOCAL", "HYDRA_", "TINYLM_DIST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TINYLM_LOAD_PLUGINS="", **extra)
    return env
