"""Console entry points of mpomoe_ds (one module per command).

``mpo_report``: ``mpomoe-mpo``, the MPO decomposition report of a model's FFN matrices.
"""
