"""Operator actions on a running group: checkpoint moves (``checkpoint_moves``), dead-letter
redrive (``redrive``) and the status view (``status``)."""
