"""The revisions, hand-written, one file each (docs/store.md: adding a migration)."""
