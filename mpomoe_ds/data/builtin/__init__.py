"""Embedded default data sets, generated deterministically in code (no download).

``toy_glue`` holds three small English classification tasks and ``toy_lm`` a
text corpus; see ``toy_glue.py`` for how each is built and how hard it is.
"""

from mpomoe_ds.data.builtin.toy_glue import BUILTINS, TOY_GLUE_VERSION, builtin_task_names, generate, write_builtin

__all__ = ["BUILTINS", "TOY_GLUE_VERSION", "builtin_task_names", "generate", "write_builtin"]
