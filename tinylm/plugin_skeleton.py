"""``tinylm plugins new NAME``: a plugin package that installs and passes its tests.

    >>> write_skeleton("demo", "tokenizer", "/tmp")     # doctest: +SKIP
    PosixPath('/tmp/demo')

writes

    demo/
      pyproject.toml          distribution "tinylm-demo", entry point demo = "tinylm_demo"
      README.md
      tinylm_demo/__init__.py one hook implementation registering one thing named "demo"
      tests/test_tinylm_demo.py

For each kind (``KINDS``) the module holds a small thing that works (a byte tokenizer,
a scaled sinusoidal encoding, an objective, a PEFT method, an architecture, a command,
a reward function) and the test checks it through tinylm's public API, registered
programmatically; one more test checks, once the package is installed, that tinylm
finds it through its entry point and ``tinylm plugins`` lists it. docs/plugins.md
walks on from there to a published package.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from tinylm import plugin_templates as T
from tinylm.atomic import write_atomic
from tinylm.errors import PluginError

# kind -> (registry kind, the hook), as tinylm.plugins.KINDS
KINDS = {
    "tokenizer": ("tokenizers", "register_tokenizers"),
    "positional": ("positional_encodings", "register_positional_encodings"),
    "objective": ("objectives", "register_objectives"),
    "peft": ("peft_methods", "register_peft_methods"),
    "architecture": ("architectures", "register_architectures"),
    "command": ("commands", "register_commands"),
    "reward": ("reward_functions", "register_reward_functions"),
}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_][A-Za-z0-9]+)*")


def names_for(name: str) -> dict:
    """The spellings a plugin called ``name`` goes by (``demo`` or ``tinylm-demo``):
    ``folder`` demo, ``dist`` tinylm-demo, ``module`` tinylm_demo, ``short`` demo (the
    entry point, and the name its hook registers), ``cls`` Demo."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PluginError(f"plugin name {name!r} is not a package name: use letters, digits "
                          f"and single - or _ between them, starting with a letter (e.g. demo)")
    short = re.sub(r"^tinylm[-_]", "", name, flags=re.I)
    if not short or short.lower() == "tinylm":
        raise PluginError(f"plugin name {name!r} needs a part after 'tinylm-' (e.g. tinylm-demo)")
    short = short.lower().replace("_", "-")
    dist = f"tinylm-{short}"
    return {"folder": name, "dist": dist, "module": dist.replace("-", "_"), "short": short,
            "cls": "".join(part.capitalize() for part in re.split(r"[-_]", short))}


def write_skeleton(name: str, kind: str = "tokenizer", parent=".") -> Path:
    """Write the package folder ``parent/name`` for a plugin of ``kind``; returns it.
    An existing folder is refused (nothing is overwritten)."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of: {', '.join(KINDS)}")
    n = names_for(name)
    registry, hook = KINDS[kind]
    fields = dict(n, kind=kind, registry=registry, hook=hook)
    root = Path(parent) / n["folder"]
    if root.exists():
        raise PluginError(f"{root} exists already; pick another NAME or -o folder")
    module, test = T.MODULES[kind]
    files = {
        "pyproject.toml": T.PYPROJECT,
        "README.md": T.README,
        f"{n['module']}/__init__.py": module,
        f"tests/test_{n['module']}.py": T.TEST_HEADER + test + T.TEST_ENTRY_POINT,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, Template(template).substitute(fields), error=PluginError)
    return root
