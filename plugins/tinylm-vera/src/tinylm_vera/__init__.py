"""tinylm-vera: VeRA (vector-based random matrix adaptation) as a tinylm PEFT method.

    from tinylm import peft
    model = peft.apply(model, "vera", r=256, target_modules=["q_proj", "v_proj"])
    peft.save_adapter(model, "out/vera")   # PEFT's folder: PeftModel.from_pretrained reads it
    peft.load_adapter(model, "some/peft/vera/adapter")

The math and where the weights live: ``tinylm_vera.method``; the shared projections,
drawn as PEFT draws them: ``tinylm_vera.projection``; PEFT's file format:
``tinylm_vera.hf_format``.
"""

from tinylm import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_peft_methods(register):
    from tinylm_vera.method import Vera

    register("vera", Vera)
