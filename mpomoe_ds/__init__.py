"""mpomoe_ds: parameter-efficient MPO Mixture-of-Experts training on DeepSpeed."""

__version__ = "0.1.0"
