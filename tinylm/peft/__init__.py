"""Parameter-efficient fine-tuning: adapters on a frozen base model (docs/peft.md).

    from tinylm import peft
    model = peft.apply(model, "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    print(peft.trainable_parameters(model))      # trainable params: ... || trainable%: ...
    with peft.disable_adapters(model):            # the base model (a reference model)
        ref = model(ids).logits
    peft.merge(model); peft.unmerge(model)        # fold into the weights and back
    model = peft.merge_and_unload(model)          # a plain model with the merged weights

Methods are plugins (``register_peft_methods``); the built-ins are registered in
``tinylm/default_plugins/peft.py``. The mechanism is ``tinylm.peft.base``; module
names in tinylm's and Hugging Face's spelling are ``tinylm.peft.targets``.
"""

from tinylm.peft.base import (  # noqa: F401
    Adapter, AdapterSet, PeftConfig, PeftMethod, TrainableReport, adapter_names,
    adapter_sets, adapter_state_dict, apply, config_for, delete_adapter, disable_adapters,
    install, iter_adapters, merge, merge_and_unload, method_class, set_adapter,
    trainable_parameters, unmerge,
)
from tinylm.peft.targets import (  # noqa: F401
    Target, default_feedforward, default_targets, hf_module_names, resolve,
)

from tinylm.peft.hf import load_adapter, save_adapter  # noqa: F401  (HF PEFT folders)
