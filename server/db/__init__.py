"""PostgreSQL access: the schema, the engine and migrations."""
