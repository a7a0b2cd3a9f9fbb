"""``python -m connectors.app`` is the ``ddb-cdc`` command."""
from connectors.app.cli import main

raise SystemExit(main())
