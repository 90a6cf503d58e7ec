"""tinylm-rope-scaling: RoPE for contexts longer than training, as positional schemes.

    "dynamic-ntk"   dynamic NTK-aware scaling (HF rope_type "dynamic")
    "yarn"          YaRN: NTK-by-parts frequencies and an attention factor (HF "yarn")

Installed, it is found through the ``tinylm`` entry-point group; Hugging Face Llama
folders whose ``rope_parameters`` / ``rope_scaling`` say "dynamic" or "yarn" then load
with ``tinylm.load_pretrained`` and save back with ``save_pretrained``. The formulas are
in ``frequencies``, the schemes in ``schemes``.
"""

from tinylm import hookimpl

from tinylm_rope_scaling.frequencies import (  # noqa: F401
    YarnParams, dynamic_ntk_inv_freq, yarn_attention_factor, yarn_correction_range,
    yarn_inv_freq, yarn_mscale,
)
from tinylm_rope_scaling.schemes import DynamicNTKRoPE, YaRNRoPE  # noqa: F401

__version__ = "0.1.0"


@hookimpl
def register_positional_encodings(register):
    register("dynamic-ntk", DynamicNTKRoPE)
    register("yarn", YaRNRoPE)
