"""Console entry points of mpomoe_ds (one module per command).

``train``: ``mpomoe-train``; ``export``: ``mpomoe-export``; ``prepare``: ``mpomoe-prepare``;
``mpo_report``: ``mpomoe-mpo``, the MPO decomposition report of a model's FFN matrices.
"""
