"""Alembic migrations of the store (docs/store.md). A package only so that setuptools ships the files."""
