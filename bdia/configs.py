"""Building objects from Hydra config nodes (``_target_`` + arguments), one way for every app.

Hydra wraps whatever the target raises in ``InstantiationException``; :func:`instantiate` hands the target's
own exception on instead (a missing checkpoint's :class:`bdia.download.AssetUnavailableError`, a loader's
``ValueError`` …), and turns a ``TypeError`` from the call itself (``model.foo=1``: an argument the target does
not have) into a one-line ``ValueError`` naming the config group.
"""

from __future__ import annotations

from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf.errors import MissingMandatoryValue

__all__ = ["instantiate", "build_metrics"]


def instantiate(spec, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate(spec, **kwargs)`` (``_convert_="all"`` unless given) with the target's own
    errors; ``what`` names the config group in messages (``"model"``, ``"metrics.fid"`` …)."""
    kwargs.setdefault("_convert_", "all")
    try:
        return _hydra_instantiate(spec, **kwargs)
    except MissingMandatoryValue as e:  # a ??? the config leaves for the user (metrics.reconstruction.reference)
        key = getattr(e, "full_key", None) or what
        raise ValueError(f"{key} is not set: give it on the command line ({key}=...)") from None
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, TypeError):
            raise ValueError(f"{what}: {cause}") from None
        raise (cause if isinstance(cause, Exception) else e) from None


def build_metrics(specs: Mapping[str, Any] | None) -> dict:
    """The ``metrics`` group (metric name -> ``_target_`` config) instantiated; ``{}`` for ``metrics=none``.
    Feature-network weights are fetched here (FID's Inception), so offline a missing file fails before any
    image is drawn instead of after the whole run."""
    built = {}
    for name, spec in (specs or {}).items():
        built[name] = instantiate(spec, f"metrics.{name}", _convert_="none")
        getattr(built[name], "extractor", None)
    return built
