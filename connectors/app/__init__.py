"""The composition root, the one package that imports both ``pipeline`` and the rest of
``connectors``: wiring settings into a worker (``wiring``), the ``ddb-cdc`` CLI (``cli`` and its
command groups) and the OpenSearch reindex orchestration (``reindex``)."""
