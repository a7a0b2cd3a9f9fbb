"""Example ddb-cdc transform plugin: ``mask_digits``."""
