"""S3: the audit-log sink (``audit``), reading that archive back (``archive``) and the S3
dead-letter destination (``deadletter``)."""
