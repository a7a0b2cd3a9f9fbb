"""Start-up check that the top-level packages ``pipeline`` and ``connectors`` are ddb-cdc's.

Both names are generic: other distributions install top-level packages with the same names
(django-pipeline installs ``pipeline``; Elastic's connectors framework installs ``connectors``).
Installed into one environment, one overwrites the other's files, and the failure shows up later
as an obscure ImportError or, worse, as someone else's code running. So every ``ddb-cdc`` command
first asks the installed distributions' metadata (``importlib.metadata.packages_distributions``,
which reads each distribution's ``top_level.txt`` / RECORD) who provides those names, and stops
with one line naming the other distribution. Isolated installs (the container image, ``pipx``,
``uv tool install``, a virtualenv of its own) never meet this.
"""

from __future__ import annotations

import importlib.metadata

from pipeline.errors import InstallationError

#: the distribution that owns the top-level packages
DISTRIBUTION = "ddb-cdc"
#: top-level package names this distribution installs
PACKAGES = ("pipeline", "connectors")


def check_package_ownership() -> None:
    """Raise InstallationError (one line) when another installed distribution also provides
    ``pipeline`` or ``connectors``. Returns quietly otherwise — also when ddb-cdc itself runs
    from a checkout that is not installed (no distribution claims the names)."""
    providers = importlib.metadata.packages_distributions()
    for package in PACKAGES:
        others = sorted({d for d in providers.get(package, ()) if _canonical(d) != DISTRIBUTION})
        if others:
            raise InstallationError(
                f"the top-level package {package!r} is also installed by {', '.join(others)}: the two "
                f"overwrite each other's files; install ddb-cdc in an environment of its own (the container "
                f"image, `pipx install ddb-cdc`, `uv tool install ddb-cdc` or a dedicated virtualenv)")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
