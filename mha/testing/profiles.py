"""Hypothesis profiles for the property suite.

``dev`` (local default), ``ci`` (derived from Hypothesis' built-in CI profile: derandomized, no
deadline, no database; the default when ``$CI`` is set), ``thorough`` (many examples, for a nightly
run) and ``mutation`` (fixed, derandomized, no database: a reproducible kill rate). Select one with
``$MHA_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

ENV_VAR = "MHA_HYPOTHESIS_PROFILE"
EXAMPLES = {"dev": 50, "ci": 150, "thorough": 2000, "mutation": 60}


def register() -> None:
    from hypothesis import HealthCheck, settings

    quiet = [HealthCheck.too_slow, HealthCheck.differing_executors]
    settings.register_profile("dev", max_examples=EXAMPLES["dev"], deadline=None,
                              suppress_health_check=quiet)
    settings.register_profile("ci", settings.get_profile("ci"), max_examples=EXAMPLES["ci"],
                              deadline=None, suppress_health_check=quiet)
    settings.register_profile("thorough", max_examples=EXAMPLES["thorough"], deadline=None,
                              suppress_health_check=quiet)
    settings.register_profile("mutation", derandomize=True, database=None, max_examples=EXAMPLES["mutation"],
                              deadline=None, suppress_health_check=quiet, print_blob=True)


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load ``name`` (default: ``$MHA_HYPOTHESIS_PROFILE``, else "ci" under
    CI, else "dev"). Returns the name loaded."""
    from hypothesis import settings

    register()
    name = name or os.environ.get(ENV_VAR) or ("ci" if os.environ.get("CI") else "dev")
    if name not in EXAMPLES:
        raise ValueError(f"${ENV_VAR} must be one of {', '.join(EXAMPLES)}, got {name!r}")
    settings.load_profile(name)
    return name
