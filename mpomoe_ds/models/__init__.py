"""Hugging Face models in and out: loading (``hf``), upcycling to MPOE-MoE (``convert``), export (``export``),
the multi-task model the trainer trains (``multitask``), and the ``model`` section (``config``)."""
