"""Finite re-reads into sinks: from the stream (``stream``), from the S3 archive (``archive``),
and their shared report (``report``)."""
