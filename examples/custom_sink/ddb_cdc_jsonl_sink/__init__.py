"""Example ddb-cdc sink plugin: ``type: jsonl_file`` (see README.md next to pyproject.toml)."""

from ddb_cdc_jsonl_sink.sink import JsonlFileSink, Options, read_events

__all__ = ["JsonlFileSink", "Options", "read_events"]
__version__ = "0.1.0"
