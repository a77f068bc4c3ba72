"""The durable metric spool: points are committed to local SQLite before they count as
accepted, and a background deliverer moves them to MLflow."""
