"""ddb-cdc core: decoding, fan-out, checkpointing and replay, with no service SDK imports."""

__version__ = "0.1.0"
