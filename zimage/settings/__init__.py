"""One frozen Settings dataclass, read once: command line > environment > YAML file > defaults.

Every field is a setting. Its command-line flag is ``--field-name``, its environment
variable ``ZIMAGE_FIELD_NAME`` and its YAML key ``field_name``. The package imports
neither torch nor diffusers, so ``--help`` answers at once.

    fields.py   the Settings dataclass: every field with its help, choices, group and bounds
    sources.py  reading them: flags (add_arguments), environment, YAML; from_sources
    checks.py   checking them once at start (one clear sentence per problem); parse_gpus, parse_user
"""

from zimage.settings.checks import parse_gpus, parse_user
from zimage.settings.fields import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    DEFAULT_MODEL,
    ENV_PREFIX,
    FIELD_TYPES,
    MEMORY_MODES,
    Settings,
)
from zimage.settings.sources import add_arguments, describe, from_namespace, from_sources

__all__ = [
    "ATTENTION_BACKENDS",
    "COMPILE_MODES",
    "DEFAULT_MODEL",
    "ENV_PREFIX",
    "FIELD_TYPES",
    "MEMORY_MODES",
    "Settings",
    "add_arguments",
    "describe",
    "from_namespace",
    "from_sources",
    "parse_gpus",
    "parse_user",
]
