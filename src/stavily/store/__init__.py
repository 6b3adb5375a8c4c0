"""The store: tables, migrations, the database handle and its unit of work."""

from stavily.store.db import Database
from stavily.store.models import metadata

__all__ = ["Database", "metadata"]
