"""The public surface (STYLE §1): ``supervisor`` re-exports its public names from private
modules (or the internal sans-IO ``supervisor.core``), each exactly once (the idea of trio's ``_tests/test_exports.py``)."""

from __future__ import annotations

import inspect
import types

import supervisor
from supervisor import client
from supervisor.core import errors as _errors

# The public modules: the package, and the client's own module (the CLI and users import it).
PUBLIC_MODULES = {"supervisor", "supervisor.client"}


def test_all_has_no_duplicates_and_each_name_exists():
    assert len(supervisor.__all__) == len(set(supervisor.__all__))
    missing = [name for name in supervisor.__all__ if not hasattr(supervisor, name)]
    assert missing == []


def test_each_public_name_is_defined_in_a_private_module_or_the_client():
    """Code lives in private modules or the internal ``supervisor.core`` package (the
    sans-IO core, not a public door); ``supervisor.client`` holds the client's own code."""
    for name in supervisor.__all__:
        module = getattr(supervisor, name).__module__
        assert module == "supervisor.client" or module.startswith(("supervisor._", "supervisor.core.")), (name, module)
        assert getattr(supervisor, name).__name__ == name, f"{name} is exported under another name"


def test_nothing_public_is_missing_from_all():
    """A name without a leading underscore in the package is public: it must be in __all__
    (submodules aside). Catches a re-export added without its entry, or a stray import."""
    public = {name for name, value in vars(supervisor).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(supervisor.__all__), public ^ set(supervisor.__all__)


def test_each_public_object_is_exported_exactly_once():
    """No object under two public names; the client module's names are the package's same
    objects (one definition, two doors), not copies."""
    objects = [getattr(supervisor, name) for name in supervisor.__all__]
    assert len({id(obj) for obj in objects}) == len(objects)
    for name in client.__all__:
        assert getattr(client, name) is getattr(supervisor, name), name


def test_every_error_a_caller_can_see_is_exported():
    """Each ActorError subclass is something a caller may catch: a new one must be exported."""
    errors = {name for name, obj in vars(_errors).items()
              if inspect.isclass(obj) and issubclass(obj, _errors.ActorError)}
    assert errors <= set(supervisor.__all__), errors - set(supervisor.__all__)
