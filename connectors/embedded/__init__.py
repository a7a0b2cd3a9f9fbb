"""Stand-ins for a machine with nothing installed: embedded servers (``servers``), the
``ddb-cdc demo`` (``demo``), the workload generator (``workload``) and its end-state check
(``verify``)."""
