"""Files shipped into export folders (not imported by mpomoe_ds)."""
