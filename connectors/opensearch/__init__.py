"""The OpenSearch sink (``sink``), its index mapping modes (``mapping``) and index/alias
management (``indices``)."""
